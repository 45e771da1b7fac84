"""g2rl_kernels.group_novelty (compiled extension) against the float64 reference, a case worked
out by hand, properties, opcheck and bad input. CPU always; CUDA when a GPU is present."""

from __future__ import annotations

import math
import os

import pytest
import torch

import g2rl_kernels
from g2rl_kernels import reference
from g2rl_kernels.novelty import NoveltyOutput

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["centered", "eq12"]


def _devices() -> list:
    cuda = pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and g2rl_kernels.cuda_available()),
            reason="needs a CUDA GPU and the extension built with CUDA "
            f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
            f"extension built with CUDA={g2rl_kernels.cuda_available()})",
        ),
    )
    return ["cpu", cuda]


DEVICES = _devices()


def random_inputs(B: int, G: int, d: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, G, d, generator=gen)
    # a shared direction makes the cosines (and so the novelties) spread out
    feats += 1.5 * torch.randn(B, 1, d, generator=gen) * torch.rand(B, G, 1, generator=gen)
    rewards = torch.randint(0, 2, (B, G), generator=gen).float() * 2 - 1
    return feats.to(dtype).to(device), rewards.to(device)


# Fixed tolerances against the float64 oracle (same rounded inputs). The floor delta = 0.01 on
# the spread of nu bounds the amplification of float32 rounding of nu (about 1e-6) in nubar by
# 1/delta, and the floor 0.05 on the group std bounds it in the advantages: no case needs a
# condition-aware tolerance. Measured worst cases over 9600 random and degenerate groups
# (identical and near-identical features, G = 2, d = 1, all dtypes, lam = 1): shaped 1.0e-4,
# advantages 8.1e-4.
COS_TOL, NU_TOL, SHAPED_TOL, ADV_TOL = 2e-6, 1e-5, 5e-4, 4e-3


def check_against_reference(out, ref, context=""):
    try:
        _check_against_reference(out, ref)
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from exc


def _check_against_reference(out, ref):
    assert isinstance(out, NoveltyOutput)
    B, G = ref.novelty.shape
    for t in out:
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
    assert out.cosine.shape == (B, G, G)
    assert out.novelty.shape == out.shaped_rewards.shape == out.advantages.shape == (B, G)
    errors = {
        "cosine": ((out.cosine.double().cpu() - ref.cosine).abs().max().item(), COS_TOL),
        "novelty": ((out.novelty.double().cpu() - ref.novelty).abs().max().item(), NU_TOL),
        "shaped": ((out.shaped_rewards.double().cpu() - ref.shaped_rewards).abs().max().item(),
                   SHAPED_TOL),
        "advantages": ((out.advantages.double().cpu() - ref.advantages).abs().max().item(),
                       ADV_TOL),
    } if B * G else {}
    for name, (err, tol) in errors.items():
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def degenerate_inputs(kind: str, B: int, G: int, d: int, dtype: torch.dtype, device: str,
                      seed: int):
    """Groups whose novelty scores barely differ: identical or near-identical features."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 1, d, generator=gen)
    if kind == "identical":
        feats = base.expand(B, G, d).clone()
    else:  # near-identical: differences far below the features' scale
        feats = base + 1e-4 * torch.randn(B, G, d, generator=gen)
    rewards = torch.randint(0, 2, (B, G), generator=gen).float() * 2 - 1
    return feats.to(dtype).to(device), rewards.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 5, 64])
@pytest.mark.parametrize("d", [1, 7, 128, 2048])
@pytest.mark.parametrize("G", [1, 2, 3, 8, 16, 17])
def test_matches_float64_reference(G, d, B, dtype, device):
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; reported on failure
    feats, rewards = random_inputs(B, G, d, dtype, device, seed)
    # the oracle sees exactly the same (already rounded) values, in float64
    f64, r64 = feats.double().cpu(), rewards.double().cpu()
    for mode in MODES:
        for scale in (True, False):
            for uniform in ("zero", "shape"):
                lam = 0.5 if mode == "centered" else 0.8
                kw = dict(lam=lam, mode=mode, scale_advantages=scale, uniform_groups=uniform)
                out = g2rl_kernels.group_novelty(feats, rewards, **kw)
                ref = reference.group_novelty(f64, r64, **kw)
                check_against_reference(
                    out, ref, f"seed={seed} mode={mode} scale={scale} uniform={uniform}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["identical", "near-identical"])
@pytest.mark.parametrize("d", [1, 64])
@pytest.mark.parametrize("G", [2, 3, 17])
def test_degenerate_groups_match_at_fixed_tolerance(G, d, kind, dtype, device):
    """The cases the old rule (min-max, 0.5 only below a spread of 1e-6) turned into noise."""
    seed = int.from_bytes(os.urandom(4), "little")
    feats, rewards = degenerate_inputs(kind, 32, G, d, dtype, device, seed)
    f64, r64 = feats.double().cpu(), rewards.double().cpu()
    for mode in MODES:
        for uniform in ("zero", "shape"):
            for span_floor in (0.01, 0.1):
                kw = dict(lam=1.0, mode=mode, uniform_groups=uniform, span_floor=span_floor)
                out = g2rl_kernels.group_novelty(feats, rewards, **kw)
                ref = reference.group_novelty(f64, r64, **kw)
                check_against_reference(out, ref, f"seed={seed} {kw}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    feats, rewards = random_inputs(6, 5, 33, torch.float32, device, seed=3)
    # (B, G, d) view of a (d, G, B) tensor and a strided rewards view
    feats_nc = feats.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    rewards_nc = torch.stack([rewards, rewards], dim=-1)[..., 0]
    assert not feats_nc.is_contiguous() and not rewards_nc.is_contiguous()
    out = g2rl_kernels.group_novelty(feats_nc, rewards_nc)
    ref = reference.group_novelty(feats.double().cpu(), rewards.double().cpu())
    check_against_reference(out, ref)
    # a bf16 slice with a stride in d
    big = torch.randn(4, 3, 40, device=device).to(torch.bfloat16)
    sliced = big[:, :, ::2]
    out = g2rl_kernels.group_novelty(sliced, rewards[:4, :3])
    ref = reference.group_novelty(sliced.double().cpu(), rewards[:4, :3].double().cpu())
    check_against_reference(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_worked_by_hand(device):
    # Phi1 = (1, 0), Phi2 = (0, 1), Phi3 = (1, 1); rewards (+1, +1, -1); eps = 0.
    # S12 = 0, S13 = S23 = 1/sqrt(2), so S13^2 = S23^2 = 1/2.
    # Peer weights ~ exp(r): for i = 1 the peers are 2 (e) and 3 (1/e):
    #   nu1 = 1 - (1/e) / (e + 1/e) * 1/2 = 1 - 0.5 / (e^2 + 1) = 0.94039860...; nu2 = nu1.
    # For i = 3 the peers 1 and 2 weigh 1/2 each: nu3 = 1 - (1/2 + 1/2) / 2 = 0.5.
    # Min-max: nubar = (1, 1, 0).
    # centered, lam = 0.5: f = (1.5, 1.5, 0.5), r~ = (1.5, 1.5, -0.5), mean 5/6,
    #   std (n-1) = sqrt(4/3) = 1.1547005, advantages (0.5773503, 0.5773503, -1.1547005).
    # eq12, lam = 0.5: f = (1.5, 1.5, 1), r~ = (1.5, 1.5, -1), mean 2/3,
    #   std = sqrt(25/12) = 1.4433757, advantages (0.5773503, 0.5773503, -1.1547005).
    # The incorrect response aligned with correct peers is a "near miss": centered mode
    # softens its penalty to -0.5.
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], device=device)
    rewards = torch.tensor([[1.0, 1.0, -1.0]], device=device)
    nu1 = 1 - 0.5 / (math.e**2 + 1)
    assert abs(nu1 - 0.9403986) < 1e-7
    expected_nu = torch.tensor([[nu1, nu1, 0.5]])
    c = 1 / math.sqrt(2)
    expected_cos = torch.tensor([[[1.0, 0.0, c], [0.0, 1.0, c], [c, c, 1.0]]])

    out = g2rl_kernels.group_novelty(feats, rewards, lam=0.5, mode="centered", eps=0.0)
    torch.testing.assert_close(out.cosine.cpu(), expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.novelty.cpu(), expected_nu, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.shaped_rewards.cpu(), torch.tensor([[1.5, 1.5, -0.5]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages.cpu(),
                               torch.tensor([[0.5773503, 0.5773503, -1.1547005]]), atol=1e-6,
                               rtol=0)

    out = g2rl_kernels.group_novelty(feats, rewards, lam=0.5, mode="eq12", eps=0.0)
    torch.testing.assert_close(out.shaped_rewards.cpu(), torch.tensor([[1.5, 1.5, -1.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages.cpu(),
                               torch.tensor([[0.5773503, 0.5773503, -1.1547005]]), atol=1e-6,
                               rtol=0)

    # without scaling: r~ - mean; with clip = 1.2 the boosted rewards are clipped
    out = g2rl_kernels.group_novelty(feats, rewards, lam=0.5, clip=1.2, eps=0.0,
                                     scale_advantages=False)
    torch.testing.assert_close(out.shaped_rewards.cpu(), torch.tensor([[1.2, 1.2, -0.5]]),
                               atol=1e-6, rtol=0)
    mean = (1.2 + 1.2 - 0.5) / 3
    torch.testing.assert_close(out.advantages.cpu(),
                               torch.tensor([[1.2 - mean, 1.2 - mean, -0.5 - mean]]), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    # a group of one: nu = 1, nubar = 0.5, f = 1 (centered), advantage 0
    out = g2rl_kernels.group_novelty(torch.randn(3, 1, 4, device=device),
                                     torch.tensor([[1.0], [-1.0], [1.0]], device=device))
    assert torch.equal(out.novelty.cpu(), torch.ones(3, 1))
    assert torch.equal(out.shaped_rewards.cpu(), torch.tensor([[1.0], [-1.0], [1.0]]))
    assert torch.equal(out.advantages.cpu(), torch.zeros(3, 1))
    # a zero feature vector: cosines 0, never NaN
    feats = torch.randn(2, 4, 8, device=device)
    feats[0, 1] = 0
    out = g2rl_kernels.group_novelty(feats, torch.ones(2, 4, device=device))
    assert torch.isfinite(out.cosine).all() and torch.isfinite(out.advantages).all()
    assert torch.equal(out.cosine[0, 1].cpu(), torch.zeros(4))
    assert torch.equal(out.cosine[0, :, 1].cpu(), torch.zeros(4))
    # identical vectors: flat nu -> nubar 0.5 -> f = 1: shaped = r, advantages = plain GRPO
    feats = torch.randn(1, 1, 16, device=device).expand(1, 5, 16)
    r = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]], device=device)
    out = g2rl_kernels.group_novelty(feats, r)
    torch.testing.assert_close(out.shaped_rewards, r)
    torch.testing.assert_close(out.advantages, (r - r.mean()) / (r.std() + 1e-6))
    # lam = 0 is exactly GRPO whatever the features
    feats = torch.randn(4, 6, 10, device=device)
    r = torch.randint(0, 2, (4, 6), device=device).float() * 2 - 1
    out = g2rl_kernels.group_novelty(feats, r, lam=0.0)
    torch.testing.assert_close(out.shaped_rewards, r)
    std = r.std(dim=1, keepdim=True)
    torch.testing.assert_close(out.advantages, (r - r.mean(1, keepdim=True)) / (std + 1e-6))
    # large rewards do not overflow the peer weights
    out = g2rl_kernels.group_novelty(torch.randn(2, 3, 5, device=device),
                                     torch.tensor([[200.0, -300.0, 50.0]] * 2, device=device))
    assert all(torch.isfinite(t).all() for t in out)
    # empty batch
    out = g2rl_kernels.group_novelty(torch.randn(0, 4, 3, device=device),
                                     torch.randn(0, 4, device=device))
    assert out.novelty.shape == (0, 4) and out.cosine.shape == (0, 4, 4)


def test_compiles_with_torch_compile():
    feats, rewards = random_inputs(4, 6, 32, torch.float32, "cpu", seed=1)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def advantages(f, r):
        return torch.ops.g2rl.group_novelty(f * 2.0, r, 0.5, 3.0, 0, 1e-6, True, 0.01, 0.05,
                                            True)[3] + 0.0

    torch._dynamo.reset()
    got = advantages(feats, rewards)
    torch.testing.assert_close(got, g2rl_kernels.group_novelty(feats * 2.0, rewards).advantages)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        random_inputs(3, 4, 16, torch.float32, device, seed=5),
        random_inputs(2, 1, 7, torch.bfloat16, device, seed=6),
        random_inputs(5, 8, 33, torch.float16, device, seed=7),
    ]
    for feats, rewards in samples:
        for mode in (0, 1):
            torch.library.opcheck(
                torch.ops.g2rl.group_novelty.default,
                (feats, rewards, 0.5, 3.0, mode, 1e-6, mode == 0, 0.01, 0.05, mode == 1),
            )


@pytest.mark.parametrize("device", DEVICES)
def test_span_floor_worked_by_hand(device):
    # The group of test_worked_by_hand: nu = (a, a, 0.5), a = 1 - 0.5 / (e^2 + 1), spread
    # a - 0.5 = 0.4404 (min-max: nubar = (1, 1, 0)). With delta = 1 > spread:
    # nubar = 0.5 + (nu - (a + 0.5) / 2) / 1 = (0.5 + (a - 0.5) / 2, same, 0.5 - (a - 0.5) / 2).
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], device=device)
    rewards = torch.tensor([[1.0, 1.0, -1.0]], device=device)
    a = 1 - 0.5 / (math.e**2 + 1)
    half = (a - 0.5) / 2
    nubar = torch.tensor([[0.5 + half, 0.5 + half, 0.5 - half]], dtype=torch.float64)
    r = rewards.double().cpu()
    for delta, expected_nubar in ((1.0, nubar), (0.01, torch.tensor([[1.0, 1.0, 0.0]]))):
        out = g2rl_kernels.group_novelty(feats, rewards, lam=0.5, eps=0.0, span_floor=delta)
        shaped = r * (1 + 0.5 * (2 * expected_nubar.double() - 1))
        torch.testing.assert_close(out.shaped_rewards.cpu().double(), shaped, atol=1e-6, rtol=0)
    # delta = 0 and identical scores: nubar = 0.5 (no division by zero)
    same = torch.ones(1, 4, 3, device=device)
    out = g2rl_kernels.group_novelty(same, torch.tensor([[1.0, -1.0, 1.0, 1.0]], device=device),
                                     span_floor=0.0)
    assert torch.equal(out.shaped_rewards.cpu(), torch.tensor([[1.0, -1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_std_floor_worked_by_hand(device):
    # lam = 0: shaped = r = (1, 1.01); std (n - 1) = 0.01 / sqrt(2) = 0.00707 < 0.05, so the
    # advantages are (r - mean) / 0.05 = (-0.1, +0.1) instead of (-0.707, +0.707).
    feats = torch.randn(1, 2, 5, device=device)
    rewards = torch.tensor([[1.0, 1.01]], device=device)
    out = g2rl_kernels.group_novelty(feats, rewards, lam=0.0)
    torch.testing.assert_close(out.advantages.cpu(), torch.tensor([[-0.1, 0.1]]), atol=1e-5,
                               rtol=0)
    out = g2rl_kernels.group_novelty(feats, rewards, lam=0.0, std_floor=0.0)
    std = 0.01 / math.sqrt(2)
    torch.testing.assert_close(out.advantages.cpu(),
                               torch.tensor([[-0.005 / (std + 1e-6), 0.005 / (std + 1e-6)]]),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_uniform_groups(device, mode):
    # groups 0 and 1 all wrong / all correct, group 2 mixed
    feats, _ = random_inputs(3, 6, 16, torch.float32, device, seed=11)
    rewards = torch.tensor([[-1.0] * 6, [1.0] * 6, [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]],
                           device=device)
    zero = g2rl_kernels.group_novelty(feats, rewards, mode=mode)  # the default
    shape = g2rl_kernels.group_novelty(feats, rewards, mode=mode, uniform_groups="shape")
    assert torch.equal(zero.advantages[:2].cpu(), torch.zeros(2, 6))
    assert (shape.advantages[:2].abs() > 1e-3).any(), "shape must rank uniform groups"
    # mixed groups, novelty and shaped rewards are the same under both rules
    torch.testing.assert_close(zero.advantages[2], shape.advantages[2])
    torch.testing.assert_close(zero.shaped_rewards, shape.shaped_rewards)
    torch.testing.assert_close(zero.novelty, shape.novelty)
    # and both match the float64 oracle
    for rule, out in (("zero", zero), ("shape", shape)):
        ref = reference.group_novelty(feats.double().cpu(), rewards.double().cpu(), mode=mode,
                                      uniform_groups=rule)
        check_against_reference(out, ref, rule)


@pytest.mark.parametrize("device", DEVICES)
def test_lam_zero_without_clip_leaves_any_rewards_untouched(device):
    # rewards on a 0..10 scale: with clip=None and lam = 0 the shaped rewards are the rewards and
    # the advantages are plain group standardisation (the default clip of 3 would change them).
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(5, 8, 12, generator=gen).to(device)
    rewards = torch.randint(0, 11, (5, 8), generator=gen).float().to(device)
    out = g2rl_kernels.group_novelty(feats, rewards, lam=0.0, clip=None, std_floor=0.0,
                                     uniform_groups="shape")
    assert torch.equal(out.shaped_rewards, rewards)
    mean = rewards.mean(1, keepdim=True)
    torch.testing.assert_close(out.advantages, (rewards - mean) / (rewards.std(1, keepdim=True)
                                                                   + 1e-6))
    clipped = g2rl_kernels.group_novelty(feats, rewards, lam=0.0)
    assert not torch.equal(clipped.shaped_rewards, rewards)


def test_float32_matches_float64_where_the_old_rule_did_not():
    # d = 1 features, G = 17: the old rule (min-max down to a spread of 1e-6) moved advantages
    # by 0.155 between float32 and float64; the floors bound it at a fixed tolerance.
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(256, 17, 1, generator=gen)
    rewards = torch.randint(0, 2, (256, 17), generator=gen).float() * 2 - 1
    for uniform in ("zero", "shape"):
        out = g2rl_kernels.group_novelty(feats, rewards, lam=1.0, uniform_groups=uniform)
        ref = reference.group_novelty(feats.double(), rewards.double(), lam=1.0,
                                      uniform_groups=uniform)
        check_against_reference(out, ref, uniform)
