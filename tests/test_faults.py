"""Fault injection on the tiny built-in run: SIGKILL at random points and in the middle of
writing a checkpoint, SIGTERM, a second process on the same run directory, a full disk while
saving, a damaged latest checkpoint. Every chain of faults ends, after ``--resume``, with the
final weights, optimizer state and metrics of an uninterrupted run (timing fields aside).

About two minutes on two cores; each launch has its own timeout.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import COMMON, assert_same_run, metrics, start, train

from g2rl.checkpoint import KILL_SAVE_ENV, check_checkpoint, latest_checkpoint
from g2rl.run_lock import LOCK_NAME, read_holder
from g2rl.train import main
from g2rl.trainer import Interrupted, StopRequested

STEPS = 6
ARGS = [*COMMON, "--steps", str(STEPS)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted run (in this process)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    try:
        assert main([*ARGS, "--cache-dir", cache, "--output-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def _args(run: Path, cache: str, *extra: str) -> list[str]:
    return [*ARGS, "--cache-dir", cache, "--output-dir", str(run), *extra]


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns,
                     p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _wait_for(cond, proc, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def test_sigkills_and_a_full_disk_then_the_uninterrupted_result(tmp_path, cache, reference):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. SIGKILL while writing checkpoint 2: the model file is written, the optimizer not yet
    proc = train(_args(run, cache), cache, **{KILL_SAVE_ENV: "2:files"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(ckpts).name == "step_000001"
    partial = list(ckpts.glob(".tmp-step_000002-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert [m["step"] for m in metrics(run)] == [1, 2]
    dead = read_holder(run)["pid"]  # the lock file stays behind, naming the dead process

    # 2. resume (taking the stale lock over); SIGKILL after checkpoint 3 is renamed into
    #    place but before `latest` names it
    proc = train(_args(run, cache, "--resume"), cache, **{KILL_SAVE_ENV: "3:renamed"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "taking over the stale lock" in proc.stderr and f"PID {dead} " in proc.stderr
    assert "from step_000001" in proc.stdout
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert check_checkpoint(ckpts / "step_000003") is None
    assert not list(ckpts.glob(".tmp-*"))  # the partial write of step 1 was cleaned up

    # 3. resume with a file-size limit between the model's size and the optimizer's: the save
    #    of step 3 fails, the error says why, checkpoint 2 stays the last complete one
    model = (ckpts / "step_000002" / "model.safetensors").stat().st_size
    optim = (ckpts / "step_000002" / "optimizer.pt").stat().st_size
    limit = (model + optim) // 2
    assert model < limit < optim

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = train(_args(run, cache, "--resume"), cache, preexec_fn=full_disk)
    assert proc.returncode == 1, proc.stderr
    assert "could not write checkpoint step_000003" in proc.stderr
    assert "file-size limit" in proc.stderr and "ulimit -f" in proc.stderr
    assert "the last complete checkpoint is step_000002" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(ckpts).name == "step_000002"
    assert check_checkpoint(ckpts / "step_000002") is None
    assert not list(ckpts.glob(".tmp-*")) and not (run / LOCK_NAME).exists()

    # 4. resume and SIGKILL at a random moment of the remaining steps
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    rows = metrics(reference)
    per_step = (rows[-1]["elapsed"] - rows[0]["elapsed"]) / (len(rows) - 1)
    delay = rng.uniform(0, 0.9 * per_step * (STEPS - 2))
    proc = start(_args(run, cache, "--resume"), cache)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "resumed" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (-signal.SIGKILL, 0), (seed, delay)

    # 5. resume to the end: the uninterrupted run's result
    proc = train(_args(run, cache, "--resume"), cache)
    assert proc.returncode == 0, (seed, delay, proc.stderr)
    assert_same_run(reference, run, STEPS)


def test_second_process_sigterm_and_a_damaged_checkpoint_then_the_uninterrupted_result(
        tmp_path, cache, reference):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = start(_args(run, cache), cache)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file()
                  and len(metrics(run)) >= 1, proc)
        proc.send_signal(signal.SIGSTOP)  # hold it still while others try the directory
        before = _snapshot(run)
        # 1. a second process, as a relaunch (--resume) or as a repeated command: it stops
        #    within seconds, names the holder and changes nothing, not even config.yaml
        for extra in (["--resume"], []):
            t0 = time.time()
            other = train(_args(run, cache, *extra), cache, timeout=120)
            assert other.returncode == 3, other.stderr
            assert time.time() - t0 < 60
            assert f"PID {proc.pid} on host {socket.gethostname()}" in other.stderr
            assert "in use by another process" in other.stderr
            assert _snapshot(run) == before
        # 2. SIGTERM: the step in progress is finished, a checkpoint saved, exit code 143
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    done = len(metrics(run))
    assert 1 <= done < STEPS
    assert latest_checkpoint(ckpts).name == f"step_{done:06d}"
    assert f"interrupted by SIGTERM: checkpoint saved at step {done}" in err
    assert f"python -m g2rl.train --resume --output-dir {run}" in err
    assert not (run / LOCK_NAME).exists()

    # 3. damage the newest checkpoint (one byte, same size): resume falls back to the one before
    f = ckpts / f"step_{done:06d}" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    proc = train(_args(run, cache, "--resume"), cache)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert f"step_{done:06d} is damaged (model.safetensors does not match its checksum)" in said
    assert f"resuming from step_{done - 1:06d}" in said
    assert_same_run(reference, run, STEPS)


def test_sigterm_at_a_random_moment_in_process(tmp_path, cache, reference):
    """SIGTERM anywhere in a run (setup, SFT, RL steps, saving) gives exit code 143, releases
    the lock and leaves a run that finishes as the uninterrupted one."""
    run = tmp_path / "run"
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 3.0)
    threads = torch.get_num_threads()
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a late signal must not kill us
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        code = main(_args(run, cache))
        timer.join()
        if code == 0:
            pytest.skip(f"the run ended before the signal (delay {delay:.2f} s)")
        assert code == 143, (seed, delay)
        assert not (run / LOCK_NAME).exists()
        resume = ["--resume"] if latest_checkpoint(run / "checkpoints") else []
        assert main(_args(run, cache, *resume)) == 0, (seed, delay)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)
    assert_same_run(reference, run, STEPS)


def test_stop_requested_semantics():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.signum == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM does not abort
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C does
        assert err.value.exit_code == 130 and not err.value.saved
    with pytest.raises(Interrupted) as err, StopRequested():
        os.kill(os.getpid(), signal.SIGINT)
        raise KeyboardInterrupt  # e.g. the SFT warm-start stopping on request
    assert err.value.exit_code == 130 and isinstance(err.value, KeyboardInterrupt)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
