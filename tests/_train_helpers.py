"""Helpers of the resume and fault-injection tests: a tiny built-in run launched as a
subprocess, and the comparison of two runs' final state (weights, optimizer, metrics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
#: A run of a few seconds: the tiny built-in default with very small sizes.
COMMON = [
    "--steps", "4", "--prompts-per-step", "3", "--group-size", "4", "--sft-steps", "3",
    "--sft-batch-size", "8", "--train-problems", "100", "--eval-problems", "0",
    "--max-new-tokens", "8", "--micro-batch-size", "5", "--mini-batches", "2",
    "--kl-coef", "0.01", "--threads", "1", "--no-progress",
]


def metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of ``run/metrics.jsonl``."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train_env(cache: str, **env: str) -> dict[str, str]:
    """The environment of a launched run (unbuffered, so that a killed run's output is kept)."""
    return {**os.environ, "G2RL_CACHE": cache, "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **env}


def train(args: list[str], cache: str, timeout: float = 300, **env: Any
          ) -> subprocess.CompletedProcess:
    """``python -m g2rl.train ARGS`` to completion (``env`` extends the environment;
    ``preexec_fn`` is passed on to ``subprocess.run``)."""
    preexec = env.pop("preexec_fn", None)
    return subprocess.run(
        [sys.executable, "-m", "g2rl.train", *args], cwd=REPO, capture_output=True, text=True,
        env=train_env(cache, **env), timeout=timeout, preexec_fn=preexec,
    )


def start(args: list[str], cache: str, **env: str) -> subprocess.Popen:
    """``python -m g2rl.train ARGS`` in the background (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "g2rl.train", *args], cwd=REPO,
                            env=train_env(cache, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def deterministic(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its timing fields."""
    return {k: v for k, v in row.items() if not k.startswith(("time", "elapsed"))}


def assert_same_run(expected: Path, got: Path, step: int) -> None:
    """``got`` ended exactly as ``expected``: checkpoint ``step``'s weights, optimizer state
    and trainer state, and every metrics row (timing fields aside)."""
    name = f"step_{step:06d}"
    a = load_file(str(expected / "checkpoints" / name / "model.safetensors"))
    b = load_file(str(got / "checkpoints" / name / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = torch.load(expected / "checkpoints" / name / "optimizer.pt")
    opt_b = torch.load(got / "checkpoints" / name / "optimizer.pt")
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    state = [json.loads((r / "checkpoints" / name / "trainer_state.json").read_text())
             for r in (expected, got)]
    assert state[0] == state[1]
    rows_a, rows_b = metrics(expected), metrics(got)
    assert [r["step"] for r in rows_b] == list(range(1, step + 1))  # none lost or repeated
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert deterministic(ra) == deterministic(rb), ra["step"]
