"""Argument validation shared by :func:`g2rl_kernels.sensitivity` and its reference.

Every bad input raises a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape,
device or value) whose message names the argument and shows what was received.
"""

from __future__ import annotations

import math

import torch

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of hidden ({ref.device}), got {describe(t)}"
        )


def _int_tensor(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {describe(t)}")


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def validate_sensitivity_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor | None,
    num_seqs: int | None,
    token_weights: torch.Tensor | None,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    reference: bool = False,
    check_values: bool = True,
) -> int | None:
    """Check the arguments of ``sensitivity``; return ``num_seqs`` (derived if it was None).

    Shapes: hidden (N, d), weight (V, d), targets (N,), seq_index (N,), token_weights (N,),
    bias (V,). ``reference`` also allows float64 (and any float dtype) for hidden/weight.

    ``check_values`` scans the values (targets in [0, V) or ``ignore_index``, seq_index in
    [0, num_seqs), token_weights >= 0 and finite): one host synchronisation on CUDA. Without
    ``num_seqs`` it is derived as ``seq_index.max() + 1`` on the CPU; on CUDA it is required
    (a data-dependent output shape would need a host synchronisation).
    """
    hidden = _tensor("hidden", hidden)
    weight = _tensor("weight", weight)
    targets = _tensor("targets", targets)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, d), got {describe(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, d), got {describe(weight)}")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(
            f"hidden (N, d) and weight (V, d) disagree on d: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if v == 0 or d == 0:
        raise ValueError(f"weight must have V >= 1 and d >= 1, got {describe(weight)}")
    if reference:
        if not hidden.dtype.is_floating_point:
            raise TypeError(f"hidden must have a float dtype, got {describe(hidden)}")
    elif hidden.dtype not in INPUT_DTYPES:
        names = ", ".join(str(t) for t in INPUT_DTYPES)
        raise TypeError(f"hidden must have dtype {names}; got {describe(hidden)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight must have the dtype of hidden ({hidden.dtype}), got {describe(weight)}"
        )
    _same_device("weight", weight, hidden)
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape (N,) = ({n},), got {describe(targets)}")
    _int_tensor("targets", targets)
    _same_device("targets", targets, hidden)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < v:
        raise ValueError(
            f"ignore_index must not be a valid vocabulary index [0, {v}), got {ignore_index}"
        )
    check_temperature(temperature)
    if bias is not None:
        bias = _tensor("bias", bias)
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape (V,) = ({v},), got {describe(bias)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must have a float dtype, got {describe(bias)}")
        _same_device("bias", bias, hidden)
    if token_weights is not None:
        token_weights = _tensor("token_weights", token_weights)
        if token_weights.shape != (n,):
            raise ValueError(
                f"token_weights must have shape (N,) = ({n},), got {describe(token_weights)}"
            )
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must have a float dtype, got {describe(token_weights)}")
        _same_device("token_weights", token_weights, hidden)
    if num_seqs is not None:
        if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 0:
            raise ValueError(f"num_seqs must be an int >= 0, got {num_seqs!r}")
        if seq_index is None:
            raise ValueError(f"num_seqs={num_seqs} was given without seq_index")
    if seq_index is not None:
        seq_index = _tensor("seq_index", seq_index)
        if seq_index.shape != (n,):
            raise ValueError(f"seq_index must have shape (N,) = ({n},), got {describe(seq_index)}")
        _int_tensor("seq_index", seq_index)
        _same_device("seq_index", seq_index, hidden)
        if num_seqs is None:
            if hidden.is_cuda:
                raise ValueError(
                    "num_seqs is required with seq_index on CUDA (deriving it would need a host "
                    "synchronisation)"
                )
            num_seqs = int(seq_index.max()) + 1 if n else 0
    if check_values:
        _check_values(targets, v, ignore_index, seq_index, num_seqs, token_weights)
    return num_seqs


def _check_values(
    targets: torch.Tensor,
    v: int,
    ignore_index: int,
    seq_index: torch.Tensor | None,
    num_seqs: int | None,
    token_weights: torch.Tensor | None,
) -> None:
    """Value checks; all flags are computed on the device and read back in one transfer."""
    if targets.numel() == 0:
        return
    t = targets.long()
    flags = [((t != ignore_index) & ((t < 0) | (t >= v))).any()]
    if seq_index is not None:
        s = seq_index.long()
        flags.append(((s < 0) | (s >= num_seqs)).any())
    if token_weights is not None:
        flags.append(~torch.isfinite(token_weights).all())
        flags.append((token_weights < 0).any())
    bad = torch.stack(flags).tolist()  # the one host synchronisation (on CUDA)
    if bad[0]:
        bad_t = t[(t != ignore_index) & ((t < 0) | (t >= v))]
        raise ValueError(
            f"targets must be in [0, V) = [0, {v}) or equal ignore_index ({ignore_index}); "
            f"got {bad_t.numel()} bad entries, e.g. {bad_t[:5].tolist()}"
        )
    if seq_index is not None and bad[1]:
        s = seq_index.long()
        bad_s = s[(s < 0) | (s >= num_seqs)]
        raise ValueError(
            f"seq_index must be in [0, num_seqs) = [0, {num_seqs}); got {bad_s.numel()} bad "
            f"entries, e.g. {bad_s[:5].tolist()}"
        )
    if token_weights is not None:
        if bad[-2]:
            raise ValueError("token_weights contain NaN or inf")
        if bad[-1]:
            neg = token_weights[token_weights < 0]
            raise ValueError(
                f"token_weights must be >= 0; got {neg.numel()} negative entries, "
                f"e.g. {neg[:5].tolist()}"
            )


def normalised_token_weights(
    targets: torch.Tensor,
    seq_index: torch.Tensor,
    num_seqs: int,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a~ (N,): a / (sum of a over the counted tokens of the sequence + 1e-8); 0 when ignored.

    N-length device ops only (no host synchronisation).
    """
    counted = targets != ignore_index
    if token_weights is None:
        a = counted.to(dtype)
    else:
        a = torch.where(counted, token_weights.to(dtype), 0)
    denom = torch.zeros(num_seqs, dtype=dtype, device=targets.device)
    denom.index_add_(0, seq_index.long(), a)
    return a / (denom[seq_index.long()] + 1e-8)
