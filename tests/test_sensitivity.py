"""g2rl_kernels.sensitivity / sequence_features: the chunked CPU path against the float64
reference and the autograd oracle over the issue's sizes, with poisoned output buffers; the
CUDA (Triton) path when a GPU is present. The interpreted Triton kernels are tested in
test_sensitivity_triton_interpreted.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from _sensitivity_helpers import (
    FIELDS,
    INTERPRETED_CASES,
    INTERPRETED_CHUNKED_CASES,
    Case,
    call_kwargs,
    check_masked_bias,
    check_outputs,
    confident_inputs,
    cycle_case,
    make_inputs,
    poisoned,
    rounded_g_bound,
    run_and_check,
    to,
    tolerances,
    with_options,
)

import g2rl_kernels
from g2rl_kernels import reference
from g2rl_kernels.sensitivity import SensitivityOutput

VS, DS, NS = (1, 17, 1000, 4099), (16, 40, 64, 130), (1, 33, 257)


def _cpu_cases() -> list[Case]:
    cases = []
    i = 0
    for v in VS:
        for d in DS:
            for n in NS:
                chunk = (7, 64, None)[i % 3]
                opts = {"chunk_size": chunk} if chunk else {}
                cases.append(with_options(cycle_case(i, n, v, d, "float32"), **opts))
                i += 1
    for dtype in ("bfloat16", "float16"):
        for v in (17, 4099):
            for d in (40, 130):
                for n in (33, 257):
                    cases.append(with_options(cycle_case(i, n, v, d, dtype), chunk_size=64))
                    i += 1
    # explicit coverage of each feature on its own
    base = Case(n=257, v=1000, d=64, seed=7, ignore=0.2)
    cases += [
        replace(base, temperature=0.7), replace(base, temperature=1.3), replace(base, bias=True),
        replace(base, weights=True), replace(base, peaked=True), replace(base, layout="random"),
        replace(base, ignore=0.0), replace(base, pooled=False), replace(base, token_features=False),
    ]
    return cases


CPU_CASES = _cpu_cases()


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_path(case):
    run_and_check(case, backend="torch")


CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU (torch.cuda.is_available()={torch.cuda.is_available()}, "
    f"torch.version.cuda={torch.version.cuda})",
)


# options each CUDA path takes (the CPU cases' chunk_size/vocab_chunk are the torch path's)
CUDA_OPTIONS = {"triton": ("num_splits", "blocks"), "triton-chunked": ("chunk_size",)}


@CUDA
@pytest.mark.parametrize("backend", ["triton", "triton-chunked"], ids=["fused", "chunked"])
@pytest.mark.parametrize(
    "case", CPU_CASES[::5] + INTERPRETED_CASES + INTERPRETED_CHUNKED_CASES,
    ids=lambda c: c.id,
)
def test_cuda_path(case, backend):
    options = tuple((k, v) for k, v in case.options if k in CUDA_OPTIONS[backend])
    run_and_check(replace(case, options=options), backend=backend, device="cuda", strict=False)


@CUDA
def test_cuda_auto_is_chunked_and_agrees_with_fused():
    case = cycle_case(4, 257, 4099, 130, "bfloat16")
    kw = to(call_kwargs(make_inputs(case), case), device="cuda")
    auto = g2rl_kernels.sensitivity(**kw)
    chunked = g2rl_kernels.sensitivity(**kw, impl="chunked")
    fused = g2rl_kernels.sensitivity(**kw, impl="fused")
    for f in FIELDS:  # (sequence features: float atomics, the order of the sums may differ)
        torch.testing.assert_close(getattr(auto, f), getattr(chunked, f), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(getattr(fused, f), getattr(chunked, f), rtol=2e-3, atol=2e-3)


@CUDA
@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p_target", [0.9, 0.999, 0.9999])
def test_cuda_16bit_token_features_of_confident_tokens(impl, dtype, p_target):
    """Issue 9, item 1 on the GPU: phi of a token with p_y -> 1 within 2^-7 (|g| @ |W|)."""
    h, w, y = confident_inputs(dtype, p_target)
    out = g2rl_kernels.sensitivity(h.cuda(), w.cuda(), y.cuda(), return_token_features=True,
                                   impl=impl)
    ref = reference.sensitivity(h.double(), w.double(), y, return_token_features=True)
    err = (out.token_features.cpu().double() - ref.token_features).abs()
    bound = rounded_g_bound(dict(hidden=h, weight=w, targets=y, temperature=1.0,
                                 ignore_index=-100)) + 1e-6
    assert bool((err <= bound).all()), float((err / bound).max())


@CUDA
@pytest.mark.parametrize("backend", ["triton", "triton-chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_minus_inf_bias(backend, dtype):
    check_masked_bias(backend, dtype, device="cuda")


@CUDA
@pytest.mark.parametrize("impl", ["chunked", "fused"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_no_host_sync(impl, dtype):
    case = cycle_case(1, 257, 4099, 130, dtype)  # pooled features and token features
    kw = to(call_kwargs(make_inputs(case), case), device="cuda")
    g2rl_kernels.sensitivity(**kw, check_values=False, impl=impl)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g2rl_kernels.sensitivity(**kw, check_values=False, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_chunk_size_does_not_matter():
    case = replace(cycle_case(3, 257, 1000, 40, "float32"), weights=True, bias=True)
    kw = call_kwargs(make_inputs(case), case)
    outs = [g2rl_kernels.sensitivity(**kw, _options={"chunk_size": c}) for c in (1, 13, 300)]
    for o in outs[1:]:
        for f in FIELDS:
            torch.testing.assert_close(getattr(o, f), getattr(outs[0], f), rtol=1e-5, atol=1e-5)


def test_defaults_and_shapes():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    y = torch.tensor([1, 2, -100, 4, 10])
    out = g2rl_kernels.sensitivity(h, w, y)
    assert isinstance(out, SensitivityOutput)
    assert out.seq_features is None and out.token_features is None
    assert out.logprobs.shape == out.entropy.shape == out.lse.shape == (5,)
    assert out.logprobs[2] == 0 and out.entropy[2] == 0
    assert math.isclose(float(out.lse[2]), float(torch.logsumexp(w @ h[2], 0)), rel_tol=1e-5)
    # num_seqs derived on the CPU
    out = g2rl_kernels.sensitivity(h, w, y, seq_index=torch.tensor([0, 0, 1, 1, 3]))
    assert out.seq_features.shape == (4, 8)
    assert torch.equal(out.seq_features[2], torch.zeros(8))  # no token
    ref = reference.sensitivity(h.double(), w.double(), y, seq_index=torch.tensor([0, 0, 1, 1, 3]))
    torch.testing.assert_close(out.seq_features.double(), ref.seq_features, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    h, w = torch.zeros(0, 8), torch.randn(11, 8)
    y = torch.zeros(0, dtype=torch.long)
    out = g2rl_kernels.sensitivity(h, w, y, seq_index=y, num_seqs=2, return_token_features=True)
    assert out.logprobs.shape == (0,) and out.token_features.shape == (0, 8)
    assert torch.equal(out.seq_features, torch.zeros(2, 8))


def test_all_ignored_sequence_is_zero_not_nan():
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(6, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.tensor([3, 4, -100, -100, -100, 7])
    seq = torch.tensor([0, 0, 1, 1, 1, 2])
    tw = torch.tensor([1.0, 0.0, 2.0, 2.0, 2.0, 0.0])  # seq 2: one counted token of weight 0
    out = g2rl_kernels.sensitivity(h, w, y, seq_index=seq, num_seqs=3, token_weights=tw,
                                   return_token_features=True)
    assert torch.equal(out.seq_features[1], torch.zeros(16))
    assert torch.equal(out.seq_features[2], torch.zeros(16))
    assert torch.equal(out.token_features[2:5], torch.zeros(3, 16))
    assert torch.isfinite(out.seq_features).all()
    # seq 0: token 1 has weight 0, so Phi_0 = phi_0 (a~ = 1 / (1 + 1e-8))
    torch.testing.assert_close(out.seq_features[0], out.token_features[0], rtol=1e-6, atol=1e-6)


def test_tied_weights_unchanged():
    emb = torch.nn.Embedding(300, 32)
    before = emb.weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (40,), generator=g)
    seq = torch.arange(40) // 10
    out = g2rl_kernels.sensitivity(h, emb.weight, y, seq_index=seq, num_seqs=4,
                                   return_token_features=True)
    assert torch.equal(emb.weight.detach(), before)
    assert not out.seq_features.requires_grad
    ref = reference.sensitivity(h.detach().double(), before.double(), y, seq_index=seq,
                                num_seqs=4, return_token_features=True)
    torch.testing.assert_close(out.seq_features.double(), ref.seq_features, rtol=1e-5,
                               atol=1e-6)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(64, 2, 40, generator=g)[:, 1]  # stride (80, 1)
    w = torch.randn(40, 300, generator=g).t()  # (300, 40), stride (1, 300)
    y = torch.randint(0, 300, (64,), generator=g)
    seq = torch.arange(64) // 16
    out = g2rl_kernels.sensitivity(h, w, y, seq_index=seq, num_seqs=4, return_token_features=True)
    ref = reference.sensitivity(h.double(), w.double(), y, seq_index=seq, num_seqs=4,
                                return_token_features=True)
    for f in FIELDS:
        torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f), rtol=1e-5,
                                   atol=1e-5)


def test_check_values_off_gives_same_result():
    case = cycle_case(2, 33, 1000, 40, "float32")
    kw = call_kwargs(make_inputs(case), case)
    a = g2rl_kernels.sensitivity(**kw)
    b = g2rl_kernels.sensitivity(**kw, check_values=False)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("token_features", [False, True])
def test_sequence_features_padded(dtype, token_features):
    g = torch.Generator().manual_seed(11)
    B, T, d, V = 4, 9, 24, 70
    dt = getattr(torch, dtype)
    hidden = torch.randn(B, T, d, generator=g).to(dt)
    weight = torch.randn(V, d, generator=g).to(dt)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # a sequence with no response token
    targets[~mask] = torch.randint(-5, V + 5, (int((~mask).sum()),), generator=g)  # garbage
    tw = torch.rand(B, T, generator=g)
    out = g2rl_kernels.sequence_features(hidden, weight, targets, mask, token_weights=tw,
                                         temperature=0.8, return_token_features=token_features)
    ref = reference.sequence_features(hidden.double(), weight.double(), targets, mask,
                                      token_weights=tw, temperature=0.8,
                                      return_token_features=token_features)
    assert out.logprobs.shape == out.entropy.shape == out.lse.shape == (B, T)
    assert out.seq_features.shape == (B, d)
    assert (out.token_features is None) == (not token_features)
    if token_features:
        assert out.token_features.shape == (B, T, d)
    assert torch.equal(out.seq_features[2], torch.zeros(d))
    assert torch.equal(out.logprobs[~mask], torch.zeros(int((~mask).sum())))
    for f in FIELDS:
        if getattr(ref, f) is not None:
            torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f), rtol=1e-5,
                                       atol=1e-5)
    # the same as the flat call
    flat = g2rl_kernels.sensitivity(
        hidden.reshape(B * T, d), weight, torch.where(mask, targets, -100).reshape(-1),
        seq_index=torch.arange(B).repeat_interleave(T), num_seqs=B, token_weights=tw.reshape(-1),
        temperature=0.8,
    )
    torch.testing.assert_close(out.seq_features, flat.seq_features)


def test_checker_has_teeth():
    """check_outputs rejects an unwritten (NaN) element, a small error and a missing output."""
    case = cycle_case(0, 33, 100, 16, "float32")
    kw = call_kwargs(make_inputs(case), case)
    ref64 = reference.sensitivity(**to(kw, torch.float64))
    tol = tolerances(kw, [torch.float32], ref64)
    good = g2rl_kernels.sensitivity(**kw)
    check_outputs(good, ref64, tol)
    for f in ("logprobs", "seq_features", "token_features"):
        bad = SensitivityOutput(*(x.clone() for x in good))
        getattr(bad, f).view(-1)[3] = math.nan
        with pytest.raises(AssertionError, match=f"{f}: 1 non-finite"):
            check_outputs(bad, ref64, tol)
        bad = SensitivityOutput(*(x.clone() for x in good))
        getattr(bad, f).view(-1)[-1] += 10 * tol[f]
        with pytest.raises(AssertionError, match=f"{f}: max abs error"):
            check_outputs(bad, ref64, tol)
    with pytest.raises(AssertionError, match="token_features: got None"):
        check_outputs(good._replace(token_features=None), ref64, tol)
    # the poisoned buffers really are poisoned
    assert all(torch.isnan(x).all() for x in poisoned(kw, "cpu") if x is not None)


@pytest.mark.parametrize("chunk", [None, 300])
def test_many_sequences_per_chunk(chunk):
    """More than 32 sequences in a chunk (shuffled): the index_add_ fallback of the q sum."""
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(300, 24, generator=g), torch.randn(500, 24, generator=g)
    y = torch.randint(0, 500, (300,), generator=g)
    y[::11] = -100
    seq = torch.randint(0, 120, (300,), generator=g)
    tw = torch.rand(300, generator=g)
    kw = dict(seq_index=seq, num_seqs=120, token_weights=tw, temperature=1.3)
    out = g2rl_kernels.sensitivity(h, w, y, **kw, _options={"chunk_size": chunk})
    ref = reference.sensitivity(h.double(), w.double(), y, **kw)
    torch.testing.assert_close(out.seq_features.double(), ref.seq_features, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_path_memory_is_bounded_by_the_chunk(dtype):
    """No allocation bigger than one (chunk, V) float32 buffer, whatever N (outputs given)."""
    from _sensitivity_helpers import largest_allocation

    n, v, d, chunk = 3000, 2000, 48, 64
    g = torch.Generator().manual_seed(9)
    h, w = torch.randn(n, d, generator=g).to(dtype), torch.randn(v, d, generator=g).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=torch.arange(n) // 600, num_seqs=5, return_token_features=True)
    out = g2rl_kernels.sensitivity(h, w, y, **kw)
    peak = largest_allocation(lambda: g2rl_kernels.sensitivity(
        h, w, y, **kw, _out=out, _options={"chunk_size": chunk}))
    assert 0 < peak <= chunk * v * 4 < n * v * 4 // 40, peak
