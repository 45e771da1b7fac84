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


def tolerances(ref: NoveltyOutput, lam: float, scale: bool, nu_err: float):
    """Per-group tolerances for shaped rewards and advantages.

    The min-max normalisation divides by the spread of nu within the group, so an error of
    ``nu_err`` in nu becomes about ``nu_err / spread`` in nubar, times 2 lam in the shaped reward;
    groups whose spread is near the 1e-6 threshold may take the other branch. Standardisation
    divides by the std of the shaped rewards.
    """
    nu = ref.novelty
    spread = (nu.max(dim=1).values - nu.min(dim=1).values).unsqueeze(1)  # (B, 1)
    shaped_tol = 1e-5 + 4 * lam * 2 * nu_err / spread.clamp_min(1e-12)
    ambiguous = (spread - 1e-6).abs() < 10 * nu_err  # branch may differ
    shaped_tol = torch.where(ambiguous, torch.full_like(shaped_tol, math.inf), shaped_tol)
    if scale:
        std = ref.shaped_rewards.std(dim=1, keepdim=True) if nu.shape[1] > 1 else torch.ones_like(
            spread)
        adv_tol = 1e-5 + 4 * shaped_tol / (std + 1e-6)
    else:
        adv_tol = 1e-5 + 2 * shaped_tol
    return shaped_tol, adv_tol


def check_against_reference(out, ref, lam, scale, context=""):
    try:
        _check_against_reference(out, ref, lam, scale)
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from exc


def _check_against_reference(out, ref, lam, scale):
    assert isinstance(out, NoveltyOutput)
    B, G = ref.novelty.shape
    for t in out:
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
    assert out.cosine.shape == (B, G, G)
    assert out.novelty.shape == out.shaped_rewards.shape == out.advantages.shape == (B, G)
    cos_err = (out.cosine.double().cpu() - ref.cosine).abs().max().item()
    assert cos_err < 2e-6, cos_err
    nu_err = (out.novelty.double().cpu() - ref.novelty).abs()
    assert nu_err.max().item() < 1e-5, nu_err.max().item()
    shaped_tol, adv_tol = tolerances(ref, lam, scale, nu_err=1e-6)
    assert ((out.shaped_rewards.double().cpu() - ref.shaped_rewards).abs() <= shaped_tol).all()
    assert ((out.advantages.double().cpu() - ref.advantages).abs() <= adv_tol).all()


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
            lam = 0.5 if mode == "centered" else 0.8
            out = g2rl_kernels.group_novelty(feats, rewards, lam=lam, mode=mode,
                                             scale_advantages=scale)
            ref = reference.group_novelty(f64, r64, lam=lam, mode=mode, scale_advantages=scale)
            check_against_reference(out, ref, lam, scale,
                                    f"seed={seed} mode={mode} scale={scale}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    feats, rewards = random_inputs(6, 5, 33, torch.float32, device, seed=3)
    # (B, G, d) view of a (d, G, B) tensor and a strided rewards view
    feats_nc = feats.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    rewards_nc = torch.stack([rewards, rewards], dim=-1)[..., 0]
    assert not feats_nc.is_contiguous() and not rewards_nc.is_contiguous()
    out = g2rl_kernels.group_novelty(feats_nc, rewards_nc)
    ref = reference.group_novelty(feats.double().cpu(), rewards.double().cpu())
    check_against_reference(out, ref, 0.5, True)
    # a bf16 slice with a stride in d
    big = torch.randn(4, 3, 40, device=device).to(torch.bfloat16)
    sliced = big[:, :, ::2]
    out = g2rl_kernels.group_novelty(sliced, rewards[:4, :3])
    ref = reference.group_novelty(sliced.double().cpu(), rewards[:4, :3].double().cpu())
    check_against_reference(out, ref, 0.5, True)


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
        return torch.ops.g2rl.group_novelty(f * 2.0, r, 0.5, 3.0, 0, 1e-6, True)[3] + 0.0

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
                (feats, rewards, 0.5, 3.0, mode, 1e-6, mode == 0),
            )
