"""Resume: a run killed mid-step (SIGKILL) restarts from its last checkpoint and ends with
exactly the parameters of an uninterrupted run; Ctrl-C saves a checkpoint; checkpoints are
written atomically."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from g2rl.checkpoint import latest_checkpoint, list_checkpoints
from g2rl.train import main
from g2rl.trainer import KILL_ENV

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--steps", "4", "--prompts-per-step", "3", "--group-size", "4", "--sft-steps", "3",
    "--sft-batch-size", "8", "--train-problems", "100", "--eval-problems", "0",
    "--max-new-tokens", "8", "--micro-batch-size", "5", "--mini-batches", "2",
    "--kl-coef", "0.01", "--threads", "1", "--no-progress",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train(args: list[str], cache: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "g2rl.train", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "G2RL_CACHE": cache, **env}, timeout=300,
    )


def test_killed_run_resumes_with_identical_parameters(tmp_path, cache, restore_threads):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*COMMON, "--cache-dir", cache, "--output-dir", str(straight)]) == 0

    # SIGKILL in the middle of step 3 (after its update, before its checkpoint)
    proc = _train([*COMMON, "--cache-dir", cache, "--output-dir", str(killed)], cache,
                  **{KILL_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(killed / "checkpoints").name == "step_000002"
    assert [m["step"] for m in _metrics(killed)] == [1, 2]

    assert main([*COMMON, "--cache-dir", cache, "--output-dir", str(killed), "--resume"]) == 0
    assert [m["step"] for m in _metrics(killed)] == [1, 2, 3, 4]  # no step lost or repeated
    a = load_file(str(straight / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for ma, mb in zip(_metrics(straight), _metrics(killed), strict=True):
        assert ma["reward_mean"] == mb["reward_mean"] and ma["kl"] == mb["kl"]
    opt_a = torch.load(straight / "checkpoints" / "step_000004" / "optimizer.pt")
    opt_b = torch.load(killed / "checkpoints" / "step_000004" / "optimizer.pt")
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    state = json.loads((killed / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 12
    # keep_checkpoints (2): only the newest two remain
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step_000003",
                                                                          "step_000004"]


def test_ctrl_c_saves_a_checkpoint(tmp_path, cache):
    run = tmp_path / "run"
    args = [*COMMON, "--steps", "500", "--cache-dir", cache, "--output-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "g2rl.train", *args], cwd=REPO,
                            env={**os.environ, "G2RL_CACHE": cache},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        metrics = run / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "checkpoint saved at step" in out + err
    done = len(_metrics(run))
    assert 2 <= done < 500
    assert latest_checkpoint(run / "checkpoints").name == f"step_{done:06d}"


def test_atomic_checkpoint_ignores_partial_writes(tmp_path):
    from g2rl.checkpoint import save_checkpoint

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.config = type("C", (), {"tie_word_embeddings": False})()

        def save_pretrained(self, path, safe_serialization=True):
            from safetensors.torch import save_file

            save_file(self.state_dict(), str(Path(path) / "model.safetensors"))

    w = Wrapped()
    opt = torch.optim.AdamW(w.parameters())
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, w, None, opt, {"data_position": 3}, keep=2)
    # a crash mid-save leaves only a temporary directory behind: it is never picked up
    (root / ".tmp-step_000002-x").mkdir()
    (root / ".tmp-step_000002-x" / "model.safetensors").write_text("partial")
    assert latest_checkpoint(root).name == "step_000001"
    save_checkpoint(root, 2, w, None, opt, {"data_position": 6}, keep=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_000002"]
    assert not list(root.glob(".tmp-*"))

    from g2rl.checkpoint import load_checkpoint

    w2 = Wrapped()
    assert not torch.equal(w2.lin.weight, w.lin.weight)
    state = load_checkpoint(root / "step_000002", w2, torch.optim.AdamW(w2.parameters()))
    assert state == {"data_position": 6, "step": 2}
    assert torch.equal(w2.lin.weight, w.lin.weight) and torch.equal(w2.lin.bias, w.lin.bias)
