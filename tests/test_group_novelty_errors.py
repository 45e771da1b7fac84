"""Every bad input to g2rl_kernels.group_novelty raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import g2rl_kernels

F = torch.randn(2, 3, 4)
R = torch.ones(2, 3)


@pytest.mark.parametrize(
    "features, rewards, kwargs, exc, match",
    [
        (torch.randn(3, 4), R, {}, ValueError, r"features must be 3-D .*\(3, 4\)"),
        (F, torch.ones(6), {}, ValueError, r"rewards must be 2-D .*\(6,\)"),
        (F, torch.ones(2, 4), {}, ValueError, r"disagree on B or G.*\(2, 3, 4\).*\(2, 4\)"),
        (F, torch.ones(3, 3), {}, ValueError, r"disagree on B or G"),
        (F.long(), R, {}, TypeError, r"features must have a float dtype.*torch.int64"),
        (F.double(), R, {}, TypeError, r"features must have a float dtype.*torch.float64"),
        (F, R.long(), {}, TypeError, r"rewards must have a float dtype"),
        ([[1.0]], R, {}, TypeError, r"features must be a torch.Tensor"),
        (F, [1.0], {}, TypeError, r"rewards must be a torch.Tensor"),
        (F, R, {"mode": "eq13"}, ValueError, r"mode must be one of .*'eq13'"),
        (F, R, {"lam": 1.5}, ValueError, r"lam must be a number in \[0, 1\], got 1.5"),
        (F, R, {"lam": -0.1}, ValueError, r"lam must be"),
        (F, R, {"clip": 0.0}, ValueError, r"clip must be None or a finite number > 0, got 0.0"),
        (F, R, {"clip": float("inf")}, ValueError, r"clip must be"),
        (F, R, {"span_floor": -0.01}, ValueError, r"span_floor must be a finite number >= 0"),
        (F, R, {"span_floor": float("nan")}, ValueError, r"span_floor must be"),
        (F, R, {"std_floor": -1.0}, ValueError, r"std_floor must be a finite number >= 0"),
        (F, R, {"std_floor": "0.05"}, ValueError, r"std_floor must be"),
        (F, R, {"uniform_groups": "keep"}, ValueError,
         r"uniform_groups must be one of \['zero', 'shape'\], got 'keep'"),
        (F, R, {"clip": -1.0}, ValueError, r"clip must be"),
        (F, R, {"eps": -1e-6}, ValueError, r"eps must be"),
    ],
)
def test_bad_arguments(features, rewards, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        g2rl_kernels.group_novelty(features, rewards, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features(dtype, bad):
    f = torch.randn(4, 3, 9).to(dtype)
    f[2, 1, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*features shape \(4, 3, 9\)"):
        g2rl_kernels.group_novelty(f, torch.ones(4, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards(bad):
    r = torch.ones(4, 3)
    r[3, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*rewards shape \(4, 3\)"):
        g2rl_kernels.group_novelty(torch.randn(4, 3, 9), r)


def test_large_finite_features_are_not_flagged():
    # squares overflow float32 here, but nothing is NaN or inf: no error
    out = g2rl_kernels.group_novelty(torch.full((1, 2, 4), 3e19), torch.ones(1, 2))
    assert out.novelty.shape == (1, 2)


def test_devices_must_match_or_cuda_missing():
    meta = torch.empty(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        g2rl_kernels.group_novelty(meta, R)
