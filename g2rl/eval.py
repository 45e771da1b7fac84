"""Evaluation: pass@1, maj@k and unbiased pass@k from ``n`` samples per prompt.

Library use: :func:`evaluate`. Command line::

    python -m g2rl.eval --checkpoint DIR --data SRC [--n 8] [--k 1 4 8] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from g2rl.data import Example, encode_prompt, load_examples
from g2rl.metrics import maj_at_k, mean, pass_at_k
from g2rl.tasks import TASK_NAMES

__all__ = ["evaluate", "main", "reward_functions"]

DEFAULT_MAX_NEW_TOKENS = {"math": 1024, "builtin": 16}
DEFAULT_BUILTIN_PROBLEMS = 200


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    reward_fn: Callable[[str, str], float],
    answer_fn: Callable[[str], str | None],
    n: int = 4,
    ks: Sequence[int] = (1,),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    system_prompt: str | None = None,
    rollout: Any = None,
    progress: bool = True,
    return_samples: bool = False,
    feature_fn: Callable[[Any], Any] | None = None,
    embed_fn: Callable[[list[str]], Any] | None = None,
    class_fn: Callable[[str], str] | None = None,
    rare_fn: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Sample ``n`` responses per example and score them.

    A sample is correct when ``reward_fn(completion, answer) > 0``. Returns a dict with
    ``pass@1`` (mean correctness over all samples), and for each ``k`` in ``ks``
    ``pass@k`` (unbiased estimator, mean over prompts) and ``maj@k`` (majority vote of the
    first ``k`` samples' ``answer_fn`` answers, ties broken at random with ``seed``), plus
    ``n_prompts``, ``n_samples``, ``n``, ``mean_reward``, ``truncated_frac`` and
    ``mean_response_len`` (tokens); with ``return_samples`` also ``samples`` (one record per
    sample).

    ``rollout`` (an object with ``generate(prompts, n, seed=...)``, e.g. the trainer's) is used
    when given; otherwise an :class:`~g2rl.rollout.HFRollout` with ``temperature``, ``top_p``
    and ``max_new_tokens``. ``batch_size`` bounds the sequences (prompts x n) per call.

    Geometry of the n samples of each prompt (spec section 6), over the pairs i < j: with
    ``feature_fn`` (a generated batch -> (prompts x n, d) gradient features) adds
    ``feature_cos_mean`` and ``feature_neg_share``; with ``embed_fn`` (texts -> (N, D)
    embeddings) ``semantic_cos_mean`` and ``semantic_neg_share``.

    Solutions (the ``answer_fn`` strings of the correct samples; equal strings are the same
    solution): ``distinct_correct_mean`` (distinct correct solutions per problem),
    ``multi_solution_share`` (share of problems with two or more), ``solution_entropy_mean``
    (entropy in nats of each problem's distribution of correct solutions, 0 for a problem
    with none, averaged over problems); with ``rare_fn`` (solution -> uses the rare strategy)
    ``rare_share`` (share of the correct samples that use it). With ``class_fn`` (gold answer
    -> class label) ``by_class`` holds every one of these numbers and the pass@k per class.
    """
    from g2rl.geometry import PairStats

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = sorted(set(int(k) for k in ks) | {1})
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"every k must be in [1, n={n}], got {bad}")
    if rollout is None:
        from g2rl.rollout import HFRollout

        rollout = HFRollout(
            model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, batch_size=batch_size,
        )
    from tqdm.auto import tqdm

    from g2rl.rewards import score_batch  # math: worker processes, guards, time limits

    per_call = max(1, batch_size // n)
    correct: list[list[bool]] = []
    answers: list[list[str | None]] = []
    rewards: list[float] = []
    truncated: list[bool] = []
    lengths: list[int] = []
    samples: list[dict[str, Any]] = []
    feature_pairs, semantic_pairs = PairStats(), PairStats()
    bar = tqdm(total=len(examples), desc="eval", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(examples), per_call):
            chunk = examples[start:start + per_call]
            prompts = [encode_prompt(tokenizer, ex.prompt, system_prompt) for ex in chunk]
            batch = rollout.generate(prompts, n, seed=seed * 1_000_003 + start)
            if feature_fn is not None and n > 1:
                feature_pairs.add_features(feature_fn(batch).reshape(len(chunk), n, -1))
            if embed_fn is not None and n > 1:
                semantic_pairs.add_features(
                    embed_fn(list(batch.texts)).reshape(len(chunk), n, -1))
            scored = score_batch(reward_fn, batch.texts,
                                 [ex.answer for ex in chunk for _ in range(n)]).rewards
            for j, ex in enumerate(chunk):
                row_ok: list[bool] = []
                row_ans: list[str | None] = []
                for s in range(j * n, (j + 1) * n):
                    text = batch.texts[s]
                    r = scored[s]
                    ans = answer_fn(text)
                    row_ok.append(r > 0)
                    row_ans.append(ans)
                    rewards.append(r)
                    truncated.append(bool(batch.truncated[s]))
                    lengths.append(len(batch.response_ids[s]))
                    if return_samples:
                        samples.append({"prompt": ex.prompt, "gold": ex.answer, "completion": text,
                                        "answer": ans, "reward": r})
                correct.append(row_ok)
                answers.append(row_ans)
            bar.update(len(chunk))
            bar.set_postfix(pass1=f"{mean(c for row in correct for c in row):.3f}")
    finally:
        bar.close()

    rng = random.Random(seed)
    out: dict[str, Any] = {
        "n_prompts": len(examples),
        "n_samples": len(rewards),
        "n": n,
        "pass@1": mean(c for row in correct for c in row),
    }
    for k in ks:
        out[f"pass@{k}"] = mean(pass_at_k(n, sum(row), k) for row in correct)
        votes = zip(answers, correct, strict=True)
        out[f"maj@{k}"] = mean(maj_at_k(a, c, k, rng) for a, c in votes)
    out["pass@1"] = mean(c for row in correct for c in row)  # == mean of pass_at_k(n, c, 1)
    out.update(solution_stats(correct, answers, n, ks, rare_fn))
    if class_fn is not None:
        labels = [class_fn(ex.answer) for ex in examples]
        out["by_class"] = {
            label: {"n_prompts": labels.count(label), **solution_stats(
                [c for c, x in zip(correct, labels, strict=True) if x == label],
                [a for a, x in zip(answers, labels, strict=True) if x == label], n, ks,
                rare_fn, with_pass=True)}
            for label in sorted(set(labels))}
    out["mean_reward"] = mean(rewards)
    out["truncated_frac"] = mean(truncated)
    out["mean_response_len"] = mean(lengths)
    if feature_pairs.pairs:
        out.update(feature_pairs.as_dict("feature"))
    if semantic_pairs.pairs:
        out.update(semantic_pairs.as_dict("semantic"))
    if return_samples:
        out["samples"] = samples
    return out


def solution_stats(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]],
                   n: int, ks: Sequence[int], rare_fn: Callable[[str], bool] | None = None,
                   *, with_pass: bool = False) -> dict[str, Any]:
    """The solution-diversity numbers of :func:`evaluate` over problems (rows of ``n``
    samples: ``correct`` flags and ``answer_fn`` strings); with ``with_pass`` also pass@1 and
    the unbiased pass@k for ``ks``."""
    out: dict[str, Any] = {}
    if with_pass:
        out["pass@1"] = mean(c for row in correct for c in row)
        for k in ks:
            out[f"pass@{k}"] = mean(pass_at_k(n, sum(row), k) for row in correct)
    distinct, entropy, rare, total = [], [], 0, 0
    for row_ok, row_ans in zip(correct, answers, strict=True):
        sols = Counter(a if a is not None else "?" for ok, a in zip(row_ok, row_ans,
                                                                     strict=True) if ok)
        distinct.append(len(sols))
        tot = sum(sols.values())
        entropy.append(-sum(c / tot * math.log(c / tot) for c in sols.values()) if tot else 0.0)
        if rare_fn is not None:
            rare += sum(c for a, c in sols.items() if a != "?" and rare_fn(a))
            total += tot
    out["distinct_correct_mean"] = mean(distinct)
    out["multi_solution_share"] = mean(d >= 2 for d in distinct)
    out["solution_entropy_mean"] = mean(entropy)
    if rare_fn is not None:
        out["rare_share"] = rare / total if total else 0.0
    return out


def reward_functions(kind: str, task: str = "subset-sum",
                     ) -> tuple[Callable[[str, str], float], Callable[[str], str | None]]:
    """``(reward_fn, answer_fn)`` for ``"math"`` (math-verify on the boxed answer) or
    ``"builtin"`` (the built-in ``task`` of :mod:`g2rl.tasks`, imported lazily)."""
    if kind == "math":
        from g2rl.rewards import extract_boxed, math_reward

        return math_reward, extract_boxed
    if kind == "builtin":
        from g2rl.tasks import get_task

        t = get_task(task)
        return t.reward, t.extract_answer
    raise ValueError(f"unknown reward {kind!r}; choose math or builtin")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m g2rl.eval",
        description="pass@1, maj@k and unbiased pass@k of a checkpoint on a dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True,
                   help="directory with a transformers model and tokenizer (save_pretrained)")
    p.add_argument("--data", required=True,
                   help="'builtin', a .jsonl file, a datasets directory or a hub dataset name")
    p.add_argument("--split", default=None,
                   help="dataset split (default: 'test' for builtin, the only one otherwise)")
    p.add_argument("--prompt-field", default="prompt", help="prompt field of the data")
    p.add_argument("--answer-field", default="answer", help="gold answer field of the data")
    p.add_argument("--limit", type=int, default=None,
                   help=f"at most this many problems (builtin: default {DEFAULT_BUILTIN_PROBLEMS})")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help="k values for pass@k / maj@k (default: 1 and n)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="response budget (default: 1024 for math, for builtin the task's "
                        "longest answer plus EOS: 16 for subset-sum, 29 for countdown)")
    p.add_argument("--reward", choices=("math", "builtin"), default=None,
                   help="verifier (default: builtin for --data builtin, else math)")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt (default: the paper's for math, none for builtin)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling and tie-breaking seed")
    p.add_argument("--task", choices=TASK_NAMES, default="subset-sum",
                   help="built-in task (--data builtin)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the built-in task's problem generator (--data builtin)")
    p.add_argument("--rollout", choices=("hf", "vllm", "auto"), default="hf",
                   help="generation engine")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    ks = args.k if args.k is not None else sorted({1, args.n})
    bad = [k for k in ks if not 1 <= k <= args.n]
    if bad:
        parser.error(f"--k values must be between 1 and --n={args.n}, got {bad}")
    ckpt = Path(args.checkpoint).expanduser()
    if not ckpt.is_dir():
        parser.error(f"--checkpoint: directory not found: {ckpt}")
    if not (ckpt / "config.json").is_file():
        parser.error(f"--checkpoint: {ckpt} has no config.json (not a save_pretrained model)")

    builtin = args.data == "builtin"
    reward_kind = args.reward or ("builtin" if builtin else "math")
    if builtin:
        from g2rl.tasks import get_task

        args.split = args.split or "test"
        examples = get_task(args.task).make_examples(
            args.split, args.limit or DEFAULT_BUILTIN_PROBLEMS, args.data_seed)
    else:
        try:
            examples = load_examples(args.data, split=args.split, limit=args.limit,
                                     prompt_field=args.prompt_field, answer_field=args.answer_field)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            parser.error(f"--data: {msg}")
    if not examples:
        parser.error(f"--data: {args.data} has no examples")
    system_prompt = args.system_prompt
    if system_prompt is None and reward_kind == "math":
        from g2rl.rewards import MATH_SYSTEM_PROMPT

        system_prompt = MATH_SYSTEM_PROMPT
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[reward_kind]
    task = None
    if reward_kind == "builtin":
        from g2rl.tasks import get_task

        task = get_task(args.task)
        if args.max_new_tokens is None and args.task != "subset-sum":
            max_new = task.max_new_tokens

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).to(device)
    reward_fn, answer_fn = reward_functions(reward_kind, args.task)
    rollout = None
    if args.rollout != "hf":
        from g2rl.rollout import make_rollout

        rollout = make_rollout(args.rollout, model, tokenizer, max_new_tokens=max_new,
                               temperature=args.temperature, top_p=args.top_p,
                               batch_size=args.batch_size, seed=args.seed)
    results = evaluate(
        model, tokenizer, examples, reward_fn=reward_fn, answer_fn=answer_fn, n=args.n, ks=ks,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new, seed=args.seed,
        batch_size=args.batch_size, system_prompt=system_prompt, rollout=rollout,
        progress=not args.no_progress,
        class_fn=task.problem_class if task is not None else None,
        rare_fn=task.rare_strategy if task is not None else None,
    )
    results["config"] = {
        "checkpoint": str(ckpt), "data": args.data, "split": args.split, "reward": reward_kind,
        "task": args.task if builtin else None, "n": args.n, "k": ks,
        "temperature": args.temperature, "top_p": args.top_p,
        "max_new_tokens": max_new, "seed": args.seed, "system_prompt": system_prompt,
        "limit": args.limit, "data_seed": args.data_seed if builtin else None,
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
