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
    INTERPRETED_CHUNKED_CASES,
    INTERPRETED_CHUNKED_CONTAINMENT,
    INTERPRETED_CONTAINMENT,
    INTERPRETED_SHARP_CASES,
    backend_kwargs,
    check_containment,
    check_masked_bias,
    check_weight_containment,
    confident_inputs,
    containment_inputs,
    largest_allocation,
    rounded_g_bound,
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


@pytest.mark.parametrize("case", INTERPRETED_CHUNKED_CASES, ids=lambda c: c.id)
def test_triton_chunked_interpreted(case):
    run_and_check(case, backend="triton-chunked")


BACKENDS = ["triton", "triton-chunked"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_non_contiguous_and_tied(dtype, backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(40, 2, 48, generator=g)[:, 1].to(dtype)  # stride (96, 1)
    w = torch.randn(48, 300, generator=g).to(dtype).t()  # (300, 48), stride (1, 300)
    bias = torch.randn(300, generator=g).to(dtype)
    before = w.clone()
    y = torch.randint(0, 300, (40,), generator=g)
    y[5] = -100
    seq = torch.arange(40) // 10
    kw = dict(seq_index=seq, num_seqs=4, temperature=0.9, return_token_features=True)
    out = g2rl_kernels.sensitivity(h, w, y, bias=bias, **backend_kwargs(backend), **kw)
    assert torch.equal(w, before)  # the weight is only read (tied embeddings)
    ref = reference.sensitivity(h.double(), w.double(), y, bias=bias.double(), **kw)
    for f in FIELDS:
        x, r = getattr(out, f).double(), getattr(ref, f)
        if f == "token_features" and dtype != torch.float32:  # g rounded to bf16 (issue 9)
            bound = rounded_g_bound(dict(hidden=h, weight=w, targets=y, bias=bias,
                                         temperature=0.9, ignore_index=-100))
            assert bool(((x - r).abs() <= bound + 1e-5).all()), f
        else:
            torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5)


def test_triton_allocates_no_n_by_v_or_n_by_d():
    """Besides the (given) outputs the launcher allocates only O(N), O(S V) and O(S d)."""
    n, v, d = 257, 300, 130
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=torch.arange(n) // 100, num_seqs=3, return_token_features=True,
              _backend="triton", impl="fused")
    out = g2rl_kernels.sensitivity(h, w, y, **kw)
    peak = largest_allocation(lambda: g2rl_kernels.sensitivity(h, w, y, **kw, _out=out))
    assert 0 < peak < n * d * 4 // 16, peak


def test_triton_chunked_allocates_one_chunk_of_logits():
    """The chunked path's largest allocation is its (chunk, V) float32 logits buffer."""
    n, v, d, chunk = 257, 300, 130, 40
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=torch.arange(n) // 100, num_seqs=3, return_token_features=True,
              _backend="triton", impl="chunked", _options={"chunk_size": chunk})
    out = g2rl_kernels.sensitivity(h, w, y, **kw)
    peak = largest_allocation(lambda: g2rl_kernels.sensitivity(h, w, y, **kw, _out=out))
    assert chunk * v * 4 <= peak <= max(chunk * v * 4, 3 * v * 4), peak


# --- issue 9: defects of the GPU path, caught here ---


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p_target", [0.9, 0.99, 0.999, 0.9999])
def test_16bit_token_features_of_confident_tokens(backend, dtype, p_target):
    """phi_t = W[y] - p @ W of a token with p_y -> 1 (issue 9, item 1): with p rounded to 16
    bits before the subtraction the error was 1.6% of |phi| at p_y = 0.9 and 100% from 0.999.
    Elementwise within 2^-7 (|e(y) - p| @ |W|) of float64, and within 2% per row."""
    h, w, y = confident_inputs(dtype, p_target)
    out = g2rl_kernels.sensitivity(h, w, y, return_token_features=True,
                                   **backend_kwargs(backend))
    ref = reference.sensitivity(h.double(), w.double(), y, return_token_features=True)
    p_y = float(ref.logprobs[0].exp())
    assert abs(p_y - p_target) < 0.2 * (1 - p_target), p_y
    err = (out.token_features.double() - ref.token_features).abs()
    bound = rounded_g_bound(dict(hidden=h, weight=w, targets=y, temperature=1.0,
                                 ignore_index=-100)) + 1e-6
    assert bool((err <= bound).all()), float((err / bound).max())
    rel = err.norm(dim=1) / ref.token_features.norm(dim=1)
    assert float(rel.max()) < 0.02, rel


@pytest.mark.parametrize("backend, dtype, options", [
    ("triton", torch.float32, {"blocks": (16, 64, 16), "num_splits": 4}),
    ("triton", torch.bfloat16, {"blocks": (16, 64, 16), "num_splits": 11}),
    ("triton", torch.float32, {}),
    ("triton-chunked", torch.float32, {"blocks": {"stats": (16, 64), "grad": (16, 64)}}),
    ("triton-chunked", torch.bfloat16, {"chunk_size": 16}),
], ids=["fused-f32-splits4", "fused-bf16-splits11", "fused-default", "chunked-f32-blocks16",
        "chunked-bf16-chunk16"])
def test_minus_inf_bias_masks_vocabulary_entries(backend, dtype, options):
    """Issue 9, item 2: a tile or a V split of all -inf logits gave NaN (exp(-inf + inf) in
    the online update, 0 * -inf in the merge)."""
    check_masked_bias(backend, dtype, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_sequences_cost_one_atomic_add_per_present_sequence(backend, monkeypatch):
    """Issue 9, item 3: a token block looped over every sequence id between its smallest and
    largest one; with a shuffled seq_index over 3000 sequences that is thousands of vector
    atomic adds per (block, V tile). Now the tokens are taken sorted by sequence and only the
    ids present are visited: at most (blocks + sequences) adds per V tile. Counted by the
    interpreter's atomic op; the results are checked against float64 too."""
    from triton.runtime import interpreter

    calls = []
    original = interpreter.InterpreterBuilder.create_atomic_rmw

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", counting)
    g = torch.Generator().manual_seed(3)
    n, v, d, seqs = 512, 40, 16, 3000
    used = torch.randperm(seqs, generator=g)[:60]  # 60 sequences spread over [0, 3000)
    seq = used[torch.randint(0, 60, (n,), generator=g)]
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=seq, num_seqs=seqs)
    out = g2rl_kernels.sensitivity(h, w, y, **kw, **backend_kwargs(backend))
    blocks = -(-n // 128)  # interpreter token blocks of 128 rows, one V tile
    assert 0 < len(calls) <= blocks + 60, len(calls)
    ref = reference.sensitivity(h.double(), w.double(), y, **kw)
    torch.testing.assert_close(out.seq_features.double(), ref.seq_features, rtol=0, atol=1e-5)


# --- issue 12: the same input rules as the CPU path ---


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: invalid value in matmul
@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("dtype, options", INTERPRETED_CONTAINMENT,
                         ids=["f32", "bf16-blocks16", "f32-many-seqs-splits2"])
def test_triton_non_finite_hidden_stays_in_its_token_and_sequence(value, dtype, options):
    check_containment("triton", value, dtype, **options)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("dtype, options", INTERPRETED_CHUNKED_CONTAINMENT,
                         ids=["f32", "bf16-chunk7", "f32-many-seqs-chunk16"])
def test_triton_chunked_non_finite_hidden_stays_in_its_token_and_sequence(value, dtype,
                                                                          options):
    check_containment("triton-chunked", value, dtype, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_nan_token_weight_stays_in_its_sequence(backend):
    check_weight_containment(backend)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", INTERPRETED_SHARP_CASES, ids=lambda c: c.id)
def test_triton_sharp_logits(case, backend):
    run_and_check(case, backend=backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz_settings(examples=60, long_examples=300)
@given(case=fuzz_cases(80, 700, 64))
def test_triton_fuzz_against_float64(case):
    check_fuzz_case(case, backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@fuzz_settings(examples=30, long_examples=200)
@given(case=fuzz_cases(80, 700, 64))
def test_triton_chunked_fuzz_against_float64(case):
    check_fuzz_case(case, backend="triton-chunked")
