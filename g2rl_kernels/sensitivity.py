"""Public entry point of the sensitivity kernels: token log-probs, entropies, log-sum-exps and
G2RL sequence features (spec section 1) from hidden states and the LM-head weight, without
materialising the (N, V) logits.

Validates the arguments, normalises the token weights, allocates the float32 outputs and
dispatches: CUDA tensors -> ``impl="chunked"`` (default: per token chunk one cuBLAS logits
GEMM with float32 output and Triton kernels over the chunk, ``ops/sensitivity_chunked_triton.py``)
or ``impl="fused"`` (two-pass Triton kernels that recompute the logits and keep no logits buffer,
``ops/sensitivity_triton.py``); CPU tensors -> the chunked PyTorch path
(``ops/sensitivity_torch.py``).

Conventions:

- ``lse`` is computed for every token, ignored ones included (their logprob and entropy are 0,
  their token feature row is 0, and they count in no sequence feature nor normaliser).
- ``num_seqs`` may be omitted on the CPU (it is then ``seq_index.max() + 1``); on CUDA it is
  required, because deriving it would need a host synchronisation.
- Bad values (the same rule on every backend). ``check_values=True`` (default) scans the values
  and raises a ``ValueError`` naming the first bad row, the input it is in and what is wrong:
  targets outside [0, V) (other than ``ignore_index``), seq_index outside [0, num_seqs),
  negative or non-finite token weights, a non-finite hidden state of a counted token, a
  non-finite row of ``weight`` or entry of ``bias``. It costs one host synchronisation on CUDA
  and no (N, d) or (V, d) temporary. With ``check_values=False`` a non-finite hidden state (or
  logits that overflow float32) stays where it belongs: that token's logprob, entropy, lse and
  token-feature row are non-finite, and so is the feature of its sequence (all NaN) if the
  token counts in it (not ignored, nonzero weight); every other token and sequence gets what it
  would get without that row. An ignored token's hidden state is not checked: if it is non-finite
  only its own ``lse`` is. Out-of-range indices or a non-finite ``weight``/``bias`` with
  ``check_values=False`` give undefined results.
- Scalars: ``num_seqs`` and ``ignore_index`` may be Python or NumPy integers or 0-d integer
  tensors, ``temperature`` a Python or NumPy real or a 0-d tensor. ``bias`` must have the dtype
  of ``weight`` or float32 (every backend adds it in float32). ``token_weights`` without
  ``seq_index`` are refused (they only weight the sequence features).
- 16-bit inputs are never copied whole to float32: the CPU path upcasts one vocabulary chunk of
  W at a time, the Triton kernels one tile at a time.
- The outputs are not differentiable (the features are meant for the no-grad log-prob pass);
  ``weight`` is only read, so tied input/output embeddings are fine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from g2rl_kernels.ops.sensitivity_checks import (
    describe,
    normalised_token_weights,
    validate_sensitivity_args,
)
from g2rl_kernels.ops.sensitivity_torch import sensitivity_torch

PADDED_IGNORE = -100  # targets of masked positions in :func:`sequence_features`


class SensitivityOutput(NamedTuple):
    """Result of :func:`sensitivity` (float32; the reference returns its compute dtype)."""

    logprobs: torch.Tensor  # (N,) log softmax((W h + b) / T)[y]; 0 for ignored tokens
    entropy: torch.Tensor  # (N,) entropy of softmax((W h + b) / T); 0 for ignored tokens
    lse: torch.Tensor  # (N,) logsumexp((W h + b) / T), every token
    seq_features: torch.Tensor | None  # (num_seqs, d) Phi_b, or None without seq_index
    token_features: torch.Tensor | None  # (N, d) phi_t if asked for, else None


def sensitivity(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_token_features: bool = False,
    check_values: bool = True,
    impl: str = "auto",
    _backend: str = "auto",
    _out: SensitivityOutput | None = None,
    _options: dict | None = None,
) -> SensitivityOutput:
    """Token log-probs, entropies, log-sum-exps and G2RL sequence features.

    With z_t = (W h_t + b) / T and p_t = softmax(z_t): phi_t = W[y_t] - p_t @ W, and
    Phi_b = sum_{t in b} a~_t phi_t, a~_t = a_t / (sum_{s in b} a_s + 1e-8), computed as
    (sum_t a~_t e(y_t) - q_b) @ W with q_b = sum_t a~_t p_t (no per-token d-vectors).

    Args:
        hidden: (N, d) final hidden states, float32/bfloat16/float16, CPU or CUDA, any strides.
        weight: (V, d) LM-head weight, dtype and device of ``hidden`` (may be the tied input
            embedding; it is never modified).
        targets: (N,) integer token ids in [0, V), or ``ignore_index``.
        seq_index: (N,) integer sequence id of each token in [0, num_seqs); None: no features.
        num_seqs: number of sequences (int, NumPy integer or 0-d integer tensor); required with
            ``seq_index`` on CUDA.
        token_weights: (N,) float weights a_t >= 0 (default 1 for every counted token); only
            with ``seq_index``.
        bias: (V,) LM-head bias, of the dtype of ``weight`` or float32.
        temperature: T > 0 (a real number, NumPy scalar or 0-d tensor).
        ignore_index: target value of tokens to leave out (not in [0, V)).
        return_token_features: also return phi_t (N, d).
        check_values: scan the values of targets/seq_index/token_weights and the finiteness of
            hidden (counted tokens), weight and bias; a ValueError names the first bad row (one
            host sync on CUDA). Without it a non-finite hidden row stays in its own token's
            outputs and its own sequence's feature (see the module docstring).
        impl: the CUDA design: "chunked" (per chunk of tokens one cuBLAS GEMM for the logits
            into a float32 buffer of at most 1 GiB, then Triton kernels over it: about
            2 N V d flops at GEMM rate), "fused" (no logits buffer: two Triton passes that
            recompute the logits, about 4 N V d flops), or "auto" (chunked; fused where this
            torch does not run ``torch.mm(..., out_dtype=)`` for 16-bit inputs). On CPU tensors
            "auto" and "chunked" run the chunked PyTorch path; "fused" needs CUDA (or the
            interpreter with ``_backend="triton"``).
        _backend: testing hook: "auto" (CUDA -> Triton, CPU -> torch), "torch" or "triton"
            (on CPU tensors only with TRITON_INTERPRET=1).
        _out: testing hook: preallocated float32 outputs to write into (e.g. NaN-poisoned).
        _options: testing hook: ``chunk_size`` and ``vocab_chunk`` (torch path),
            ``num_splits`` and ``blocks`` (fused Triton path), ``chunk_size`` and ``blocks``
            (chunked Triton path).

    Returns:
        :class:`SensitivityOutput` of float32 tensors on the device of ``hidden``.
    """
    checked = validate_sensitivity_args(
        hidden, weight, targets, seq_index=seq_index, num_seqs=num_seqs,
        token_weights=token_weights, bias=bias, temperature=temperature,
        ignore_index=ignore_index, check_values=check_values,
    )
    num_seqs, temperature, ignore_index = checked
    backend = _pick_backend(_backend, hidden)
    impl = _pick_impl(impl, backend, hidden)
    n, d = hidden.shape
    out = _out if _out is not None else _allocate(
        n, d, num_seqs if seq_index is not None else None, return_token_features, hidden.device
    )
    _check_out(out, n, d, num_seqs if seq_index is not None else None, return_token_features,
               hidden.device)
    with torch.no_grad():
        a_norm = None
        if seq_index is not None:
            a_norm = normalised_token_weights(
                targets, seq_index, num_seqs, token_weights, ignore_index
            )
        kwargs = dict(
            seq_index=seq_index, a_norm=a_norm, bias=bias, temperature=temperature,
            ignore_index=ignore_index, logprobs=out.logprobs, entropy=out.entropy, lse=out.lse,
            seq_features=out.seq_features if seq_index is not None else None,
            token_features=out.token_features if return_token_features else None,
            **(_options or {}),
        )
        if backend == "triton" and impl == "chunked":
            from g2rl_kernels.ops.sensitivity_chunked_triton import sensitivity_chunked_triton

            sensitivity_chunked_triton(hidden, weight, targets, **kwargs)
        elif backend == "triton":
            from g2rl_kernels.ops.sensitivity_triton import sensitivity_triton

            sensitivity_triton(hidden, weight, targets, **kwargs)
        else:
            sensitivity_torch(hidden, weight, targets, **kwargs)
    return SensitivityOutput(
        out.logprobs, out.entropy, out.lse,
        out.seq_features if seq_index is not None else None,
        out.token_features if return_token_features else None,
    )


def _pick_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if hidden.is_cuda else "torch"
    if backend == "torch":
        return backend
    if backend == "triton":
        import os

        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError("_backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
        return backend
    raise ValueError(f"_backend must be 'auto', 'torch' or 'triton', got {backend!r}")


IMPLS = ("auto", "chunked", "fused")


def _pick_impl(impl: str, backend: str, hidden: torch.Tensor) -> str:
    """The Triton design to run ("chunked" or "fused"); "chunked" names the torch path too."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if backend == "torch":
        if impl == "fused":
            raise ValueError(
                "impl='fused' is the Triton path: it needs CUDA tensors (on the CPU the chunked "
                "PyTorch path runs; use impl='auto' or 'chunked'), got tensors on "
                f"{hidden.device}"
            )
        return "chunked"
    if impl == "auto":
        if hidden.dtype == torch.float32 or not hidden.is_cuda:
            return "chunked"
        from g2rl_kernels.ops.sensitivity_chunked_triton import out_dtype_gemm_works

        return "chunked" if out_dtype_gemm_works(hidden.device, hidden.dtype) else "fused"
    return impl


def _allocate(n, d, num_seqs, token_features, device) -> SensitivityOutput:
    f32 = dict(dtype=torch.float32, device=device)
    return SensitivityOutput(
        torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32),
        torch.empty(num_seqs, d, **f32) if num_seqs is not None else None,
        torch.empty(n, d, **f32) if token_features else None,
    )


def _check_out(out, n, d, num_seqs, token_features, device) -> None:
    want = {"logprobs": (n,), "entropy": (n,), "lse": (n,)}
    if num_seqs is not None:
        want["seq_features"] = (num_seqs, d)
    if token_features:
        want["token_features"] = (n, d)
    for name, shape in want.items():
        t = getattr(out, name)
        if (t is None or t.shape != shape or t.dtype != torch.float32 or t.device != device
                or not t.is_contiguous()):
            got = "None" if t is None else describe(t)
            raise ValueError(f"_out.{name} must be contiguous float32 {shape}, got {got}")


class PaddedBatch(NamedTuple):
    hidden: torch.Tensor  # (B*T, d)
    targets: torch.Tensor  # (B*T,)
    seq_index: torch.Tensor  # (B*T,)
    num_seqs: int
    token_weights: torch.Tensor | None  # (B*T,)
    ignore_index: int


def validate_padded_args(hidden, targets, mask, token_weights) -> None:
    """Shape checks of :func:`sequence_features` (the rest is checked by ``sensitivity``)."""
    for name, t in (("hidden", hidden), ("targets", targets), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D (B, T, d), got {describe(hidden)}")
    bt = tuple(hidden.shape[:2])
    if tuple(targets.shape) != bt:
        raise ValueError(f"targets must have shape (B, T) = {bt}, got {describe(targets)}")
    if tuple(mask.shape) != bt:
        raise ValueError(f"mask must have shape (B, T) = {bt}, got {describe(mask)}")
    if mask.dtype != torch.bool and mask.dtype.is_floating_point:
        raise TypeError(f"mask must be bool (or integer 0/1), got {describe(mask)}")
    if mask.device != hidden.device:
        raise ValueError(f"mask must be on the device of hidden ({hidden.device}), got "
                         f"{describe(mask)}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise TypeError(f"token_weights must be a torch.Tensor, got "
                            f"{type(token_weights).__name__}")
        if tuple(token_weights.shape) != bt:
            raise ValueError(
                f"token_weights must have shape (B, T) = {bt}, got {describe(token_weights)}"
            )


def flatten_padded(hidden, targets, mask, token_weights) -> PaddedBatch:
    """(B, T, ...) -> (B*T, ...): masked positions get target PADDED_IGNORE, row b is seq b."""
    b, t, d = hidden.shape
    keep = mask.bool()
    flat_targets = torch.where(keep, targets, PADDED_IGNORE).reshape(b * t)
    seq_index = torch.arange(b, device=hidden.device).repeat_interleave(t)
    tw = None if token_weights is None else token_weights.reshape(b * t)
    return PaddedBatch(hidden.reshape(b * t, d), flat_targets, seq_index, b, tw, PADDED_IGNORE)


def unflatten_padded(out: SensitivityOutput, shape: torch.Size) -> SensitivityOutput:
    b, t, d = shape
    tok = out.token_features
    return SensitivityOutput(
        out.logprobs.reshape(b, t), out.entropy.reshape(b, t), out.lse.reshape(b, t),
        out.seq_features, None if tok is None else tok.reshape(b, t, d),
    )


def sequence_features(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_token_features: bool = False,
    check_values: bool = True,
) -> SensitivityOutput:
    """:func:`sensitivity` for a padded batch of B sequences of length T.

    Args:
        hidden: (B, T, d) (any value where masked: masked rows are not checked and only their
            own lse depends on them); weight: (V, d); targets: (B, T) integer (any value where
            masked); mask: (B, T) bool, False = ignored token (prompt, padding);
            token_weights: (B, T).

    Returns:
        :class:`SensitivityOutput`: logprobs, entropy, lse (B, T); seq_features (B, d);
        token_features (B, T, d) or None.
    """
    validate_padded_args(hidden, targets, mask, token_weights)
    flat = flatten_padded(hidden, targets, mask, token_weights)
    try:
        out = sensitivity(
            flat.hidden, weight, flat.targets, seq_index=flat.seq_index, num_seqs=flat.num_seqs,
            token_weights=flat.token_weights, bias=bias, temperature=temperature,
            ignore_index=flat.ignore_index, return_token_features=return_token_features,
            check_values=check_values,
        )
    except ValueError as e:
        if "(token " not in str(e):
            raise
        t = hidden.shape[1]
        raise ValueError(f"{e} (sequence_features: token i of the flattened batch is position "
                         f"[i // T, i % T] of the (B, T) batch, T = {t})") from None
    return unflatten_padded(out, hidden.shape)
