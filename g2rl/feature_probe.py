"""``python -m g2rl.feature_probe``: what the G2RL signal looks like on a checkpoint's samples.

For a model directory (a run's ``checkpoints/step_N`` or a study's ``warm_start``) it samples
``--group-size`` responses to ``--problems`` built-in held-out problems, computes the gradient
features, the novelty chain and GRPO's advantages, and prints:

- the feature cosine of response pairs with the *same* text and with *different* texts (can the
  features tell responses apart, and do they see through the text to the answer?);
- the spread of nu within groups and how often it falls below the span floor;
- how far the G2RL advantages move from GRPO's in mixed groups, and how often they flip sign
  (overall, among the correct answers and among the wrong ones);
- the correlation of nubar with how many peers share a response's text (what "novel" means here).

It answers "does this task leave the features room to differ?" with numbers (README, study).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from g2rl.tasks import TASK_NAMES


def probe(model_dir: str, *, problems: int = 64, group_size: int = 8, seed: int = 0,
          lam: float = 0.5, temperature: float = 1.0, max_new_tokens: int | None = None,
          task_name: str = "subset-sum") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import g2rl_kernels
    from g2rl.data import encode_prompt
    from g2rl.rollout import HFRollout
    from g2rl.tasks import get_task
    from g2rl.trainer import advantages_for, rollout_features

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    task = get_task(task_name)
    max_new_tokens = max_new_tokens or task.max_new_tokens
    examples = task.make_examples("test", problems, 0)
    problems = len(examples)
    roll = HFRollout(model, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                     batch_size=256).generate([encode_prompt(tok, ex.prompt, None)
                                               for ex in examples], group_size, seed=seed)
    rewards = torch.tensor([task.reward(roll.texts[i * group_size + j], ex.answer)
                            for i, ex in enumerate(examples) for j in range(group_size)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    feats = rollout_features(model, roll, int(pad), temperature).view(problems, group_size, -1)
    r = rewards.view(problems, group_size).float()
    g2 = advantages_for("g2rl", feats, r, lam=lam, clip=3.0, mode="centered", eps=1e-6,
                        scale=True)
    gr = advantages_for("grpo", feats, r, lam=0.0, clip=None, mode="centered", eps=1e-6,
                        scale=True)
    ref = g2rl_kernels.reference.group_novelty(feats.double(), r.double(), lam=lam)
    texts = [roll.texts[i * group_size:(i + 1) * group_size] for i in range(problems)]

    same, diff = [], []
    for b in range(problems):
        for i in range(group_size):
            for j in range(i + 1, group_size):
                (same if texts[b][i] == texts[b][j] else diff).append(float(g2.cosine[b, i, j]))
    nu = ref.novelty
    spread = (nu.max(1).values - nu.min(1).values)
    mixed = ~(r == r[:, :1]).all(1)
    lo, hi = nu.min(1, keepdim=True).values, nu.max(1, keepdim=True).values
    nubar = torch.clamp(0.5 + (nu - (lo + hi) / 2) / torch.clamp(hi - lo, min=0.01), 0, 1)
    dup = torch.tensor([[sum(t == u for u in row) - 1 for t in row] for row in texts],
                       dtype=torch.float64)
    out = {
        "model": model_dir, "task": task_name, "problems": problems, "group_size": group_size,
        "accuracy": float((r > 0).float().mean()),
        "mixed_group_frac": float(mixed.float().mean()),
        "distinct_per_group": sum(len(set(row)) for row in texts) / problems,
        "cos_same_text_mean": _mean(same), "cos_same_text_pairs": len(same),
        "cos_diff_text_mean": _mean(diff), "cos_diff_text_pairs": len(diff),
        "cos_diff_text_abs_mean": _mean([abs(x) for x in diff]),
        "nu_mean": float(nu.mean()), "nu_spread_mean": float(spread.mean()),
        "nu_spread_below_floor_frac": float((spread < 0.01).double().mean()),
        "corr_nubar_duplicates": _corr(nubar.flatten().tolist(), dup.flatten().tolist()),
    }
    if bool(mixed.any()):
        a, b = g2.advantages[mixed], gr.advantages[mixed]
        out["mixed_adv_abs_diff_mean"] = float((a - b).abs().mean())
        out["mixed_adv_sign_flip_frac"] = float(((a * b) < 0).float().mean())
        ok = r[mixed] > 0  # which answers flip: correct ones pushed down, wrong ones pushed up
        for name, sel in (("correct", ok), ("wrong", ~ok)):
            if bool(sel.any()):
                out[f"mixed_adv_sign_flip_frac_{name}"] = float(((a * b)[sel] < 0).float().mean())
    return out


def countdown_pairs(model_dir: str, *, problems: int = 128, temperature: float = 1.0,
                    setting: str = "countdown") -> dict[str, Any]:
    """Teacher-forced feature cosines on Countdown's held-out problems (no sampling):

    - ``cos_same_solution``: two step orders of the same solution (same canonical tree);
    - ``cos_diff_solution``: two different solutions, neither using ``/``;
    - ``cos_division``: a solution with ``/`` against one without, on the same problem.

    Each is the mean over the problems that have such a pair (counts alongside). If the
    features see through the text to the solution, the first is high and the others lower;
    G2RL can boost a ``/`` solution only where the third is low.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rl.data import encode_prompt
    from g2rl.rollout import RolloutBatch
    from g2rl.tasks import countdown as cd
    from g2rl.trainer import rollout_features

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    kinds: dict[str, list[float]] = {"same_solution": [], "diff_solution": [], "division": []}
    for ex in cd.make_examples("test", problems, 0, setting=setting):
        sols = cd.solution_exprs(ex.answer)
        plain = [e for e in sols if not cd.uses_division(e)]
        div = [e for e in sols if cd.uses_division(e)]
        pairs: list[tuple[str, str, str]] = []
        for e in plain[:1] + div[:1]:
            other = _second_ordering(e)
            if other is not None:
                pairs.append(("same_solution", cd.render_steps(e), other))
                break
        if len(plain) >= 2:
            pairs.append(("diff_solution", cd.render_steps(plain[0]), cd.render_steps(plain[1])))
        if plain and div:
            pairs.append(("division", cd.render_steps(plain[0]), cd.render_steps(div[0])))
        if not pairs:
            continue
        prompt = encode_prompt(tok, ex.prompt, None)
        texts = [t for _, a, b in pairs for t in (a, b)]
        resp = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for t in texts]
        roll = RolloutBatch(prompt_ids=[prompt] * len(texts), response_ids=resp,
                            truncated=[False] * len(texts), texts=texts, n=len(texts))
        f = torch.nn.functional.normalize(
            rollout_features(model, roll, pad, temperature).double(), dim=-1)
        for k, (kind, _, _) in enumerate(pairs):
            kinds[kind].append(float(f[2 * k] @ f[2 * k + 1]))
    out: dict[str, Any] = {"model": model_dir, "task": setting, "problems": problems}
    for kind, xs in kinds.items():
        out[f"cos_{kind}"] = _mean(xs)
        out[f"cos_{kind}_pairs"] = len(xs)
    return out


def _second_ordering(e: Any) -> str | None:
    """Another step text of the solution ``e`` that reads back as ``e`` (None if none)."""
    from g2rl.tasks import countdown as cd

    first = cd.render_steps(e)
    want = cd.render(e)
    for i, (steps, _) in enumerate(cd._emissions(e)):
        text = ",".join(steps)
        if text != first and cd.extract_answer(text) == want:
            return text
        if i > 200:
            break
    return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _corr(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else math.nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2rl.feature_probe", description=__doc__.split(
        "\n")[0])
    p.add_argument("model_dirs", nargs="+", help="model directories (tiny built-in models)")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=TASK_NAMES, default="subset-sum",
                   help="built-in task (countdown tasks also print the teacher-forced pair "
                        "cosines: two orderings of one solution, two solutions, / vs not)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for d in args.model_dirs:
        print(json.dumps(probe(d, problems=args.problems, group_size=args.group_size,
                               seed=args.seed, task_name=args.task)), flush=True)
        if args.task.startswith("countdown"):
            print(json.dumps(countdown_pairs(d, problems=args.problems, setting=args.task)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
