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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
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
    peak_live_bytes,
    rounded_g_bound,
    run_and_check,
)
from hypothesis import given  # noqa: E402
from test_sensitivity_fuzz import check_fuzz_case, fuzz_cases, fuzz_settings  # noqa: E402

import g2rl_kernels  # noqa: E402
from g2rl_kernels import reference  # noqa: E402
from g2rl_kernels.ops.sensitivity_triton import _round_bf16_rne  # noqa: E402


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


# worst relative error of a confident token's phi allowed per dtype: float32 accuracy, and the
# rounding of g (not of W[y]) for 16-bit W (measured: 3e-3 bf16, 4e-4 fp16, 4e-6 float32)
CONFIDENT_REL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(CONFIDENT_REL), ids=str)
@pytest.mark.parametrize("p_target", [0.9, 0.999, 0.99999, 0.999999])
def test_token_features_of_confident_tokens(backend, dtype, p_target):
    """phi_t = (1 - p_y) W[y] - sum_{v != y} p_v W[v] of a token with p_y -> 1 (issue 9, item
    1 and its review): with p rounded to 16 bits before W[y] - p @ W the error was 1.6% at
    p_y = 0.9 and 100% from 0.999; with 1 - exp(z_y - lse) in float32 it was still 6% at
    1 - p_y = 1e-5 and 119% at 1e-6 (every dtype). 1 - p_y now comes from the exp-sum of the
    other entries. Elementwise within the rounding bound of g, and per row within
    CONFIDENT_REL."""
    h, w, y = confident_inputs(dtype, p_target)
    out = g2rl_kernels.sensitivity(h, w, y, return_token_features=True,
                                   **backend_kwargs(backend))
    ref = reference.sensitivity(h.double(), w.double(), y, return_token_features=True)
    p_y = float(ref.logprobs[0].exp())
    assert abs(p_y - p_target) < 0.2 * (1 - p_target), p_y
    err = (out.token_features.double() - ref.token_features).abs()
    if dtype != torch.float32:
        bound = rounded_g_bound(dict(hidden=h, weight=w, targets=y, temperature=1.0,
                                     ignore_index=-100)) + 1e-6
        assert bool((err <= bound).all()), float((err / bound).max())
    rel = err.norm(dim=1) / ref.token_features.norm(dim=1)
    assert float(rel.max()) < CONFIDENT_REL[dtype], rel


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_token_features_keep_the_probability_tail(backend):
    """float16 flushes entries below 3e-8 to zero: rounding g of a confident token (V = 20000,
    rows of W sharing a direction, so the tail sum_v p_v W[v] is as large as phi) lost 30% of
    phi. Each row of g is now scaled by a power of two before the rounding."""
    h, w, y = confident_inputs(torch.float16, 0.99998, v=20000, shared_direction=3.0)
    out = g2rl_kernels.sensitivity(h, w, y, return_token_features=True,
                                   **backend_kwargs(backend))
    ref = reference.sensitivity(h.double(), w.double(), y, return_token_features=True)
    rel = (out.token_features.double() - ref.token_features).norm(dim=1) / \
        ref.token_features.norm(dim=1)
    assert float(rel[0]) < 2e-3, rel[0]


@triton.jit
def _round_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _round_bf16_rne(tl.load(x_ptr + offs)))


def test_interpreter_rounds_g_to_bfloat16_like_the_gpu():
    """The interpreter's own float32 -> bfloat16 cast truncates; the GPU rounds to nearest
    even. The token kernel emulates the GPU: compare with torch's (round-to-nearest-even)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-30, 30, (4096,),
                                                                  generator=g).float())
    bf = x.to(torch.bfloat16).float()  # ties: exactly halfway between two bfloat16 values
    x[:64] = bf[:64] + (bf[:64].abs() * 2.0**-9).copysign(bf[:64])
    out = torch.empty_like(x)
    _round_kernel[(1,)](x, out, BLOCK=4096)
    assert torch.equal(out, x.to(torch.bfloat16).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_bias(backend):
    """The kernels read the bias with unit stride: a strided view gave logprob errors of 4."""
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(33, 24, generator=g), torch.randn(300, 24, generator=g) * 0.3
    y = torch.randint(0, 300, (33,), generator=g)
    bias = torch.randn(300, 2, generator=g)[:, 0]
    assert not bias.is_contiguous()
    kw = dict(seq_index=torch.arange(33) // 10, num_seqs=4, return_token_features=True)
    out = g2rl_kernels.sensitivity(h, w, y, bias=bias, **kw, **backend_kwargs(backend))
    ref = reference.sensitivity(h.double(), w.double(), y, bias=bias.double(), **kw)
    for f in FIELDS:
        torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inside_a_callers_autocast(backend):
    """A training step's autocast region must not turn the chunked path's float32 logits GEMM
    into a bfloat16 one (NaN logprobs, and a dtype error with token features)."""
    g = torch.Generator().manual_seed(9)
    h, w = torch.randn(33, 24, generator=g), torch.randn(300, 24, generator=g) * 0.3
    y = torch.randint(0, 300, (33,), generator=g)
    kw = dict(seq_index=torch.arange(33) // 10, num_seqs=4, return_token_features=True,
              **backend_kwargs(backend))
    plain = g2rl_kernels.sensitivity(h, w, y, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = g2rl_kernels.sensitivity(h, w, y, **kw)
    for f in FIELDS:
        assert torch.equal(getattr(inside, f), getattr(plain, f)), f


def test_chunked_keeps_one_logits_buffer_live():
    """The next chunk's (C, V) logits buffer was allocated while the previous one was still
    referenced: twice the stated budget at peak."""
    n, v, d, chunk = 200, 3000, 32, 40
    g = torch.Generator().manual_seed(10)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=torch.arange(n) // 50, num_seqs=4, return_token_features=True,
              _backend="triton", impl="chunked", _options={"chunk_size": chunk})
    out = g2rl_kernels.sensitivity(h, w, y, **kw)
    peak = peak_live_bytes(lambda: g2rl_kernels.sensitivity(h, w, y, **kw, _out=out))
    buffer = chunk * v * 4
    # one logits buffer, r (4, V) and O(N + C d) small tensors
    assert buffer <= peak < 1.5 * buffer, (peak, buffer)


def test_chunked_refuses_a_chunk_size_below_one():
    h, w, y = torch.randn(4, 16), torch.randn(20, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        g2rl_kernels.sensitivity(h, w, y, _backend="triton", impl="chunked",
                                 _options={"chunk_size": 0})


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
