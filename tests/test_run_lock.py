"""The run-directory lock: one holder at a time, a clear error naming the holder, stale locks of
dead processes taken over, nothing touched by a process that fails to get it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g2rl.run_lock import LOCK_NAME, RunLock, RunLockedError, read_holder

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from g2rl.run_lock import RunLock; "
        "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)")


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p)] = (st.st_ino, st.st_size, st.st_mtime_ns, p.read_bytes() if p.is_file()
                       else None)
    return out


def test_lock_file_names_the_holder_and_goes_away(tmp_path):
    run = tmp_path / "runs" / "a"
    with RunLock(run) as lock:
        assert lock.held and run.is_dir()
        info = read_holder(run)
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert "started" in info and "command" in info
    assert not (run / LOCK_NAME).exists() and not lock.held
    lock.release()  # idempotent


def test_second_process_fails_at_once_naming_the_holder_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        (run / "config.yaml").write_text("a: 1\n")
        before = _snapshot(run)
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError) as err:
            RunLock(run).acquire()
        assert time.perf_counter() - t0 < 2
        msg = str(err.value)
        assert f"PID {proc.pid}" in msg and socket.gethostname() in msg
        assert f"kill {proc.pid}" in msg and "in use" in msg
        assert _snapshot(run) == before
        # the same from another process, through its exit status
        other = subprocess.run([sys.executable, "-c", HOLD, str(run)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and f"PID {proc.pid}" in other.stderr
        assert _snapshot(run) == before
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_holder(run)["pid"] == proc.pid  # the file stays behind
    said: list[str] = []
    with RunLock(run, say=said.append) as lock:
        assert lock.took_over["pid"] == proc.pid
        assert read_holder(run)["pid"] == os.getpid()
    assert len(said) == 1 and "stale" in said[0] and f"PID {proc.pid}" in said[0]


def test_one_process_wins_a_race(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from g2rl.run_lock import RunLock, RunLockedError\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    RunLock(sys.argv[1]).acquire(); print('won', flush=True); "
            "time.sleep(3)\nexcept RunLockedError:\n    print('lost', flush=True)\n")
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", code, str(run), str(start)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["lost"] * 5 + ["won"]


def test_same_process_cannot_take_it_twice(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 12345, "host": "elsewhere.example"}))
    with pytest.raises(RunLockedError, match="another host") as err:
        RunLock(tmp_path).acquire()
    assert f"delete {tmp_path / LOCK_NAME}" in str(err.value)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere.example"


def test_without_flock_the_exclusive_file_protocol_holds(tmp_path, monkeypatch):
    # Some network file systems have no flock; this machine has, so switch it off here.
    monkeypatch.setattr(RunLock, "_try_flock", staticmethod(lambda fd: None))
    run = tmp_path / "run"
    live = _holder(tmp_path / "elsewhere")  # a live PID to put in the lock file
    try:
        with RunLock(run) as lock:
            assert read_holder(run)["pid"] == os.getpid()
            with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
                RunLock(run).acquire()
        assert not (run / LOCK_NAME).exists()
        host = socket.gethostname()
        (run / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": host}))
        with pytest.raises(RunLockedError, match=f"PID {live.pid}"):
            RunLock(run).acquire()
        live.kill()
        live.wait()
        said: list[str] = []
        with RunLock(run, say=said.append) as lock:
            assert lock.took_over["pid"] == live.pid and "stale" in said[0]
    finally:
        live.kill()
        live.wait()
