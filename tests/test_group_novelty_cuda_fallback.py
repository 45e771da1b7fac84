"""The PyTorch fallback of the CUDA group novelty extension and the decision to use it.

The fallback (``group_novelty_op.group_novelty_torch``) is a plain function on tensors, so it is
tested here on CPU tensors against the float64 reference and the compiled CPU kernel. The choice
between extension and fallback is a pure function of the driver and runtime versions, tested with
injected versions; the binding's version getters run here for real (the CUDA part is built even
without a GPU)."""

from __future__ import annotations

import ctypes.util
import math
import os
import warnings

import pytest
import torch
from test_group_novelty import (
    DTYPES,
    MODES,
    check_against_reference,
    degenerate_inputs,
    random_inputs,
)

import g2rl_kernels
from g2rl_kernels import reference
from g2rl_kernels.novelty import MODES as MODE_CODES
from g2rl_kernels.novelty import NoveltyOutput, cuda_backend
from g2rl_kernels.ops import group_novelty_op as op
from g2rl_kernels.ops.matmul_precision import ieee_float32_matmul


def fallback(features, rewards, *, lam=0.5, clip=3.0, mode="centered", eps=1e-6,
             scale_advantages=True, span_floor=0.01, std_floor=0.05, uniform_groups="zero"):
    """group_novelty_torch with the keyword options of g2rl_kernels.group_novelty."""
    out = op.group_novelty_torch(
        features, rewards.to(torch.float32), float(lam), math.inf if clip is None else clip,
        MODE_CODES[mode], eps, scale_advantages, span_floor, std_floor, uniform_groups == "zero")
    return NoveltyOutput(*out)


# ---------------------------------------------------------------- fallback against float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 128, 2048])
@pytest.mark.parametrize("G", [1, 2, 3, 8, 17])
def test_fallback_matches_float64_reference(G, d, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    feats, rewards = random_inputs(5, G, d, dtype, "cpu", seed)
    f64, r64 = feats.double(), rewards.double()
    for mode in MODES:
        for scale in (True, False):
            for uniform in ("zero", "shape"):
                for clip in (3.0, None):
                    kw = dict(lam=0.5 if mode == "centered" else 0.8, mode=mode, clip=clip,
                              scale_advantages=scale, uniform_groups=uniform)
                    check_against_reference(fallback(feats, rewards, **kw),
                                            reference.group_novelty(f64, r64, **kw),
                                            f"seed={seed} {kw}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["identical", "near-identical"])
@pytest.mark.parametrize("d", [1, 64])
@pytest.mark.parametrize("G", [2, 3, 17])
def test_fallback_degenerate_groups(G, d, kind, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    feats, rewards = degenerate_inputs(kind, 32, G, d, dtype, "cpu", seed)
    f64, r64 = feats.double(), rewards.double()
    for mode in MODES:
        for uniform in ("zero", "shape"):
            for span_floor in (0.01, 0.1):  # the floors that make these well conditioned
                kw = dict(lam=1.0, mode=mode, uniform_groups=uniform, span_floor=span_floor)
                check_against_reference(fallback(feats, rewards, **kw),
                                        reference.group_novelty(f64, r64, **kw),
                                        f"seed={seed} {kw}")


def test_fallback_matches_the_compiled_cpu_kernel():
    """An independent implementation (csrc/novelty_chain.h) agrees to float32 rounding."""
    seed = int.from_bytes(os.urandom(4), "little")
    for dtype in DTYPES:
        feats, rewards = random_inputs(16, 9, 300, dtype, "cpu", seed)
        for mode in MODES:
            for uniform in ("zero", "shape"):
                kw = dict(lam=0.7, mode=mode, uniform_groups=uniform, clip=None)
                got = fallback(feats, rewards, **kw)
                want = g2rl_kernels.group_novelty(feats, rewards, **kw)
                for name, a, b, tol in zip(NoveltyOutput._fields, got, want,
                                           (2e-6, 5e-6, 5e-5, 5e-4), strict=True):
                    err = (a - b).abs().max().item()
                    assert err <= tol, f"seed={seed} {dtype} {kw} {name}: {err:.3g} > {tol}"


def test_fallback_worked_by_hand_and_edges():
    # the group of test_group_novelty.test_worked_by_hand
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    rewards = torch.tensor([[1.0, 1.0, -1.0]])
    out = fallback(feats, rewards, lam=0.5, eps=0.0)
    nu1 = 1 - 0.5 / (math.e**2 + 1)
    torch.testing.assert_close(out.novelty, torch.tensor([[nu1, nu1, 0.5]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5773503, 0.5773503, -1.1547005]]),
                               atol=1e-6, rtol=0)
    # a group of one with eps = 0: no peers, nu = 1 (as the kernels), never NaN
    out = fallback(torch.randn(3, 1, 4), torch.tensor([[1.0], [-1.0], [1.0]]), eps=0.0)
    assert torch.equal(out.novelty, torch.ones(3, 1))
    assert torch.equal(out.advantages, torch.zeros(3, 1))
    # very negative rewards: exp(-m) alone would overflow float32; the shifted eps does not
    feats = torch.randn(2, 4, 6)
    rewards = torch.tensor([[-150.0, -151.0, -150.5, -152.0]] * 2)
    out = fallback(feats, rewards, clip=None)
    want = g2rl_kernels.group_novelty(feats, rewards, clip=None)
    assert all(torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(out.novelty, want.novelty, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.advantages, want.advantages, atol=1e-4, rtol=0)
    # std_floor (test_group_novelty.test_std_floor_worked_by_hand): lam = 0, r = (1, 1.01)
    feats, rewards = torch.randn(1, 2, 5), torch.tensor([[1.0, 1.01]])
    torch.testing.assert_close(fallback(feats, rewards, lam=0.0).advantages,
                               torch.tensor([[-0.1, 0.1]]), atol=1e-5, rtol=0)
    std = 0.01 / math.sqrt(2)
    torch.testing.assert_close(fallback(feats, rewards, lam=0.0, std_floor=0.0).advantages,
                               torch.tensor([[-0.005, 0.005]]) / (std + 1e-6), atol=1e-3, rtol=0)
    # span_floor = 0 and identical scores (identical features and rewards): nubar = 0.5, no
    # division by zero, shaped = r
    r = torch.full((1, 4), 0.5)
    out = fallback(torch.ones(1, 4, 3), r, span_floor=0.0, uniform_groups="shape")
    assert torch.equal(out.shaped_rewards, r) and torch.equal(out.advantages, torch.zeros(1, 4))
    # equal shaped rewards and no std floor: deviations exactly 0 (shifted mean), not ulp noise
    same = torch.randn(1, 1, 8).expand(4, 5, 8)
    r = torch.full((4, 5), 0.7)
    out = fallback(same, r, uniform_groups="shape", std_floor=0.0)
    assert torch.equal(out.advantages, torch.zeros(4, 5))
    # empty shapes
    out = fallback(torch.randn(0, 4, 3), torch.randn(0, 4))
    assert out.cosine.shape == (0, 4, 4) and out.novelty.shape == (0, 4)
    out = fallback(torch.randn(2, 0, 3), torch.randn(2, 0))
    assert out.cosine.shape == (2, 0, 0)


def test_fallback_outputs_are_fresh_contiguous_float32():
    feats, rewards = random_inputs(3, 4, 8, torch.float32, "cpu", seed=1)
    out = fallback(feats, rewards, lam=0.0, clip=None)
    for t in out:
        assert t.dtype == torch.float32 and t.is_contiguous()
        assert t.untyped_storage().data_ptr() not in (feats.untyped_storage().data_ptr(),
                                                     rewards.untyped_storage().data_ptr())


@pytest.mark.parametrize("where", ["features", "rewards"])
def test_fallback_rejects_non_finite_like_the_kernels(where):
    feats, rewards = torch.randn(4, 3, 9), torch.ones(4, 3)
    if where == "features":
        feats[1, 2, 5] = float("nan")
    else:
        rewards[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"contain 1 NaN or inf values \(features shape "
                                         r"\(4, 3, 9\), rewards shape \(4, 3\)\)"):
        fallback(feats, rewards)


def test_ieee_matmul_context_restores_the_setting():
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 allowed
        allowed = getattr(matmul, name)
        with ieee_float32_matmul(True):
            assert getattr(matmul, name) in ("ieee", False)
        assert getattr(matmul, name) == allowed
        with ieee_float32_matmul(False):  # CPU tensors: global state untouched
            assert getattr(matmul, name) == allowed
    finally:  # leave the process as it was for the other tests
        torch.set_float32_matmul_precision(old)
        setattr(matmul, name, before)


# ---------------------------------------------------------------- the decision


def test_version_string():
    assert op.version_string(12080) == "12.8"
    assert op.version_string(13000) == "13.0"
    assert op.version_string(11040) == "11.4"
    assert op.version_string(0) == "none"


@pytest.mark.parametrize("runtime, driver", [(12080, 12020), (12040, 12080), (13000, 13010),
                                             (12000, 13000), (11080, 12040)])
def test_extension_used_when_the_driver_major_is_new_enough(runtime, driver):
    """CUDA minor-version compatibility: a driver runs every runtime of its major or older."""
    assert op.cuda_fallback_reason(built=True, runtime_version=runtime, driver_version=driver,
                                   torch_cuda="12.8") is None


def test_runtime_newer_than_the_driver_falls_back_and_says_how_to_rebuild():
    msg = op.cuda_fallback_reason(built=True, runtime_version=13000, driver_version=12040,
                                  torch_cuda="12.8")
    assert msg is not None
    assert "CUDA runtime 13.0" in msg and "needs a driver for CUDA 13.x" in msg
    assert "supports CUDA 12.4 at most" in msg and "Driver: CUDA 12.4" in msg
    assert "torch.version.cuda: 12.8" in msg and "PyTorch fallback" in msg
    assert "`CUDA_HOME=/usr/local/cuda-12.8 pip install -e . --no-build-isolation`" in msg
    assert "CUDA 12.x toolkit" in msg


def test_not_built_falls_back_and_says_how_to_build():
    msg = op.cuda_fallback_reason(built=False, torch_cuda="12.4")
    assert msg is not None and "_C_cuda was not built" in msg
    assert "`CUDA_HOME=/usr/local/cuda-12.4 G2RL_BUILD_CUDA=1 pip install -e . " \
           "--no-build-isolation`" in msg
    assert "extension runtime: CUDA not built" in msg and "Driver: CUDA unknown" in msg


def test_no_driver_and_probe_errors_fall_back():
    msg = op.cuda_fallback_reason(built=True, runtime_version=12080, driver_version=0,
                                  torch_cuda=None)
    assert msg is not None and "finds no CUDA driver" in msg
    assert "CUDA_HOME=/usr/local/cuda-<version>" in msg and "torch.version.cuda: None" in msg
    msg = op.cuda_fallback_reason(built=True, runtime_version=12080, driver_version=12080,
                                  torch_cuda="12.8", probe_error="no kernel image (cudaError 209)")
    assert msg is not None and "no kernel image (cudaError 209)" in msg
    assert "G2RL_CUDA_ARCH" in msg


# ---------------------------------------------------------------- the binding, for real

CUDA_EXT = op.cuda_extension()
needs_ext = pytest.mark.skipif(CUDA_EXT is None, reason="g2rl_kernels._C_cuda is not built")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")


@needs_ext
def test_binding_reports_its_runtime_and_the_driver():
    runtime = CUDA_EXT.runtime_version()
    assert isinstance(runtime, int) and 11000 <= runtime < 100000 and runtime % 10 == 0
    driver = CUDA_EXT.driver_version()
    assert isinstance(driver, int) and driver >= 0
    if not torch.cuda.is_available() and ctypes.util.find_library("cuda") is None:
        assert driver == 0  # no driver library at all: 0, not an exception
    assert CUDA_EXT.max_group_size >= 2**31 - 1  # scratch memory covers any G


@needs_ext
@no_gpu
def test_binding_without_a_driver_fails_clearly():
    assert "cudaError" in CUDA_EXT.probe(0)
    with pytest.raises(RuntimeError, match="cannot query shared memory of CUDA device 0"):
        CUDA_EXT.max_shared_group_size(0)


@no_gpu
@pytest.mark.parametrize("built", [True, False])
def test_use_extension_decides_once_and_warns_once(monkeypatch, built):
    """The real decision path on this machine: without a driver (or without the CUDA build)
    CUDA tensors would go to the fallback, after exactly one warning."""
    if built and CUDA_EXT is None:
        pytest.skip("g2rl_kernels._C_cuda is not built")
    monkeypatch.setattr(op, "_use_ext", {})
    monkeypatch.setattr(op, "_warned", False)
    if not built:
        monkeypatch.setattr(op, "_cuda_ext", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda_backend(0) == "torch"
        assert cuda_backend("cuda:0") == "torch"
        assert not op.use_extension(torch.device("cuda", 1))
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    text = str(caught[0].message)
    assert "PyTorch fallback" in text and "pip install -e . --no-build-isolation" in text
    if built:
        rt = op.version_string(CUDA_EXT.runtime_version())
        assert f"extension runtime: CUDA {rt}" in text
    else:
        assert "G2RL_BUILD_CUDA=1" in text
    assert set(op._use_ext) == {0, 1}


def test_cuda_backend_rejects_other_devices():
    with pytest.raises(ValueError, match="must be a CUDA device"):
        cuda_backend("cpu")


@no_gpu
def test_cuda_backend_without_a_gpu_says_so():
    with pytest.raises(ValueError, match=r"no CUDA device .*cuda_backend\(\) needs one"):
        cuda_backend()


def test_fallback_stays_float32_inside_autocast():
    """A caller's autocast region (common in training steps) must not run the fallback's Gram
    in 16 bits (cosine errors of about 1e-3 and a bf16 cosine output)."""
    feats, rewards = random_inputs(4, 8, 512, torch.float32, "cpu", seed=3)
    plain = fallback(feats, rewards)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fallback(feats, rewards)
    for name, a, b in zip(NoveltyOutput._fields, inside, plain, strict=True):
        assert a.dtype == torch.float32, name
        assert torch.equal(a, b), name


def test_a_built_extension_that_does_not_load_is_named(monkeypatch):
    monkeypatch.setattr(op, "_cuda_import_error", "undefined symbol: cudaLaunchKernel_v2")
    msg = op.cuda_fallback_reason(built=False, torch_cuda="12.8")
    assert "_C_cuda is there but does not load (undefined symbol: cudaLaunchKernel_v2)" in msg
