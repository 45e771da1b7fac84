"""One process per run directory: a lock file holding the PID, host and command of its holder.

The lock is ``RUN_DIR/g2rl.lock``, held with ``flock`` (exclusive, non-blocking) for the whole
run. The kernel releases an ``flock`` when its holder dies, however it dies, so a lock file
left by a killed run is *stale*: the next process takes it over and says so. A lock held by a
live process makes :meth:`RunLock.acquire` raise :class:`RunLockedError` at once, naming the
holder, without writing anything. The holder removes the file when it ends normally.

A lock file written on another host is never taken over (that process may be alive; this one
cannot tell): the error says to delete the file if that run is gone. On a file system without
``flock`` (rare; some network file systems) the file is created with ``O_EXCL`` instead and a
lock from a dead PID on this host is stale.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "g2rl.lock"


class RunLockedError(RuntimeError):
    """The run directory is in use by another process (the message names it)."""


class RunLock:
    """The lock of one run directory: ``with RunLock(run_dir) as lock: ...``.

    Args:
        run_dir: the run directory (created if missing, with its parents).
        say: called with a message when a stale lock is taken over (default: print to stderr).
    """

    def __init__(self, run_dir: str | os.PathLike, say: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._fd: int | None = None
        self._flock = True
        self.took_over: dict[str, Any] | None = None

    # ---------------------------------------------------------------- public
    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` (immediately; never waits)."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retries only when a releasing holder unlinked the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                created = False
            try:
                got = self._try_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if got is None:  # no flock on this file system: the O_EXCL protocol
                self._flock = False
                if created:
                    self._fd = fd
                    self._write(None)
                    return self
                os.close(fd)
                return self._acquire_exclusive()
            if not got:
                holder = _read(fd, wait=True)
                os.close(fd)
                raise RunLockedError(self._busy_message(holder))
            if not self._same_file(fd):
                os.close(fd)
                continue
            previous = _read(fd)
            if previous and previous.get("host") != socket.gethostname():
                os.close(fd)
                raise RunLockedError(self._busy_message(previous, remote=True))
            self._fd = fd
            self._write(previous)
            return self
        raise RunLockedError(f"could not lock {self.path}: the lock file keeps being replaced")

    def release(self) -> None:
        """Remove the lock file and release the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._same_file(fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---------------------------------------------------------------- details
    @staticmethod
    def _try_flock(fd: int) -> bool | None:
        """True: locked; False: held by another process; None: flock is not supported."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _acquire_exclusive(self) -> RunLock:
        """The ``O_EXCL`` protocol, for file systems without ``flock``."""
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o644)
            except FileExistsError:
                try:
                    rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                holder = _read(rfd, wait=True)
                age = time.time() - os.fstat(rfd).st_mtime
                os.close(rfd)
                local = holder.get("host") == socket.gethostname()
                dead = local and not _pid_alive(int(holder.get("pid", -1)))
                if dead or (not holder and age > 10):  # empty: its writer died at once
                    stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                    try:  # one contender wins this rename; the others retry
                        os.rename(self.path, stale)
                    except FileNotFoundError:
                        continue
                    stale.unlink(missing_ok=True)
                    self.took_over = holder
                    self._say(self._stale_message(holder))
                    continue
                raise RunLockedError(self._busy_message(
                    holder, remote=bool(holder) and not local)) from None
            self._fd = fd
            self._write(None)
            return self
        raise RunLockedError(f"could not lock {self.path}: the lock file keeps being replaced")

    def _write(self, previous: dict[str, Any] | None) -> None:
        assert self._fd is not None
        if previous and int(previous.get("pid", -1)) != os.getpid():
            self.took_over = previous
            self._say(self._stale_message(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _busy_message(self, holder: dict[str, Any], *, remote: bool = False) -> str:
        who = _describe(holder)
        msg = (f"run directory {self.run_dir} is in use by another process ({who}); only one "
               "process may train in a run directory at a time. ")
        if remote:
            return msg + (f"That process runs on another host, so this one cannot tell whether "
                          f"it is still alive: if it is not, delete {self.path} and run again.")
        pid = holder.get("pid")
        if pid and holder.get("host") == socket.gethostname() and not _pid_alive(int(pid)):
            return msg + (f"PID {pid} has exited, but a process it started still holds the "
                          f"lock; find it with: fuser -v {self.path}")
        stop = f"or stop it (kill {pid}) " if pid else ""
        return msg + f"Wait for it to finish {stop}and run again (lock file: {self.path})."

    def _stale_message(self, holder: dict[str, Any]) -> str:
        return (f"taking over the stale lock of {self.run_dir} left by {_describe(holder)}, "
                "which is no longer running")


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that left no details"
    parts = [f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if holder.get("command"):
        parts.append(f"command: {holder['command']}")
    return ", ".join(parts)


def _read(fd: int, *, wait: bool = False) -> dict[str, Any]:
    """The holder's details from an open lock file ({} when empty or unreadable); with
    ``wait``, retry briefly, as a live holder may be writing them right now."""
    attempts = 4 if wait else 1
    for attempt in range(attempts):
        try:
            raw = os.pread(fd, 4096, 0)
        except OSError:
            return {}
        if raw.strip():
            try:
                data = json.loads(raw.decode(errors="replace"))
                return data if isinstance(data, dict) else {}
            except json.JSONDecodeError:
                pass
        if attempt < attempts - 1:
            time.sleep(0.05)
    return {}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunLockedError` (naming the holder) when a live process holds
    ``run_dir``'s lock; read-only: creates, writes and removes nothing."""
    lock = RunLock(run_dir)
    try:
        fd = os.open(lock.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if lock._try_flock(fd) is False:
            raise RunLockedError(lock._busy_message(_read(fd, wait=True)))
    finally:
        os.close(fd)  # also drops the flock this probe may have taken


def read_holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The details in ``run_dir``'s lock file ({} when there is none)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)
