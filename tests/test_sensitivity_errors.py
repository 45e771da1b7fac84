"""Every bad input to g2rl_kernels.sensitivity / sequence_features (and the reference) raises a
clear error naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

import g2rl_kernels
from g2rl_kernels import reference

N, V, D = 6, 11, 8
H = torch.randn(N, D)
W = torch.randn(V, D)
Y = torch.tensor([0, 3, -100, 10, 5, 2])
SEQ = torch.tensor([0, 0, 1, 1, 2, 2])

CASES = [
    # (args override, kwargs, exception, message regex)
    (dict(hidden=torch.randn(N, D, 1)), {}, ValueError, r"hidden must be 2-D \(N, d\).*8, 1\)"),
    (dict(weight=torch.randn(V)), {}, ValueError, r"weight must be 2-D \(V, d\).*\(11,\)"),
    (dict(weight=torch.randn(V, D + 1)), {}, ValueError, r"disagree on d.*\(6, 8\).*\(11, 9\)"),
    (dict(weight=torch.randn(0, D)), {}, ValueError, r"weight must have V >= 1"),
    (dict(hidden=H.long()), {}, TypeError, r"hidden must have (dtype|a float dtype).*torch.int64"),
    (dict(weight=W.half()), {}, TypeError, r"weight must have the dtype of hidden .*float16"),
    (dict(hidden="x"), {}, TypeError, r"hidden must be a torch.Tensor, got str"),
    (dict(targets=[1, 2]), {}, TypeError, r"targets must be a torch.Tensor"),
    (dict(targets=Y[:4]), {}, ValueError, r"targets must have shape \(N,\) = \(6,\).*\(4,\)"),
    (dict(targets=Y.float()), {}, TypeError, r"targets must have an integer dtype.*float32"),
    (dict(targets=torch.tensor([0, 3, -100, 11, 5, 2])), {}, ValueError,
     r"targets must be in \[0, V\) = \[0, 11\).*\[11\]"),
    (dict(targets=torch.tensor([0, -1, -100, 1, 5, 2])), {}, ValueError,
     r"targets must be in \[0, V\).*\[-1\]"),
    ({}, dict(ignore_index=3), ValueError, r"ignore_index must not be a valid vocabulary index"),
    ({}, dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    ({}, dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    ({}, dict(temperature=-1.0), ValueError, r"temperature must be .*-1.0"),
    ({}, dict(temperature=math.inf), ValueError, r"temperature must be .*inf"),
    ({}, dict(temperature="1"), TypeError, r"temperature must be a number"),
    ({}, dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \(V,\) = \(11,\)"),
    ({}, dict(bias=torch.ones(V, dtype=torch.long)), TypeError, r"bias must have a float dtype"),
    ({}, dict(seq_index=SEQ[:5], num_seqs=3), ValueError, r"seq_index must have shape \(N,\)"),
    ({}, dict(seq_index=SEQ.float(), num_seqs=3), TypeError, r"seq_index must have an integer"),
    ({}, dict(seq_index=SEQ, num_seqs=2), ValueError,
     r"seq_index must be in \[0, num_seqs\) = \[0, 2\).*\[2, 2\]"),
    ({}, dict(seq_index=SEQ - 1, num_seqs=3), ValueError, r"seq_index must be in .*\[-1, -1\]"),
    ({}, dict(seq_index=SEQ, num_seqs=-1), ValueError, r"num_seqs must be an int >= 0, got -1"),
    ({}, dict(seq_index=SEQ, num_seqs=3.0), ValueError, r"num_seqs must be an int"),
    ({}, dict(num_seqs=3), ValueError, r"num_seqs=3 was given without seq_index"),
    ({}, dict(seq_index=SEQ, num_seqs=3, token_weights=torch.ones(5)), ValueError,
     r"token_weights must have shape \(N,\) = \(6,\).*\(5,\)"),
    ({}, dict(seq_index=SEQ, num_seqs=3, token_weights=torch.ones(N, dtype=torch.long)),
     TypeError, r"token_weights must have a float dtype"),
    ({}, dict(seq_index=SEQ, num_seqs=3, token_weights=torch.tensor([1.0, -0.5, 1, 1, 1, 1])),
     ValueError, r"token_weights must be >= 0.*-0.5"),
    ({}, dict(seq_index=SEQ, num_seqs=3, token_weights=torch.tensor([1.0, math.nan, 1, 1, 1, 1])),
     ValueError, r"token_weights contain NaN or inf"),
]


def _call(fn, override, kwargs):
    args = dict(hidden=H, weight=W, targets=Y)
    args.update(override)
    fn(args["hidden"], args["weight"], args["targets"], **kwargs)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("override, kwargs, exc, match", CASES)
def test_bad_arguments(impl, override, kwargs, exc, match):
    fn = g2rl_kernels.sensitivity if impl == "kernel" else reference.sensitivity
    with pytest.raises(exc, match=match):
        _call(fn, override, kwargs)


def test_float64_only_in_the_reference():
    with pytest.raises(TypeError, match=r"hidden must have dtype .*torch.float64"):
        g2rl_kernels.sensitivity(H.double(), W.double(), Y)
    reference.sensitivity(H.double(), W.double(), Y)  # fine


def test_bad_private_hooks():
    with pytest.raises(ValueError, match=r"_backend must be"):
        g2rl_kernels.sensitivity(H, W, Y, _backend="cuda")
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
        g2rl_kernels.sensitivity(H, W, Y, _backend="triton")
    out = g2rl_kernels.sensitivity(H, W, Y)
    with pytest.raises(ValueError, match=r"_out.logprobs must be contiguous float32 \(6,\)"):
        g2rl_kernels.sensitivity(H, W, Y, _out=out._replace(logprobs=torch.empty(5)))


def test_check_values_false_skips_value_checks_only():
    bad = torch.tensor([0, 3, -100, 11, 5, 2])
    g2rl_kernels.sensitivity(H, W, torch.tensor([0, 3, -100, 10, 5, 2]), check_values=False)
    with pytest.raises(ValueError, match="targets must have shape"):
        g2rl_kernels.sensitivity(H, W, bad[:3], check_values=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_num_seqs_required_on_cuda():
    with pytest.raises(ValueError, match="num_seqs is required with seq_index on CUDA"):
        g2rl_kernels.sensitivity(H.cuda(), W.cuda(), Y.cuda(), seq_index=SEQ.cuda())


def test_devices_must_match():
    meta = torch.empty(N, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"targets must be on the device of hidden"):
        g2rl_kernels.sensitivity(H, W, meta)


B, T = 2, 3
PH, PY, PM = torch.randn(B, T, D), torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool)


@pytest.mark.parametrize("impl", [g2rl_kernels.sequence_features, reference.sequence_features])
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((PH[0], W, PY, PM), {}, ValueError, r"hidden must be 3-D \(B, T, d\).*\(3, 8\)"),
        ((PH, W, PY[:, :2], PM), {}, ValueError, r"targets must have shape \(B, T\) = \(2, 3\)"),
        ((PH, W, PY, PM[:1]), {}, ValueError, r"mask must have shape \(B, T\) = \(2, 3\)"),
        ((PH, W, PY, PM.float()), {}, TypeError, r"mask must be bool"),
        ((PH, W, PY, PM), dict(token_weights=torch.ones(B)), ValueError,
         r"token_weights must have shape \(B, T\)"),
        ((PH, W, PY, PM), dict(temperature=0), ValueError, r"temperature must be"),
        ((PH, W.half(), PY, PM), {}, TypeError, r"weight must have the dtype of hidden"),
        ((PH, W, torch.full((B, T), V), PM), {}, ValueError, r"targets must be in \[0, V\)"),
        ((PH, W, PY, [[True]]), {}, TypeError, r"mask must be a torch.Tensor"),
    ],
)
def test_sequence_features_bad_arguments(impl, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        impl(*args, **kwargs)


def test_impl_argument():
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'chunked', 'fused'\)"):
        g2rl_kernels.sensitivity(H, W, Y, impl="cublas")
    with pytest.raises(ValueError, match="impl='fused' is the Triton path: it needs CUDA"):
        g2rl_kernels.sensitivity(H, W, Y, impl="fused")
    for impl in ("auto", "chunked"):  # the CPU path
        out = g2rl_kernels.sensitivity(H, W, Y, impl=impl)
        assert out.logprobs.shape == Y.shape


def test_out_dtype_gemm_probe_is_cached_and_catches_a_refusal():
    """impl="auto" on CUDA asks whether torch.mm(..., out_dtype=float32) runs for 16-bit
    inputs there; a build that has the overload but refuses it must give False, not raise."""
    from g2rl_kernels.ops import sensitivity_chunked_triton as chunked

    pytest.importorskip("triton")
    cpu = torch.device("cpu")
    a = torch.zeros(16, 16, dtype=torch.bfloat16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        runs = True
    except (RuntimeError, NotImplementedError, TypeError):
        runs = False
    assert chunked.out_dtype_gemm_works(cpu, torch.bfloat16) is runs
    assert (str(cpu), torch.bfloat16) in chunked._OUT_DTYPE_GEMM
