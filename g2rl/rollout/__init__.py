"""Rollout engines: transformers ``generate`` (``hf``) or a colocated vLLM engine (``vllm``)."""

from __future__ import annotations

from typing import Any

from .base import (
    Rollout,
    RolloutBatch,
    build_batch,
    cut_at_eos,
    generation_eos_ids,
    response_mask,
)
from .hf import HFRollout
from .vllm import PINNED_VLLM_VERSION, VLLMRollout, vllm_available

__all__ = [
    "PINNED_VLLM_VERSION",
    "HFRollout",
    "Rollout",
    "RolloutBatch",
    "VLLMRollout",
    "build_batch",
    "cut_at_eos",
    "generation_eos_ids",
    "make_rollout",
    "response_mask",
    "vllm_available",
]

ROLLOUT_KINDS = ("auto", "hf", "vllm")

# Options only the vLLM engine understands; dropped for ``hf``.
_VLLM_ONLY = {"gpu_memory_utilization", "enable_sleep_mode", "dtype", "seed", "max_model_len"}
_HF_ONLY = {"batch_size"}


def make_rollout(kind: str, model: Any, tokenizer: Any, **kw: Any) -> HFRollout | VLLMRollout:
    """Build a rollout engine.

    Args:
        kind: ``"hf"``, ``"vllm"`` or ``"auto"`` (vLLM when it is installed and a CUDA device
            is present, else ``hf``).
        model, tokenizer: the trainer's model and tokenizer.
        **kw: engine options (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
            ``eos_token_ids``; vLLM-only ones such as ``gpu_memory_utilization`` are ignored by
            ``hf`` and ``batch_size`` by ``vllm``).
    """
    if kind not in ROLLOUT_KINDS:
        raise ValueError(f"unknown rollout {kind!r}; choose one of {', '.join(ROLLOUT_KINDS)}")
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        return VLLMRollout(model, tokenizer, **{k: v for k, v in kw.items() if k not in _HF_ONLY})
    return HFRollout(model, tokenizer, **{k: v for k, v in kw.items() if k not in _VLLM_ONLY})
