"""Argument validation shared by :func:`g2rl_kernels.sensitivity` and its reference.

Every bad input raises a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape,
device or value) whose message names the argument and shows what was received. The rules are
the same on every backend (they are checked here, before dispatching).

Scalars: ``num_seqs`` and ``ignore_index`` accept Python and NumPy integers and 0-d integer
tensors; ``temperature`` accepts Python and NumPy real numbers and 0-d real tensors (a 0-d CUDA
tensor costs a host synchronisation to read). Booleans are refused.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple

import torch

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# rows of W scanned at a time when looking for the first non-finite row (error path only)
_SCAN_ROWS = 4096


class CheckedArgs(NamedTuple):
    """Normalised scalar arguments returned by :func:`validate_sensitivity_args`."""

    num_seqs: int | None  # derived from seq_index on the CPU when it was None
    temperature: float
    ignore_index: int


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


def as_int(x: object) -> int | None:
    """``x`` as a Python int if it is an int, a NumPy integer or a 0-d integer tensor (not a
    bool); None otherwise."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.dtype not in INDEX_DTYPES:
            return None
        return int(x.item())
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return None
    return operator.index(x)


def check_temperature(temperature: object) -> float:
    """``temperature`` as a float: a real number (Python, NumPy or a 0-d tensor), finite, > 0."""
    value = None
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() == 0 and (temperature.dtype.is_floating_point
                                       or temperature.dtype in INDEX_DTYPES):
            value = float(temperature.item())
    elif isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        value = float(temperature)
    if value is None:
        raise TypeError(
            f"temperature must be a number (a real: int, float, NumPy scalar or 0-d tensor), got "
            f"{type(temperature).__name__}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def check_bias_dtype(bias: torch.Tensor, weight: torch.Tensor) -> None:
    """The bias rule of every backend: the dtype of ``weight``, or float32."""
    if bias.dtype not in (weight.dtype, torch.float32):
        raise TypeError(
            f"bias must have a float dtype: the dtype of weight ({weight.dtype}) or "
            f"torch.float32, got {describe(bias)}"
        )


def validate_sensitivity_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor | None,
    num_seqs: object,
    token_weights: torch.Tensor | None,
    bias: torch.Tensor | None,
    temperature: object,
    ignore_index: object,
    reference: bool = False,
    check_values: bool = True,
) -> CheckedArgs:
    """Check the arguments of ``sensitivity``; return the normalised scalars.

    Shapes: hidden (N, d), weight (V, d), targets (N,), seq_index (N,), token_weights (N,),
    bias (V,). ``reference`` also allows float64 (and any float dtype) for hidden/weight.
    ``bias`` must have the dtype of ``weight`` or float32. ``token_weights`` need
    ``seq_index`` (they only weight the sequence features).

    ``check_values`` scans the values (see :func:`check_values`): one host synchronisation on
    CUDA. Without ``num_seqs`` it is derived as ``seq_index.max() + 1`` on the CPU; on CUDA it
    is required (a data-dependent output shape would need a host synchronisation).
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
    ignore = as_int(ignore_index)
    if ignore is None:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore < v:
        raise ValueError(
            f"ignore_index must not be a valid vocabulary index [0, {v}), got {ignore}"
        )
    temp = check_temperature(temperature)
    if bias is not None:
        bias = _tensor("bias", bias)
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape (V,) = ({v},), got {describe(bias)}")
        check_bias_dtype(bias, weight)
        _same_device("bias", bias, hidden)
    if token_weights is not None:
        token_weights = _tensor("token_weights", token_weights)
        if seq_index is None:
            raise ValueError(
                "token_weights were given without seq_index: they only weight the tokens of "
                "each sequence feature, so without seq_index they would be ignored"
            )
        if token_weights.shape != (n,):
            raise ValueError(
                f"token_weights must have shape (N,) = ({n},), got {describe(token_weights)}"
            )
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must have a float dtype, got {describe(token_weights)}")
        _same_device("token_weights", token_weights, hidden)
    count = None
    if num_seqs is not None:
        count = as_int(num_seqs)
        if count is None or count < 0:
            raise ValueError(
                f"num_seqs must be an int >= 0, got {num_seqs!r} (Python or NumPy integers and "
                f"0-d integer tensors are accepted)"
            )
        if seq_index is None:
            raise ValueError(f"num_seqs={count} was given without seq_index")
    if seq_index is not None:
        seq_index = _tensor("seq_index", seq_index)
        if seq_index.shape != (n,):
            raise ValueError(f"seq_index must have shape (N,) = ({n},), got {describe(seq_index)}")
        _int_tensor("seq_index", seq_index)
        _same_device("seq_index", seq_index, hidden)
        if count is None:
            if hidden.is_cuda:
                raise ValueError(
                    "num_seqs is required with seq_index on CUDA (deriving it would need a host "
                    "synchronisation)"
                )
            count = int(seq_index.max()) + 1 if n else 0
    if check_values:
        check_values_of(hidden, weight, targets, ignore, seq_index, count, token_weights, bias)
    return CheckedArgs(count, temp, ignore)


def check_values_of(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    seq_index: torch.Tensor | None,
    num_seqs: int | None,
    token_weights: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """The value checks of ``check_values=True``, in this order (the first failure is raised):

    targets in [0, V) or ``ignore_index``; seq_index in [0, num_seqs); token_weights finite and
    >= 0; the hidden row of every counted token (target != ignore_index) finite; weight finite;
    bias neither NaN nor +inf, and not -inf everywhere (-inf entries mask vocabulary entries:
    their probability is 0, and a target there has logprob -inf). Ignored tokens' hidden rows
    are not checked (prompt or padding positions may hold anything; a non-finite one only makes
    that token's ``lse`` non-finite).

    All flags are computed on the device without (N, d) or (V, d) temporaries (row-wise and
    global min/max) and read back in one transfer; the error message then names the first bad
    row, which input it is in and what is wrong with it.
    """
    v = weight.shape[0]
    t = targets.long()
    counted = t != ignore_index
    flags = {"weight": _not_finite(torch.aminmax(weight))}
    if bias is not None:
        # -inf masks a vocabulary entry (probability 0); NaN, +inf, or every entry -inf do not
        lo, hi = torch.aminmax(bias) if bias.numel() else (bias.new_zeros(()),) * 2
        flags["bias"] = torch.isnan(bias).any() | (hi == math.inf) | (hi == -math.inf)
    if targets.numel():
        flags["targets"] = (counted & ((t < 0) | (t >= v))).any()
        if seq_index is not None:
            s = seq_index.long()
            flags["seq_index"] = ((s < 0) | (s >= num_seqs)).any()
        if token_weights is not None:
            flags["token_weights_finite"] = ~torch.isfinite(token_weights).all()
            flags["token_weights_sign"] = (token_weights < 0).any()
        flags["hidden"] = (_rows_not_finite(hidden) & counted).any()
    bad = dict(zip(flags, torch.stack(list(flags.values())).tolist(), strict=True))  # one sync
    if bad.get("targets"):
        where = torch.nonzero(counted & ((t < 0) | (t >= v))).flatten()
        raise ValueError(
            f"targets must be in [0, V) = [0, {v}) or equal ignore_index ({ignore_index}); "
            f"got {where.numel()} bad entries, e.g. {t[where[:5]].tolist()}; the first is "
            f"targets[{int(where[0])}] (token {int(where[0])})"
        )
    if bad.get("seq_index"):
        s = seq_index.long()
        where = torch.nonzero((s < 0) | (s >= num_seqs)).flatten()
        raise ValueError(
            f"seq_index must be in [0, num_seqs) = [0, {num_seqs}); got {where.numel()} bad "
            f"entries, e.g. {s[where[:5]].tolist()}; the first is seq_index[{int(where[0])}] "
            f"(token {int(where[0])})"
        )
    if bad.get("token_weights_finite"):
        where = torch.nonzero(~torch.isfinite(token_weights)).flatten()
        i = int(where[0])
        raise ValueError(
            f"token_weights contain NaN or inf: {where.numel()} bad entries; the first is "
            f"token_weights[{i}] (token {i}) = {float(token_weights[i])}"
        )
    if bad.get("token_weights_sign"):
        neg = token_weights[token_weights < 0]
        i = int(torch.nonzero(token_weights < 0)[0, 0])
        raise ValueError(
            f"token_weights must be >= 0; got {neg.numel()} negative entries, "
            f"e.g. {neg[:5].tolist()}; the first is token_weights[{i}] (token {i})"
        )
    if bad.get("hidden"):
        rows = torch.nonzero(_rows_not_finite(hidden) & counted).flatten()
        i = int(rows[0])
        seq = "" if seq_index is None else f", sequence {int(seq_index[i])}"
        raise ValueError(
            f"hidden[{i}] (token {i}{seq}, target {int(t[i])}) is not finite: "
            f"{_first_bad(hidden[i])}; {rows.numel()} counted token(s) have a non-finite hidden "
            f"state. With check_values=False such a token gets non-finite outputs and so does "
            f"its sequence's feature, and nothing else"
        )
    if bad["weight"]:
        i = _first_bad_row(weight)
        raise ValueError(
            f"weight[{i}] (vocabulary row {i}) is not finite: {_first_bad(weight[i])}; every "
            f"token's outputs would be non-finite"
        )
    if bad.get("bias"):
        bad_entries = torch.isnan(bias) | (bias == math.inf)
        if not bool(bad_entries.any()):
            raise ValueError(
                f"bias is -inf at every one of its {bias.numel()} entries: every token's "
                f"logits would be -inf (no distribution); -inf may mask some entries, not all"
            )
        i = int(torch.nonzero(bad_entries)[0, 0])
        raise ValueError(
            f"bias[{i}] (vocabulary entry {i}) is {float(bias[i])}; every token's outputs would "
            f"be non-finite (bias entries may be finite or -inf, which masks the entry)"
        )


def _not_finite(minmax) -> torch.Tensor:
    lo, hi = minmax
    return ~(torch.isfinite(lo) & torch.isfinite(hi)).all()


def _rows_not_finite(x: torch.Tensor) -> torch.Tensor:
    """(R,) bool: rows of x (R, C) with a NaN or inf, from the row-wise min and max."""
    lo, hi = torch.aminmax(x, dim=1)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def _first_bad_row(x: torch.Tensor) -> int:
    for r0 in range(0, x.shape[0], _SCAN_ROWS):
        rows = torch.nonzero(_rows_not_finite(x[r0:r0 + _SCAN_ROWS])).flatten()
        if rows.numel():
            return r0 + int(rows[0])
    raise AssertionError("no non-finite row found")  # pragma: no cover


def _first_bad(row: torch.Tensor) -> str:
    """'NaN at column 5' (the first non-finite element of a 1-D tensor)."""
    col = int(torch.nonzero(~torch.isfinite(row))[0, 0])
    value = float(row[col])
    name = "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")
    return f"{name} at column {col}"


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
