"""Checkpoints: model (safetensors) + tokenizer + optimizer + RNG states + trainer state.

Layout of a run directory's ``checkpoints/``::

    step_000012/            model.safetensors, config.json, generation_config.json,
                            tokenizer files, optimizer.pt, rng.pt, trainer_state.json
    latest                  text file: the name of the newest complete checkpoint

A checkpoint is written into a temporary directory beside its final place and renamed when
complete (a rename is atomic), then ``latest`` is replaced atomically; only then are checkpoints
beyond the newest ``keep`` removed. A run killed at any moment therefore always finds a complete
last good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        payload = dict(state, step=step)
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved before (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name + "\n")
    prune(root, keep)
    return final


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
