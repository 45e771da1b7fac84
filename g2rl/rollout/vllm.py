"""Rollouts with an in-process vLLM engine colocated with the trainer (CUDA only).

Written against **vLLM 0.32.0** (the last release built against torch 2.13.0); the API used:

- ``vllm.LLM(model=..., tokenizer=..., dtype=..., gpu_memory_utilization=...,
  enable_sleep_mode=..., seed=..., **engine_kwargs)`` (``vllm/entrypoints/llm.py``);
- ``LLM.generate(prompts, sampling_params, use_tqdm=...)`` with ``vllm.TokensPrompt`` inputs
  (``vllm/inputs/llm.py``) and ``vllm.SamplingParams(n, temperature, top_p, top_k, seed,
  max_tokens, stop_token_ids, detokenize, ...)`` (``vllm/sampling_params.py``); outputs are
  ``RequestOutput.outputs[k].token_ids`` / ``.finish_reason`` (``vllm/outputs.py``);
- ``LLM.apply_model(fn)`` (runs ``fn(model)`` in each worker; in-process when
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``vllm/v1/engine/llm_engine.py``) and the model's
  ``load_weights(iterable of (hf_name, tensor))`` (``vllm/model_executor/models/qwen3.py``);
- ``LLM.reset_prefix_cache()``, ``LLM.sleep(level)`` and ``LLM.wake_up(tags)``.

Nothing in this module has run on this project's CPU machines: vLLM needs a CUDA GPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .base import RolloutBatch, build_batch, generation_eos_ids

__all__ = [
    "PINNED_VLLM_VERSION",
    "VLLMRollout",
    "import_vllm",
    "vllm_available",
    "named_weights_for_vllm",
    "outputs_to_completions",
]

PINNED_VLLM_VERSION = "0.32.0"

_INSTALL_HINT = (
    "the vLLM rollout needs vLLM and a CUDA GPU: install it with `pip install -e .[vllm]` "
    f"(vllm=={PINNED_VLLM_VERSION}) on a machine with an NVIDIA GPU, or use --rollout hf"
)

# Wrapper prefixes that never exist in the engine's parameter names.
_WRAPPER_PREFIXES = (
    "_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."
)


def import_vllm() -> Any:
    """Import vLLM, or raise an ImportError saying how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"vllm is not installed: {_INSTALL_HINT}") from exc
    return vllm


def vllm_available() -> bool:
    """Whether vLLM is importable and a CUDA device is present (without importing vLLM)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def named_weights_for_vllm(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of the trainer model under Hugging Face checkpoint names.

    Tied weights are yielded once (under the first name, e.g. the embedding; vLLM ties the
    LM head itself), wrapper prefixes (``torch.compile``, DDP, activation checkpointing) are
    stripped and tensors are detached (no copy).
    """
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        ptr = tensor.data_ptr()
        if tensor.numel() and ptr in seen:
            continue
        seen.add(ptr)
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, tensor.detach()


def outputs_to_completions(
    outputs: Sequence[Any], n: int
) -> tuple[list[list[int]], list[str | None]]:
    """Flatten vLLM ``RequestOutput``s (one per prompt, ``n`` samples each) to plain lists.

    Returns:
        ``P * n`` generated id lists (grouped by prompt) and their finish reasons.
    """
    completions: list[list[int]] = []
    reasons: list[str | None] = []
    for out in outputs:
        samples = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {n}")
        for sample in samples:
            completions.append([int(t) for t in sample.token_ids])
            reasons.append(sample.finish_reason)
    return completions, reasons


class VLLMRollout:
    """An in-process ``vllm.LLM`` colocated with the trainer.

    The engine is built from the trainer model's current weights (saved with
    ``save_pretrained`` to a temporary directory together with the tokenizer);
    :meth:`sync_weights` pushes the trainer's weights into it after every optimizer step.
    With ``enable_sleep_mode`` the engine can release its GPU memory between rollouts
    (:meth:`sleep` / :meth:`wake_up`); weights dropped by ``sleep(2)`` are pushed again before
    the next generation.

    The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before it is
    built), so weights are copied GPU to GPU without serialisation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError(f"no CUDA device: {_INSTALL_HINT}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.enable_sleep_mode = enable_sleep_mode
        self.eos_token_ids = (
            [int(e) for e in eos_token_ids]
            if eos_token_ids
            else generation_eos_ids(model, tokenizer)
        )
        # "awake", "asleep1" (weights offloaded), "asleep2" (weights discarded) or
        # "weights_awake" (weights woken and synced, KV cache still released).
        self._state = "awake"
        # In-process engine core: apply_model runs our function directly on the worker model.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._dir = tempfile.mkdtemp(prefix="g2rl-vllm-")
        try:
            model.save_pretrained(self._dir, safe_serialization=True)
            tokenizer.save_pretrained(self._dir)
            if max_model_len is not None:
                engine_kwargs["max_model_len"] = max_model_len
            self.llm = vllm.LLM(
                model=self._dir,
                tokenizer=self._dir,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode,
                seed=seed,
                **engine_kwargs,
            )
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    # -- generation ---------------------------------------------------------------------

    def _sampling_params(self, n: int, seed: int | None) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_new_tokens,
            seed=seed,
            stop_token_ids=list(self.eos_token_ids),
            skip_special_tokens=True,
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]], n: int, *, seed: int | None = None
                 ) -> RolloutBatch:
        """Sample ``n`` responses for each prompt (token ids as sampled by the engine).

        With ``seed``, prompt ``i`` uses seed ``seed + i * n`` (vLLM gives sample ``k`` of a
        request ``seed + k``), so every sample has its own stream.
        """
        from vllm import TokensPrompt

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return RolloutBatch([], [], [], [], n=n)
        self.wake_up()
        inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        if seed is None:
            params: Any = self._sampling_params(n, None)
        else:
            params = [self._sampling_params(n, seed + i * n) for i in range(len(prompts))]
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        completions, _ = outputs_to_completions(outputs, n)
        return build_batch(
            prompts, completions, n, self.eos_token_ids,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
        )

    # -- weights ------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module | None = None) -> None:
        """Copy the trainer's current weights into the engine and drop its prefix cache.

        Asleep, only the weights' memory is woken (the KV cache stays released until the next
        :meth:`generate`).
        """
        model = self.model if model is None else model
        self.model = model
        if self._state in ("asleep1", "asleep2"):
            self.llm.wake_up(tags=["weights"])
            self._state = "weights_awake"
        weights = list(named_weights_for_vllm(model))

        def load(engine_model: torch.nn.Module) -> None:
            engine_model.load_weights(weights)  # returns the set of loaded names; not needed

        self.llm.apply_model(load)
        self.llm.reset_prefix_cache()

    # -- memory -------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Release the engine's GPU memory (level 1: offload weights to CPU; 2: discard them).

        A no-op unless the rollout was built with ``enable_sleep_mode=True``.
        """
        if not self.enable_sleep_mode:
            return
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self._state == "awake":
            self.llm.sleep(level=level)
            self._state = f"asleep{level}"

    def wake_up(self) -> None:
        """Re-allocate the engine's memory; weights discarded by ``sleep(2)`` and not pushed
        since are pushed again from the trainer model."""
        if self._state == "awake":
            return
        if self._state == "weights_awake":  # sync_weights already woke and filled the weights
            self.llm.wake_up(tags=["kv_cache"])
            self._state = "awake"
            return
        discarded = self._state == "asleep2"
        self.llm.wake_up()
        self._state = "awake"
        if discarded:
            self.sync_weights(self.model)

    def close(self) -> None:
        """Free the engine and its temporary checkpoint."""
        self.llm = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:  # best effort
        d = getattr(self, "_dir", None)
        if d:
            shutil.rmtree(d, ignore_errors=True)
