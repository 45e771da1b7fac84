"""Worker processes that verify math answers with a wall-clock limit per answer.

math-verify's own timeouts use ``signal.alarm``, which works only in a process's main thread
and cannot interrupt a long call into a C extension that does not check for signals. So
answers are verified in separate processes: each worker handles one answer at a time, in its
main thread, under a CPU-time limit (:func:`g2rl.rewards.time_limit`); the parent kills a
worker that has not answered within ``WALL_FACTOR * limit + GRACE_S`` seconds of wall-clock
time and starts a fresh one.

Workers are started with ``python -c`` (no fork of the trainer's process: no inherited locks,
threads or GPU state, and no re-import of the caller's ``__main__``), ignore SIGINT and SIGTERM
(the parent decides when they stop), die with their parent (``PR_SET_PDEATHSIG`` on Linux,
and end of input everywhere), and have their address space limited to ``MEMORY_LIMIT_MB``.
They speak JSON lines over a private pipe.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from g2rl.rewards import WALL_FACTOR

#: A worker silent for ``WALL_FACTOR * limit + GRACE_S`` wall-clock seconds is killed.
GRACE_S = 1.0
#: Seconds a new worker may take to import math-verify and warm its parser up.
START_TIMEOUT_S = 120.0
#: Address-space limit of a worker (MiB); an answer that needs more scores as failed.
MEMORY_LIMIT_MB = 4096

WORKER_CODE = "from g2rl.verifier_pool import worker_main; worker_main()"
#: Answers a new worker verifies before it takes work: the parser (ANTLR) builds its decision
#: tables lazily, and the first answer of each shape costs up to a second or two otherwise.
_WARMUP = ("\\frac{1}{2}", "(1, 2)", "[0, 1)", "x^2 + 1", "\\sqrt{2}", "2\\pi", "\\{1, 2\\}",
           "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "5\\text{ cm}", "x = 3",
           "\\int_{0}^{1} x^{2}\\,dx", "\\sum_{k=1}^{10} k", "e^{-x^{2}}", "x^{y^{z}}",
           "\\binom{5}{2}", "3!", "\\left(\\frac{1}{2}\\right)^{2}", "(1+(2+(3+4)))")


def default_workers() -> int:
    """``min(4, CPUs)``: verification is cheap once guarded; more only helps bad batches."""
    return max(1, min(4, os.cpu_count() or 1))


class WorkerStartError(RuntimeError):
    """A verifier worker process could not start."""


class _Worker:
    def __init__(self, env: dict[str, str], code: str) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
            close_fds=True,
        )
        self.started = time.monotonic()
        self.ready = False
        self.buffer = b""
        self.job: int | None = None
        self.deadline = 0.0

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def lines(self) -> list[dict[str, Any]] | None:
        """Complete messages read so far; ``None`` at end of output (the worker died)."""
        assert self.proc.stdout is not None
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *done, self.buffer = self.buffer.split(b"\n")
        return [json.loads(x) for x in done if x.strip()]

    def error_tail(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


class VerifierPool:
    """Up to ``workers`` verifier processes, started on first use and kept between calls."""

    def __init__(self, workers: int | None = None, *, worker_code: str | None = None) -> None:
        """``worker_code``: the ``python -c`` program of a worker (default: run
        :func:`worker_main`); tests use it to start workers with a changed verifier."""
        self.size = default_workers() if not workers else int(workers)
        self._code = worker_code or WORKER_CODE
        if self.size < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.kills = 0  # workers killed for overrunning (for tests and logs)
        self._start_error = ""
        root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        self._env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""),
                     "OMP_NUM_THREADS": "1"}

    # ---------------------------------------------------------------- public
    def verify(self, pairs: Sequence[tuple[str, str]], timeout_s: float
               ) -> list[tuple[str, bool]]:
        """``(status, correct)`` of each ``(answer, gold)`` pair (see
        :func:`g2rl.rewards.verify_answer`) with a CPU-time limit of ``timeout_s`` per answer;
        an answer whose worker has not answered within ``WALL_FACTOR * timeout_s + GRACE_S``
        wall-clock seconds, or died, is ``("timeout", False)`` or ``("error", False)``."""
        with self._lock:
            if os.getpid() != self._pid:  # a forked child must not share the parent's pipes
                self._workers, self._pid = [], os.getpid()
            try:
                return self._run(list(pairs), float(timeout_s))
            except BaseException:  # e.g. Ctrl-C: a busy worker's late answer must not be
                for w in [w for w in self._workers if w.job is not None]:  # read as another's
                    w.kill()
                    self._workers.remove(w)
                raise

    def prestart(self) -> None:
        """Start the workers now, without waiting: they import math-verify and warm up while
        the caller does other work (e.g. the first rollouts)."""
        with self._lock:
            if os.getpid() != self._pid:
                self._workers, self._pid = [], os.getpid()
            self._workers = [w for w in self._workers if w.proc.poll() is None]
            while len(self._workers) < self.size:
                self._workers.append(_Worker(self._env, self._code))

    def close(self) -> None:
        """Stop every worker (end of input, then a kill for any still running)."""
        with self._lock:
            if os.getpid() != self._pid:
                self._workers = []
                return
            for w in self._workers:
                try:
                    if w.proc.stdin is not None:
                        w.proc.stdin.close()
                except OSError:
                    pass
            deadline = time.monotonic() + 2.0
            for w in self._workers:
                try:
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                w.kill()
            self._workers = []

    # ---------------------------------------------------------------- the loop
    def _run(self, pairs: list[tuple[str, str]], timeout: float) -> list[tuple[str, bool]]:
        results: list[tuple[str, bool] | None] = [None] * len(pairs)
        queue = deque(range(len(pairs)))
        self._workers = [w for w in self._workers if w.proc.poll() is None]
        while len(self._workers) < min(self.size, len(pairs)):
            self._workers.append(_Worker(self._env, self._code))
        failed_starts = 0
        with selectors.DefaultSelector() as sel:
            for w in self._workers:
                sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            while queue or any(w.job is not None for w in self._workers):
                for w in self._workers:
                    while w.ready and w.job is None and queue:
                        i = queue.popleft()
                        try:
                            w.send({"pred": pairs[i][0], "gold": pairs[i][1],
                                    "timeout": timeout})
                        except OSError:  # died since its last message: retry elsewhere
                            queue.appendleft(i)
                            w.ready = False
                            break
                        w.job = i
                        w.deadline = time.monotonic() + WALL_FACTOR * timeout + GRACE_S
                now = time.monotonic()
                deadlines = [w.deadline if w.job is not None else w.started + START_TIMEOUT_S
                             for w in self._workers if w.job is not None or not w.ready]
                wait = max(0.0, min(deadlines) - now) if deadlines else 0.05
                for key, _ in sel.select(timeout=min(wait, 1.0)):
                    w = key.data
                    msgs = w.lines()
                    if msgs is None:
                        sel.unregister(w.proc.stdout)
                        failed_starts += self._replace(w, sel, results, "error",
                                                       started=w.ready)
                        continue
                    for m in msgs:
                        if m.get("ready"):
                            w.ready = True
                            failed_starts = 0
                        elif w.job is not None:
                            results[w.job] = (str(m["status"]), bool(m["correct"]))
                            w.job = None
                now = time.monotonic()
                for w in list(self._workers):
                    if w.job is not None and now > w.deadline:
                        self.kills += 1
                        sel.unregister(w.proc.stdout)
                        self._replace(w, sel, results, "timeout", started=True)
                    elif not w.ready and now > w.started + START_TIMEOUT_S:
                        sel.unregister(w.proc.stdout)
                        failed_starts += self._replace(w, sel, results, "error", started=False)
                if failed_starts >= 2 * self.size:
                    self._kill_all()
                    raise WorkerStartError(
                        "math-verify worker processes could not start (python -c 'from "
                        "g2rl.verifier_pool import worker_main'): "
                        + (self._start_error or "no output"))
        return [r if r is not None else ("error", False) for r in results]

    def _replace(self, w: _Worker, sel: selectors.BaseSelector,
                 results: list[tuple[str, bool] | None], status: str, *, started: bool) -> int:
        """Kill ``w``, record ``status`` for its answer, start a fresh worker; returns 1 when
        ``w`` never became ready (a failed start)."""
        if w.job is not None:
            results[w.job] = (status, False)
            w.job = None
        if not started:
            self._start_error = w.error_tail()
        w.kill()
        self._workers.remove(w)
        fresh = _Worker(self._env, self._code)
        self._workers.append(fresh)
        sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
        return 0 if started else 1

    def _kill_all(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []


_SHARED: dict[int, VerifierPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int | None = None) -> VerifierPool:
    """The process-wide pool of ``workers`` processes (default :func:`default_workers`),
    created on first use and closed at exit."""
    size = default_workers() if not workers else int(workers)
    with _SHARED_LOCK:
        pool = _SHARED.get(size)
        if pool is None:
            pool = _SHARED[size] = VerifierPool(size)
        return pool


@atexit.register
def close_shared_pools() -> None:
    with _SHARED_LOCK:
        for pool in _SHARED.values():
            pool.close()
        _SHARED.clear()


# ---------------------------------------------------------------------- the worker
def worker_main() -> None:
    """Entry point of a worker: read ``{"pred", "gold", "timeout"}`` lines from stdin, write
    ``{"status", "correct"}`` lines to the original stdout (anything else printed goes to
    stderr)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    _limit_memory(MEMORY_LIMIT_MB)
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    sys.stdout = sys.stderr
    from g2rl.rewards import verify_answer

    for answer in _WARMUP:
        verify_answer(answer, answer, 10.0)
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        status, correct = verify_answer(req["pred"], req["gold"], float(req["timeout"]))
        out.write(json.dumps({"status": status, "correct": correct}) + "\n")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (a worker stuck in a long C
    call would otherwise outlive a killed trainer). Linux sends it when the parent *thread*
    that started the worker ends; the pool then starts a fresh worker on its next call."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent is already gone
            os._exit(0)
    except (OSError, AttributeError):
        pass


def _limit_memory(megabytes: int) -> None:
    try:
        import resource

        limit = megabytes * 1024 * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
