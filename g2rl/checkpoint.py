"""Checkpoints: model (safetensors) + tokenizer + optimizer + RNG states + trainer state.

Layout of a run directory's ``checkpoints/``::

    step_000012/            model.safetensors, config.json, generation_config.json,
                            tokenizer files, optimizer.pt, rng.pt, trainer_state.json,
                            manifest.json (size and CRC-32 of every other file)
    latest                  text file: the name of the newest complete checkpoint

A checkpoint is written into a temporary directory beside its final place and renamed when
complete (a rename is atomic), then ``latest`` is replaced atomically; only then are checkpoints
beyond the newest ``keep`` removed. A run killed at any moment therefore always finds a complete
last good checkpoint. A write that fails (a full disk, a file-size limit) leaves nothing behind
and raises :class:`CheckpointError`, which says why and which checkpoint is the last complete
one. :func:`load_latest` checks a checkpoint against its manifest before loading it and falls
back to the previous complete one when it is damaged.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

#: Test hook: ``"STEP:STAGE"`` SIGKILLs the process while it saves checkpoint STEP, at STAGE:
#: ``files`` (the model is written, the optimizer not yet), ``renamed`` (the checkpoint is in
#: place, ``latest`` still names the previous one) or ``latest`` (before pruning).
KILL_SAVE_ENV = "G2RL_TEST_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message says why and what is left)."""


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy RNG states."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (write a temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and prune older ones.

    Args:
        root: the ``checkpoints`` directory.
        state: JSON-serialisable trainer state (step, data position, ...); ``step`` is added.
        keep: number of most recent checkpoints kept (>= 1).

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    final = root / f"step_{step:06d}"
    kill_at = _kill_stage(step)
    tmp: Path | None = None
    renamed = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
        model.save_pretrained(tmp, safe_serialization=True)
        if kill_at == "files":
            os.kill(os.getpid(), signal.SIGKILL)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        payload = dict(state, step=step)
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        _write_manifest(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved before (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        renamed = True
        _fsync_dir(root)
        if kill_at == "renamed":
            os.kill(os.getpid(), signal.SIGKILL)
        write_text_atomic(root / "latest", final.name + "\n")
    except Exception as exc:
        # nothing of a failed save stays: not the temporary directory, nor the renamed one
        # that ``latest`` does not name yet
        if renamed or tmp is not None:
            shutil.rmtree(final if renamed else tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(root, final.name, exc)) from exc
    except BaseException:
        if tmp is not None and not renamed:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if kill_at == "latest":
        os.kill(os.getpid(), signal.SIGKILL)
    prune(root, keep)
    return final


def _kill_stage(step: int) -> str | None:
    spec = os.environ.get(KILL_SAVE_ENV, "")
    at, _, stage = spec.partition(":")
    return stage if at.strip().isdigit() and int(at) == step else None


def _write_failure(root: Path, name: str, exc: BaseException) -> str:
    """The message of a failed checkpoint write: what failed, the likely cause, what is left."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors and torch wrap the OS error in their own exceptions
        m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(exc))
        code = int(m.group(1) or m.group(2)) if m else None
    causes = []
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    previous = latest_checkpoint(root)
    needed = _dir_size(previous) if previous is not None else 0
    if code == errno.ENOSPC or (free is not None and free < max(needed, 16 << 20)):
        shown = f"{free / 2**20:.0f} MiB" if free is not None else "no space"
        causes.append(f"the disk is full ({shown} free; a checkpoint needs about "
                      f"{needed / 2**20:.0f} MiB)")
    if code == errno.EDQUOT:
        causes.append("the disk quota is exceeded")
    fsize = _file_size_limit()
    if code == errno.EFBIG or (fsize is not None and code is None and not causes):
        limit = f" of {fsize / 2**20:.1f} MiB" if fsize is not None else ""
        causes.append(f"a file reached this process's file-size limit{limit} (ulimit -f)")
    what = f"{type(exc).__name__}: {exc}"
    cause = f" Likely cause: {'; '.join(causes)}." if causes else ""
    kept = (f"the last complete checkpoint is {previous.name}" if previous is not None
            else "there is no complete checkpoint yet")
    return (f"could not write checkpoint {name} in {root} ({what}).{cause} Nothing of it was "
            f"kept; {kept}. Fix the cause, then continue with --resume.")


def _file_size_limit() -> int | None:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _dir_size(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError:
        return 0


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _write_manifest(ckpt: Path) -> None:
    files = {f.name: {"size": f.stat().st_size, "crc32": _crc32(f)}
             for f in sorted(ckpt.iterdir()) if f.is_file() and f.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """What is wrong with checkpoint ``path`` (a short description), or ``None`` when every
    file matches its manifest (checkpoints written without one are only checked for
    completeness; loading them tells the rest)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return f"incomplete (no {STATE_FILE})"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec.get("size"):
            return f"{name} has {size} bytes, {rec.get('size')} were written"
        if _crc32(f) != rec.get("crc32"):
            return f"{name} does not match its checksum"
    return None


def load_latest(
    root: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    say: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    """Load the newest usable checkpoint under ``root`` (see :func:`load_checkpoint`): a
    damaged one (manifest mismatch, unreadable file) is skipped with a message and the one
    before it is tried. Returns ``(checkpoint path, trainer state)``.

    Raises:
        CheckpointError: no checkpoint under ``root`` can be loaded (the message lists why).
    """
    root = Path(root)
    newest = latest_checkpoint(root)
    candidates = [newest] if newest is not None else []
    candidates += [p for p in reversed(list_checkpoints(root)) if p != newest]
    problems: list[str] = []
    for path in candidates:
        problem = check_checkpoint(path)
        if problem is None:
            try:
                state = load_checkpoint(path, model, optimizer)
            except Exception as exc:  # noqa: BLE001 - any unreadable file: try the previous one
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if problems:
                    say(f"resuming from {path.name}, the newest undamaged checkpoint (skipped: "
                        + "; ".join(problems) + ")")
                return path, state
        problems.append(f"{path.name} is damaged: {problem}")
        say(f"checkpoint {path.name} is damaged ({problem}); trying the previous one")
    if not problems:
        raise CheckpointError(f"no complete checkpoint in {root}")
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (the one ``latest`` names, else the highest step)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if (cand / STATE_FILE).is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints and stale temporary directories."""
    ckpts = list_checkpoints(root)
    for p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer and RNG states) from checkpoint ``path`` into the given
    objects; return its trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {STATE_FILE}): {path}")
    device = next(model.parameters()).device
    weights: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no *.safetensors file")
    for f in files:
        weights.update(load_file(str(f), device=str(device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    if optimizer is not None:
        opt_file = path / "optimizer.pt"
        if not opt_file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no optimizer.pt")
        optimizer.load_state_dict(torch.load(opt_file, map_location=device, weights_only=True))
    if restore_rng and (path / "rng.pt").is_file():
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads(state_file.read_text(encoding="utf-8"))
