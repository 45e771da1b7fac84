"""``python -m g2rl.train``: SFT warm-start (built-in task), evaluation, G2RL / GRPO, evaluation.

A run directory holds ``config.yaml`` (the resolved options), ``metrics.jsonl`` (one line per
RL step), ``checkpoints/`` (see :mod:`g2rl.checkpoint`), ``reference/`` (the frozen KL
reference, when it is not the starting model), ``eval_summary.json`` (held-out pass@1 / pass@k
/ maj@k before SFT, at the start of RL and at the end) and ``training.png``.

Exit codes: 0 done; 1 stopped on an error it explains (a non-finite loss, a checkpoint that
could not be written, e.g. on a full disk, or none left to resume from; the last good
checkpoint is kept); 2 bad option or input; 3 the run directory is in use by another process
(nothing was touched); 130 interrupted by Ctrl-C, 143 by SIGTERM (the step in progress was
finished and a checkpoint saved, unless a second Ctrl-C aborted; continue with ``--resume``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from g2rl.config import ConfigError, TrainConfig, parse_config, save_yaml

log = logging.getLogger("g2rl.train")


class RunError(RuntimeError):
    """A problem with the inputs of a run (message ready for the user)."""


# ---------------------------------------------------------------------- setup helpers
def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """The run directory: --output-dir, or with --resume the newest run under runs/, or a new
    runs/<timestamp>."""
    from g2rl.checkpoint import latest_checkpoint

    if cfg.output_dir:
        run = Path(cfg.output_dir).expanduser()
        if cfg.resume:
            if not run.is_dir():
                raise RunError(f"--resume: run directory not found: {run}")
        elif latest_checkpoint(run / "checkpoints") is not None:
            raise RunError(f"--output-dir {run} already holds checkpoints; add --resume to "
                           "continue that run, or choose another directory")
        return run
    runs = Path("runs")
    if cfg.resume:
        found = sorted((p for p in runs.glob("*") if latest_checkpoint(p / "checkpoints")),
                       key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
        if not found:
            raise RunError("--resume: no run with a checkpoint under runs/; give --output-dir")
        return found[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = runs / stamp
    k = 1
    while run.exists():
        run = runs / f"{stamp}-{k}"
        k += 1
    return run


def model_source(cfg: TrainConfig) -> Path:
    if cfg.model == "tiny":
        from g2rl.tiny_model import TinySpec, tiny_model_path

        return tiny_model_path(cfg.cache_dir, TinySpec.sized(cfg.tiny_hidden_size,
                                                            cfg.tiny_layers))
    path = Path(cfg.model).expanduser()
    if not (path / "config.json").is_file():
        raise RunError(f"--model {cfg.model}: no config.json in that directory (not a "
                       "transformers model saved with save_pretrained)")
    return path


def device_and_dtype(cfg: TrainConfig) -> tuple[Any, Any]:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[cfg.dtype]
    return device, dtype


def load_model(path: Path, device: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def builtin_task(cfg: TrainConfig) -> Any:
    """The :class:`~g2rl.tasks.Task` of ``--task`` with the run's SFT options."""
    from g2rl.tasks import get_task

    return get_task(cfg.task, division_weight=cfg.sft_division_weight,
                    keep_b_only=cfg.sft_keep_b_only)


def load_data(cfg: TrainConfig) -> tuple[list, list]:
    """(training examples, held-out examples)."""
    task = builtin_task(cfg)
    if cfg.builtin:
        train = task.make_examples("train", cfg.train_problems, 0)
        if cfg.data_limit:
            train = train[: cfg.data_limit]
    else:
        train = _load(cfg.data, "--data", cfg.data_split, cfg.data_limit)
    held_out: list = []
    if cfg.eval_problems > 0:
        if cfg.eval_data and cfg.eval_data != "builtin":
            held_out = _load(cfg.eval_data, "--eval-data", cfg.eval_split, cfg.eval_problems)
        elif cfg.builtin or cfg.eval_data == "builtin":
            held_out = task.make_examples("test", cfg.eval_problems, 0)
    if not train:
        raise RunError(f"--data {cfg.data}: no examples")
    return train, held_out


def _load(source: str, option: str, split: str | None, limit: int | None) -> list:
    from g2rl.data import load_examples

    try:
        return load_examples(source, split=split, limit=limit)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise RunError(f"{option} {source}: {msg}") from exc


def lm_head_rows(model: Any) -> int:
    """V: the number of rows of the model's output embedding (its vocabulary)."""
    return int(model.get_output_embeddings().weight.shape[0])


def sft_trace_stats(task: Any, sft_examples: list, n_train: int, seed: int) -> dict[str, Any]:
    """What the SFT warm start shows: problems kept, and (for a task with a rare strategy) the
    share of its traces that use it, measured on one drawn trace per problem."""
    info: dict[str, Any] = {"task": task.name, "problems": len(sft_examples),
                            "train_problems": n_train}
    if task.rare_strategy is not None and sft_examples:
        rng = random.Random(f"g2rl-sft-stats:{seed}")
        rare = 0
        for ex in sft_examples:
            canon = task.extract_answer(task.sft_solution(ex.answer, rng, seed))
            rare += bool(canon is not None and task.rare_strategy(canon))
        info["rare_trace_share"] = rare / len(sft_examples)
    if task.problem_class is not None:
        labels = [task.problem_class(ex.answer) for ex in sft_examples]
        info["class_share"] = {c: labels.count(c) / max(1, len(labels)) for c in task.classes}
    return info


def save_warm_start(model: Any, tokenizer: Any, run_dir: Path, evals: dict[str, Any],
                    summary_path: Path, say: Any) -> dict[str, Any]:
    """``--warm-start-only``: save the warm-started model and tokenizer to ``run_dir /
    warm_start`` (written to a temporary directory, then renamed: complete or absent)."""
    import shutil

    from g2rl.checkpoint import write_text_atomic

    final = run_dir / "warm_start"
    tmp = run_dir / "warm_start.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    evals["warm_start"] = str(final)
    write_text_atomic(summary_path, json.dumps(evals, indent=2) + "\n")
    say(f"warm start saved: {final}")
    return evals


def make_embedder(cfg: TrainConfig) -> Any:
    """The sentence embedder for ``--method embedding`` (required) and the semantic geometry
    (optional: None when no embedding model is installed or ``--no-semantic-geometry``)."""
    from g2rl.embedding import load_embedder

    required = cfg.method == "embedding"
    if not (required or cfg.semantic_geometry):
        return None
    try:
        return load_embedder(cfg.embedding_model, required=required)
    except (ImportError, FileNotFoundError) as exc:
        raise RunError(str(exc)) from exc


# ---------------------------------------------------------------------- metrics files
def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (written by a run killed before its save)."""
    from g2rl.checkpoint import write_text_atomic
    from g2rl.plot import read_metrics

    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------- the run
def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run training as configured; returns the evaluation summary. The run directory is locked
    for the whole run (:mod:`g2rl.run_lock`): a second process gets
    :class:`~g2rl.run_lock.RunLockedError` and changes nothing."""
    from g2rl.run_lock import RunLock, check_free
    from g2rl.trainer import Interrupted

    try:
        run_dir = resolve_run_dir(cfg)
    except RunError:
        if cfg.output_dir:  # "in use by PID ..." says more than "holds checkpoints"
            check_free(Path(cfg.output_dir).expanduser())
        raise
    with RunLock(run_dir):
        if cfg.output_dir and not cfg.resume:
            resolve_run_dir(cfg)  # again under the lock: no checkpoint appeared meanwhile
        try:
            return _run(cfg, run_dir)
        except Interrupted as exc:
            report_interrupt(exc, run_dir)
            raise


def report_interrupt(exc: Any, run_dir: Path) -> None:
    """Print what an interruption (:class:`~g2rl.trainer.Interrupted`) left and how to go on."""
    from g2rl.checkpoint import latest_checkpoint

    name = "Ctrl-C" if exc.signum == signal.SIGINT else signal.Signals(exc.signum).name
    last = latest_checkpoint(run_dir / "checkpoints")
    again = f"continue with: python -m g2rl.train --resume --output-dir {run_dir}"
    if last is None:
        msg = (f"interrupted by {name} before the first checkpoint (during the SFT warm-start "
               "or the first evaluation): nothing to resume; run the same command again, "
               "without --resume")
    elif exc.saved:
        msg = f"interrupted by {name}: checkpoint saved at step {int(last.name[5:])}; {again}"
    else:
        msg = (f"interrupted by {name}; the last complete checkpoint is {last.name}; {again}")
    print(f"python -m g2rl.train: {msg} (exit code {exc.exit_code})", file=sys.stderr,
          flush=True)


def _run(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """The run itself, in the locked ``run_dir``."""
    import torch
    from tqdm.auto import tqdm

    from g2rl import checkpoint as ck
    from g2rl.collapse import CollapseMonitor, EntropyMonitor
    from g2rl.eval import evaluate, reward_functions
    from g2rl.plot import plot_run, read_metrics
    from g2rl.rewards import MATH_SYSTEM_PROMPT
    from g2rl.rollout import make_rollout
    from g2rl.sft import run_sft
    from g2rl.trainer import Interrupted, StopRequested, Trainer, rollout_features

    t_start = time.perf_counter()
    _quiet_transformers()
    device, dtype = device_and_dtype(cfg)
    threads = cfg.threads or (1 if cfg.model == "tiny" and device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    ckpt_dir = run_dir / "checkpoints"
    latest = ck.latest_checkpoint(ckpt_dir) if cfg.resume else None
    if cfg.resume and latest is None:
        raise RunError(f"--resume: no complete checkpoint in {ckpt_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    say = tqdm.write

    reward_kind = cfg.resolved_reward()
    reward_fn, answer_fn = reward_functions(reward_kind, cfg.task)
    task = builtin_task(cfg) if cfg.builtin else None
    max_new_tokens = cfg.resolved_max_new_tokens()
    system_prompt = cfg.system_prompt
    if system_prompt is None and reward_kind == "math":
        system_prompt = MATH_SYSTEM_PROMPT
    train_examples, held_out = load_data(cfg)
    source = model_source(cfg)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(source, device, dtype)
    embedder = make_embedder(cfg)
    pad_id = int(tokenizer.pad_token_id)
    sft_steps = cfg.resolved_sft_steps()
    resolved = {"resolved": {"run_dir": str(run_dir), "model_path": str(source),
                             "max_new_tokens": max_new_tokens,
                             "reward": reward_kind, "sft_steps": sft_steps,
                             "system_prompt": system_prompt, "device": str(device),
                             "dtype": str(dtype).removeprefix("torch.")}}
    if not cfg.resume:
        save_yaml(cfg, run_dir / "config.yaml", resolved)

    summary_path = run_dir / "eval_summary.json"
    evals: dict[str, Any] = {}
    if summary_path.is_file():
        evals = json.loads(summary_path.read_text(encoding="utf-8"))

    def do_eval(name: str, label: str) -> None:
        if not held_out:
            return
        res = evaluate(model, tokenizer, held_out, reward_fn=reward_fn, answer_fn=answer_fn,
                       n=cfg.eval_n, ks=[k for k in cfg.ks() if k <= cfg.eval_n],
                       temperature=cfg.eval_temperature, top_p=cfg.top_p,
                       max_new_tokens=max_new_tokens, seed=cfg.seed + 12345,
                       batch_size=cfg.eval_batch_size, system_prompt=system_prompt,
                       progress=False,
                       feature_fn=lambda b: rollout_features(model, b, pad_id, cfg.temperature),
                       embed_fn=embedder.embed if embedder is not None else None,
                       class_fn=task.problem_class if task is not None else None,
                       rare_fn=task.rare_strategy if task is not None else None)
        res["when"] = label
        evals[name] = res
        ck.write_text_atomic(summary_path, json.dumps(evals, indent=2) + "\n")
        say(f"eval {label}: pass@1 {res['pass@1']:.3f}  " + "  ".join(
            f"{k} {v:.3f}" for k, v in res.items() if k.startswith(("pass@", "maj@"))
            and k != "pass@1"))

    ref_dir = run_dir / "reference"
    with StopRequested() as stop:
        if latest is None:
            # ------------------------------------------------ fresh run: SFT warm start
            if sft_steps > 0:
                if cfg.eval_before_sft:
                    do_eval("before_sft", "before SFT")
                sft_examples = task.sft_filter(train_examples, cfg.seed)
                sft_info = sft_trace_stats(task, sft_examples, len(train_examples), cfg.seed)
                evals["sft"] = sft_info
                ck.write_text_atomic(summary_path, json.dumps(evals, indent=2) + "\n")
                say(f"SFT warm-start: {sft_steps} steps on {len(sft_examples)} problems"
                    + (f"; traces with {task.rare_name}: {sft_info['rare_trace_share']:.1%}"
                       if "rare_trace_share" in sft_info else ""))
                run_sft(model, tokenizer, sft_examples, steps=sft_steps,
                        batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.seed,
                        system_prompt=system_prompt, progress=cfg.progress, should_stop=stop,
                        solution_fn=task.sft_solution)
                if cfg.kl_coef > 0:
                    model.save_pretrained(ref_dir, safe_serialization=True)
            if cfg.eval_start:
                do_eval("start", "start of RL" + (" (after SFT)" if sft_steps > 0 else ""))
            if cfg.warm_start_only:
                return save_warm_start(model, tokenizer, run_dir, evals, summary_path, say)
        ref_model = None
        if cfg.kl_coef > 0:
            ref_src = ref_dir if (ref_dir / "config.json").is_file() else source
            ref_model = load_model(ref_src, device, dtype).eval()
            ref_model.requires_grad_(False)

        rollout_kw: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            enable_sleep_mode=cfg.vllm_sleep, seed=cfg.seed,
            kv_cache_gib=cfg.vllm_kv_cache_gib or None,
            max_model_len=cfg.vllm_max_model_len or None,
        )
        try:  # the vLLM rollout keeps the thread count set above (see g2rl.rollout.vllm)
            rollout = make_rollout(cfg.rollout, model, tokenizer, **rollout_kw)
        except (ImportError, ValueError) as exc:
            raise RunError(f"--rollout {cfg.rollout}: {exc}") from exc
        if cfg.tis_cap > 0 and not hasattr(rollout, "with_logprobs"):
            raise RunError(f"--tis-cap needs the vLLM rollout's log-probs, but --rollout "
                           f"{cfg.rollout} gave {type(rollout).__name__}; use --rollout vllm")
        trainer = Trainer(cfg, model, tokenizer, train_examples, reward_fn, rollout,
                          ref_model=ref_model, system_prompt=system_prompt, embedder=embedder,
                          answer_fn=answer_fn if task is not None else None)
        metrics_path = run_dir / "metrics.jsonl"
        if latest is None:
            ck.save_checkpoint(ckpt_dir, 0, model, tokenizer, trainer.optimizer, trainer.state(),
                               keep=cfg.keep_checkpoints)
            metrics_path.unlink(missing_ok=True)
        else:
            latest, state = ck.load_latest(ckpt_dir, model, trainer.optimizer, say=say)
            trainer.load_state(state)
            rollout.sync_weights(model)
            truncate_metrics(metrics_path, trainer.step_count)
            say(f"resumed {run_dir} from {latest.name} (step {trainer.step_count})")

        prior = read_metrics(metrics_path)
        monitor = CollapseMonitor(window=cfg.collapse_window, cosine=cfg.collapse_cosine,
                                  distinct=cfg.collapse_distinct)
        vocab = lm_head_rows(model)
        entropy_monitor = EntropyMonitor(vocab_size=vocab, window=cfg.collapse_window,
                                         fraction=cfg.entropy_warning)
        for m in prior:  # a resumed run warns at most once, as an uninterrupted one
            monitor.update(m)
            if "entropy" in m:
                entropy_monitor.update(m)
        elapsed0 = prior[-1]["elapsed"] if prior and "elapsed" in prior[-1] else 0.0
        t_loop = time.perf_counter()
        saved_step = trainer.step_count
        bar = tqdm(total=cfg.steps, initial=trainer.step_count, desc=f"{cfg.method}",
                   disable=not cfg.progress, dynamic_ncols=True)
        try:
            while trainer.step_count < cfg.steps:
                if stop():
                    break
                m = trainer.step()
                m["elapsed"] = elapsed0 + time.perf_counter() - t_loop
                warning = monitor.update(m)
                m["collapse_warning"] = monitor.collapsed
                if warning:
                    say(warning)
                diverging = entropy_monitor.update(m)
                m["entropy_warning"] = entropy_monitor.diverged
                if diverging:
                    say(diverging)
                append_jsonl(metrics_path, m)
                step = trainer.step_count
                if step % cfg.save_every == 0 or step == cfg.steps:
                    ck.save_checkpoint(ckpt_dir, step, model, tokenizer, trainer.optimizer,
                                       trainer.state(), keep=cfg.keep_checkpoints)
                    saved_step = step
                bar.update(1)
                bar.set_postfix_str(f"step={step} reward={m['reward_mean']:+.3f} "
                                    f"acc={m['accuracy']:.3f} cos={m['feature_cos_mean']:.2f}")
        finally:
            bar.close()
        if trainer.step_count > saved_step:  # interrupted between saves
            ck.save_checkpoint(ckpt_dir, trainer.step_count, model, tokenizer,
                               trainer.optimizer, trainer.state(), keep=cfg.keep_checkpoints)
        if stop():
            raise Interrupted(stop.signum, saved=True)  # run() reports it

    do_eval("end", f"end of RL (step {trainer.step_count})")
    final = ck.latest_checkpoint(ckpt_dir)
    if "start" in evals and "end" in evals:
        evals["pass@1_gain"] = evals["end"]["pass@1"] - evals["start"]["pass@1"]
    evals["final_checkpoint"] = str(final)
    evals["wall_time_s"] = evals.get("wall_time_s", 0.0) + time.perf_counter() - t_start
    ck.write_text_atomic(summary_path, json.dumps(evals, indent=2) + "\n")
    png = plot_run(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training.png", evals,
                   f"{cfg.method}: {run_dir.name}")
    lines = [f"run directory: {run_dir}", f"final checkpoint: {final}", f"plot: {png}"]
    for key, label in (("before_sft", "before SFT"), ("start", "start (after SFT)"),
                       ("end", "end")):
        if key in evals:
            lines.append(f"held-out pass@1 {label}: {evals[key]['pass@1']:.3f}")
    say("\n".join(lines))
    return evals


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit code."""
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"python -m g2rl.train: error: {exc}", file=sys.stderr)
        return 2
    from g2rl.checkpoint import CheckpointError
    from g2rl.run_lock import RunLockedError
    from g2rl.sft import NonFiniteLossError

    previous = _terminate_on_sigterm()  # outside the RL loop SIGTERM stops at once
    try:
        run(cfg)
    except RunLockedError as exc:
        print(f"python -m g2rl.train: error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, RunError) as exc:
        print(f"python -m g2rl.train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"python -m g2rl.train: stopped: {exc}. The last good checkpoint is kept; "
              "lower --lr or check the data.", file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"python -m g2rl.train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"python -m g2rl.train: error: {exc} (the disk is full or a file-size limit was "
              "reached). The last complete checkpoint is kept; fix the cause, then continue "
              "with --resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return getattr(exc, "exit_code", 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`~g2rl.trainer.Interrupted` (exit code 143, the lock and files
    released cleanly); the RL loop replaces this with finish-the-step-and-save. Returns the
    previous handler (None outside the main thread)."""
    from g2rl.trainer import Interrupted

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
