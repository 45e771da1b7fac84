"""CUDA group novelty on a real GPU: shared-memory and global-scratch paths, groups above the
device's shared-memory limit, the PyTorch fallback on the GPU, one host sync per call.

Skipped without a CUDA GPU and the extension built with CUDA (no GPU has run them yet)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from test_group_novelty import (
    ADV_TOL,
    COS_TOL,
    DTYPES,
    check_against_reference,
    random_inputs,
)

import g2rl_kernels
from g2rl_kernels import reference
from g2rl_kernels.novelty import cuda_backend
from g2rl_kernels.ops import group_novelty_op as op

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and g2rl_kernels.cuda_available()),
    reason="needs a CUDA GPU and the extension built with CUDA",
)


def _index() -> int:
    return torch.cuda.current_device()


def _ext_runs() -> bool:
    return cuda_backend(_index()) == "extension"


def test_backend_decision_matches_the_versions():
    ext = op.cuda_extension()
    reason = op.cuda_fallback_reason(
        built=True, runtime_version=ext.runtime_version(), driver_version=ext.driver_version(),
        torch_cuda=torch.version.cuda, probe_error=ext.probe(_index()))
    assert (cuda_backend(_index()) == "extension") == (reason is None), reason


def test_max_shared_group_size_is_the_devices_optin_limit():
    if not _ext_runs():
        pytest.skip("the extension cannot run here (the fallback test covers this GPU)")
    props = torch.cuda.get_device_properties(_index())
    optin = max(props.shared_memory_per_block_optin, 48 * 1024)
    G = op.cuda_extension().max_shared_group_size(_index())
    # the kernel's static shared memory (0, or 1 KiB reported on sm_90) is left out of it
    assert ((optin - 1024) // 4 - 1) // 5 <= G <= (optin // 4 - 1) // 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("G", [1, 2, 17, 64, 300])
def test_scratch_path_is_bit_identical_to_shared_path(monkeypatch, G, dtype):
    if not _ext_runs():
        pytest.skip("the extension cannot run here")
    feats, rewards = random_inputs(7, G, 96, dtype, "cuda", seed=G)
    shared = g2rl_kernels.group_novelty(feats, rewards, uniform_groups="shape")
    monkeypatch.setitem(op._max_shared_G, _index(), 0)  # every G takes the scratch path
    scratch = g2rl_kernels.group_novelty(feats, rewards, uniform_groups="shape")
    for a, b in zip(shared, scratch, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)  # each dtype's kernel has its own opt-in
@pytest.mark.parametrize("where", ["above 48 KiB", "above the opt-in limit"])
def test_large_groups_match_float64(where, dtype):
    """G past the 48 KiB default (opt-in attribute set) and past the device's opt-in limit
    (global scratch): the kernel claims every G, so it must compute every G."""
    if not _ext_runs():
        pytest.skip("the extension cannot run here")
    limit = op.cuda_extension().max_shared_group_size(_index())
    G = 48 * 1024 // 20 + 7 if where == "above 48 KiB" else limit + 1
    assert (G <= limit) == (where == "above 48 KiB")
    seed = int.from_bytes(os.urandom(4), "little")
    feats, rewards = random_inputs(1, G, 16, dtype, "cuda", seed)
    out = g2rl_kernels.group_novelty(feats, rewards)
    ref = reference.group_novelty(feats.double(), rewards.double())  # float64 on the GPU
    ref = type(ref)(*(t.cpu() for t in ref))
    check_against_reference(out, ref, f"G={G} seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_fallback_on_the_gpu_matches_float64_even_with_tf32_allowed(dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    feats, rewards = random_inputs(64, 16, 2048, dtype, "cuda", seed)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls elsewhere
    try:
        out = op.group_novelty_torch(feats, rewards, 0.5, 3.0, 0, 1e-6, True, 0.01, 0.05, True)
    finally:
        torch.set_float32_matmul_precision(old)
    ref = reference.group_novelty(feats.double().cpu(), rewards.double().cpu())
    check_against_reference(g2rl_kernels.novelty.NoveltyOutput(*out), ref, f"seed={seed}")
    if _ext_runs():
        kernel = g2rl_kernels.group_novelty(feats, rewards)
        assert (kernel.cosine - out[0]).abs().max().item() <= 2 * COS_TOL
        assert (kernel.advantages - out[3]).abs().max().item() <= ADV_TOL


def _syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_one_host_sync_per_call():
    feats, rewards = random_inputs(8, 16, 256, torch.bfloat16, "cuda", seed=1)
    g2rl_kernels.group_novelty(feats, rewards)  # first call: backend decision, caches
    assert _syncs(lambda: g2rl_kernels.group_novelty(feats, rewards)) == 1
    assert _syncs(lambda: op.group_novelty_torch(feats, rewards, 0.5, 3.0, 0, 1e-6, True, 0.01,
                                                 0.05, True)) == 1


def test_non_finite_inputs_are_counted_like_on_the_cpu():
    feats = torch.randn(4, 3, 9)
    feats[2, 1, 5] = float("nan")
    feats[0, 0, 0] = float("inf")
    rewards = torch.ones(4, 3)
    rewards[3, 0] = float("nan")
    msg = r"contain 3 NaN or inf values \(features shape \(4, 3, 9\), rewards shape \(4, 3\)\)"
    for dev in ("cpu", "cuda"):
        with pytest.raises(ValueError, match=msg):
            g2rl_kernels.group_novelty(feats.to(dev), rewards.to(dev))
    # large finite values whose squares overflow are not flagged
    out = g2rl_kernels.group_novelty(torch.full((1, 2, 4), 3e19, device="cuda"),
                                     torch.ones(1, 2, device="cuda"))
    assert out.novelty.shape == (1, 2)
