"""Resume: a run killed mid-step (SIGKILL) restarts from its last checkpoint and ends with
exactly the parameters of an uninterrupted run; Ctrl-C saves a checkpoint; checkpoints are
written atomically."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import COMMON, REPO, assert_same_run, metrics, train, train_env

from g2rl.checkpoint import latest_checkpoint, list_checkpoints
from g2rl.train import main
from g2rl.trainer import KILL_ENV


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_killed_run_resumes_with_identical_parameters(tmp_path, cache, restore_threads):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*COMMON, "--cache-dir", cache, "--output-dir", str(straight)]) == 0

    # SIGKILL in the middle of step 3 (after its update, before its checkpoint)
    proc = train([*COMMON, "--cache-dir", cache, "--output-dir", str(killed)], cache,
                 **{KILL_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(killed / "checkpoints").name == "step_000002"
    assert [m["step"] for m in metrics(killed)] == [1, 2]

    assert main([*COMMON, "--cache-dir", cache, "--output-dir", str(killed), "--resume"]) == 0
    assert_same_run(straight, killed, 4)  # weights, optimizer, every metric (timing aside)
    state = json.loads((killed / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 12
    # keep_checkpoints (2): only the newest two remain
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["step_000003",
                                                                          "step_000004"]


def test_ctrl_c_saves_a_checkpoint(tmp_path, cache):
    run = tmp_path / "run"
    args = [*COMMON, "--steps", "500", "--cache-dir", cache, "--output-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "g2rl.train", *args], cwd=REPO,
                            env=train_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        rows = run / "metrics.jsonl"
        while time.time() < deadline:
            if rows.is_file() and len(rows.read_text().splitlines()) >= 2:
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
    done = len(metrics(run))
    assert 2 <= done < 500
    assert latest_checkpoint(run / "checkpoints").name == f"step_{done:06d}"


class Wrapped(torch.nn.Module):
    """A model with the two methods checkpoints use (``save_pretrained``, ``config``)."""

    def __init__(self, size: int = 2):
        super().__init__()
        self.lin = torch.nn.Linear(size, size)
        self.config = type("C", (), {"tie_word_embeddings": False})()

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(Path(path) / "model.safetensors"))


def test_atomic_checkpoint_ignores_partial_writes(tmp_path):
    from g2rl.checkpoint import save_checkpoint

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


def _saved_steps(root, steps, size=2):
    from g2rl.checkpoint import save_checkpoint

    models = []
    for step in steps:
        w = Wrapped(size)
        save_checkpoint(root, step, w, None, torch.optim.AdamW(w.parameters()),
                        {"data_position": 3 * step}, keep=3)
        models.append(w)
    return models


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state", "manifest"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    from g2rl.checkpoint import check_checkpoint, load_latest

    root = tmp_path / "checkpoints"
    models = _saved_steps(root, [1, 2])
    assert check_checkpoint(root / "step_000002") is None
    f = root / "step_000002" / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":  # same size, one byte changed inside the tensor data
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete":
        (root / "step_000002" / "optimizer.pt").unlink()
    elif damage == "state":
        (root / "step_000002" / "trainer_state.json").write_text("{not json")
    else:
        (root / "step_000002" / "manifest.json").write_text("garbage")
    assert check_checkpoint(root / "step_000002") is not None
    said: list[str] = []
    w = Wrapped()
    path, state = load_latest(root, w, torch.optim.AdamW(w.parameters()), say=said.append)
    assert path.name == "step_000001" and state == {"data_position": 3, "step": 1}
    assert torch.equal(w.lin.weight, models[0].lin.weight)
    assert "step_000002 is damaged" in said[0] and "resuming from step_000001" in said[-1]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    from g2rl.checkpoint import CheckpointError, load_latest

    root = tmp_path / "checkpoints"
    _saved_steps(root, [1])
    (root / "step_000001" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step_000001 is damaged"):
        load_latest(root, Wrapped(), say=lambda m: None)


def test_checkpoints_without_a_manifest_still_load(tmp_path):
    from g2rl.checkpoint import check_checkpoint, load_latest

    root = tmp_path / "checkpoints"
    models = _saved_steps(root, [1])
    (root / "step_000001" / "manifest.json").unlink()  # as written before manifests
    assert check_checkpoint(root / "step_000001") is None
    w = Wrapped()
    assert load_latest(root, w)[0].name == "step_000001"
    assert torch.equal(w.lin.weight, models[0].lin.weight)


def test_failed_write_keeps_the_previous_checkpoint_and_says_why(tmp_path):
    import resource

    from g2rl.checkpoint import CheckpointError, check_checkpoint, save_checkpoint

    root = tmp_path / "checkpoints"
    _saved_steps(root, [1], size=300)  # model.safetensors ~360 kB, optimizer.pt ~720 kB
    w = Wrapped(300)
    opt = torch.optim.AdamW(w.parameters())
    w.lin(torch.zeros(1, 300)).sum().backward()
    opt.step()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(CheckpointError) as err:
            save_checkpoint(root, 2, w, None, opt, {"data_position": 6})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(err.value)
    assert "could not write checkpoint step_000002" in msg and "file-size limit" in msg
    assert "the last complete checkpoint is step_000001" in msg and "--resume" in msg
    assert latest_checkpoint(root).name == "step_000001"
    assert check_checkpoint(root / "step_000001") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # no leftovers
