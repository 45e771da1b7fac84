"""The Triton kernels run by Triton's interpreter on CPU tensors.

Not collected by a plain ``pytest`` (the name does not start with ``test_``):
test_sensitivity_triton_interpreted.py runs this file in a subprocess with TRITON_INTERPRET=1
set before anything imports triton, and fails when anything here fails or is skipped.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    raise RuntimeError("run with TRITON_INTERPRET=1 (see test_sensitivity_triton_interpreted.py)")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from _sensitivity_helpers import (  # noqa: E402
    BAD_VALUES,
    FIELDS,
    INTERPRETED_CASES,
    INTERPRETED_CONTAINMENT,
    INTERPRETED_SHARP_CASES,
    check_containment,
    check_weight_containment,
    containment_inputs,
    largest_allocation,
    run_and_check,
)
from hypothesis import given  # noqa: E402
from test_sensitivity_fuzz import check_fuzz_case, fuzz_cases, fuzz_settings  # noqa: E402

import g2rl_kernels  # noqa: E402
from g2rl_kernels import reference  # noqa: E402


def test_interpreter_is_on():
    from g2rl_kernels.ops import sensitivity_triton

    assert sensitivity_triton.interpreted()
    assert "InterpretedFunction" in type(sensitivity_triton._lse_kernel).__name__


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=lambda c: c.id)
def test_triton_interpreted(case):
    run_and_check(case, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_non_contiguous_and_tied(dtype):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(40, 2, 48, generator=g)[:, 1].to(dtype)  # stride (96, 1)
    w = torch.randn(48, 300, generator=g).to(dtype).t()  # (300, 48), stride (1, 300)
    bias = torch.randn(300, generator=g).to(dtype)
    before = w.clone()
    y = torch.randint(0, 300, (40,), generator=g)
    y[5] = -100
    seq = torch.arange(40) // 10
    kw = dict(seq_index=seq, num_seqs=4, temperature=0.9, return_token_features=True)
    out = g2rl_kernels.sensitivity(h, w, y, bias=bias, _backend="triton", **kw)
    assert torch.equal(w, before)  # the weight is only read (tied embeddings)
    ref = reference.sensitivity(h.double(), w.double(), y, bias=bias.double(), **kw)
    for f in FIELDS:
        torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f), rtol=1e-5,
                                   atol=1e-5)


def test_triton_allocates_no_n_by_v_or_n_by_d():
    """Besides the (given) outputs the launcher allocates only O(N), O(S V) and O(S d)."""
    n, v, d = 257, 300, 130
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=torch.arange(n) // 100, num_seqs=3, return_token_features=True,
              _backend="triton")
    out = g2rl_kernels.sensitivity(h, w, y, **kw)
    peak = largest_allocation(lambda: g2rl_kernels.sensitivity(h, w, y, **kw, _out=out))
    assert 0 < peak < n * d * 4 // 16, peak


# --- issue 12: the same input rules as the CPU path ---


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: invalid value in matmul
@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("dtype, options", INTERPRETED_CONTAINMENT,
                         ids=["f32", "bf16-blocks16", "f32-many-seqs-splits2"])
def test_triton_non_finite_hidden_stays_in_its_token_and_sequence(value, dtype, options):
    check_containment("triton", value, dtype, **options)


def test_triton_nan_token_weight_stays_in_its_sequence():
    check_weight_containment("triton")


def test_triton_check_values_and_scalars():
    spec = containment_inputs()
    kw = dict(spec["kw"], hidden=spec["kw"]["hidden"].clone())
    t = spec["bad"]["counted"]
    kw["hidden"][t, 4] = math.nan
    with pytest.raises(ValueError, match=rf"hidden\[{t}\] \(token {t}, .*NaN at column 4"):
        g2rl_kernels.sensitivity(**kw, _backend="triton")
    kw = dict(spec["kw"], num_seqs=np.int64(9), temperature=np.float32(0.9),
              bias=spec["kw"]["bias"].float())
    out = g2rl_kernels.sensitivity(**kw, _backend="triton")
    ref = reference.sensitivity(**dict(kw, num_seqs=9, temperature=float(np.float32(0.9))))
    for f in FIELDS:
        torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f).double(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="token_weights were given without seq_index"):
        g2rl_kernels.sensitivity(kw["hidden"], kw["weight"], kw["targets"],
                                 token_weights=kw["token_weights"], _backend="triton")
    with pytest.raises(TypeError, match=r"bias must have a float dtype: the dtype of weight"):
        g2rl_kernels.sensitivity(kw["hidden"], kw["weight"], kw["targets"],
                                 bias=kw["bias"].double(), _backend="triton")


@pytest.mark.parametrize("case", INTERPRETED_SHARP_CASES, ids=lambda c: c.id)
def test_triton_sharp_logits(case):
    run_and_check(case, backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz_settings(examples=60, long_examples=300)
@given(case=fuzz_cases(80, 700, 64))
def test_triton_fuzz_against_float64(case):
    check_fuzz_case(case, backend="triton")
