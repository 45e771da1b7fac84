"""Properties of g2rl_kernels.group_novelty under random inputs (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import g2rl_kernels

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def groups(draw):
    B = draw(st.integers(1, 4))
    G = draw(st.integers(1, 9))
    d = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, G, d, generator=gen)
    feats += 2.0 * torch.randn(B, 1, d, generator=gen) * torch.rand(B, G, 1, generator=gen)
    if draw(st.booleans()):
        rewards = torch.randint(0, 2, (B, G), generator=gen).float() * 2 - 1
    else:
        rewards = torch.randn(B, G, generator=gen) * 2
    lam = draw(st.floats(0.0, 1.0))
    clip = draw(st.floats(0.1, 5.0))
    mode = draw(st.sampled_from(["centered", "eq12"]))
    return feats, rewards, dict(lam=lam, clip=clip, mode=mode)


def well_spread(nu: torch.Tensor) -> torch.Tensor:
    """(B,) groups whose novelty spread is far from the 1e-6 min-max threshold, where the
    shaped rewards are well conditioned."""
    spread = nu.max(dim=1).values - nu.min(dim=1).values
    return spread > 1e-2


@SETTINGS
@given(groups())
def test_novelty_in_unit_interval_and_shaped_clipped(case):
    feats, rewards, kw = case
    out = g2rl_kernels.group_novelty(feats, rewards, **kw)
    assert ((out.novelty >= 0) & (out.novelty <= 1)).all()
    assert (out.shaped_rewards.abs() <= kw["clip"]).all()
    assert ((out.cosine >= -1 - 1e-5) & (out.cosine <= 1 + 1e-5)).all()


@SETTINGS
@given(groups())
def test_advantages_sum_to_zero(case):
    feats, rewards, kw = case
    for scale in (True, False):
        out = g2rl_kernels.group_novelty(feats, rewards, scale_advantages=scale, **kw)
        tol = 1e-4 * max(1.0, out.advantages.abs().max().item())
        assert (out.advantages.sum(dim=1).abs() <= tol).all()


@SETTINGS
@given(groups(), st.integers(0, 2**31 - 1))
def test_invariant_to_positive_rescaling(case, seed):
    feats, rewards, kw = case
    gen = torch.Generator().manual_seed(seed)
    B, G, _ = feats.shape
    # eps (1e-6) in ||Phi|| + eps breaks exact invariance for tiny vectors: keep norms in [1, 2]
    feats = feats / feats.norm(dim=-1, keepdim=True) * (1 + torch.rand(B, G, 1, generator=gen))
    scales = torch.exp(torch.empty(B, G, 1).uniform_(-2.0, 2.0, generator=gen))
    a = g2rl_kernels.group_novelty(feats, rewards, **kw)
    b = g2rl_kernels.group_novelty(feats * scales, rewards, **kw)
    torch.testing.assert_close(b.cosine, a.cosine, atol=2e-5, rtol=0)
    torch.testing.assert_close(b.novelty, a.novelty, atol=5e-5, rtol=0)
    ok = well_spread(a.novelty)
    torch.testing.assert_close(b.shaped_rewards[ok], a.shaped_rewards[ok], atol=1e-2, rtol=0)


@SETTINGS
@given(groups(), st.integers(0, 2**31 - 1))
def test_permutation_equivariant(case, seed):
    feats, rewards, kw = case
    G = feats.shape[1]
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(seed))
    a = g2rl_kernels.group_novelty(feats, rewards, **kw)
    b = g2rl_kernels.group_novelty(feats[:, perm], rewards[:, perm], **kw)
    torch.testing.assert_close(b.cosine, a.cosine[:, perm][:, :, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.novelty, a.novelty[:, perm], atol=1e-6, rtol=0)
    ok = well_spread(a.novelty)
    torch.testing.assert_close(b.shaped_rewards[ok], a.shaped_rewards[:, perm][ok], atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(b.advantages[ok], a.advantages[:, perm][ok], atol=1e-3, rtol=0)
