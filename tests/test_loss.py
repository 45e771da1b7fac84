"""The policy loss, k3 KL, token-mean aggregation and the autograd log-probs, against values
computed by hand."""

import math

import pytest
import torch

from g2rl.loss import k3_kl, policy_loss, token_logprobs


def test_clipped_surrogate_hand_values():
    # ratios 1.5, 0.5, 1.1, 0.7 (old log-prob 0); eps 0.2 on both sides.
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([2.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss, st = policy_loss(logp, torch.zeros(4, dtype=torch.float64), adv, num_tokens=4,
                           eps_low=0.2, eps_high=0.2)
    # token 1: min(3.0, 1.2 * 2) = 2.4 (clipped)   -> -2.4
    # token 2: min(-0.5, 0.8 * -1) = -0.8 (clipped) -> 0.8
    # token 3: min(-1.1, -1.1) = -1.1                -> 1.1
    # token 4: min(0.7, 0.8) = 0.7 (ratio < 1 - eps but A > 0: not clipped) -> -0.7
    assert loss.item() == pytest.approx((-2.4 + 0.8 + 1.1 - 0.7) / 4)
    assert st.clipped == 2 and st.tokens == 4
    loss.backward()
    # clipped tokens have no gradient; others d(-rho A)/dlogp = -rho A, divided by 4
    expected = torch.tensor([0.0, 0.0, 1.1 / 4, -0.7 / 4], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected)


def test_asymmetric_clip():
    logp = torch.tensor([math.log(1.25), math.log(1.25)], requires_grad=True)
    adv = torch.tensor([1.0, 1.0])
    # eps_high 0.28: a ratio of 1.25 is inside, so both tokens keep their gradient
    loss, st = policy_loss(logp, torch.zeros(2), adv, num_tokens=2, eps_low=0.2, eps_high=0.28)
    assert st.clipped == 0
    assert loss.item() == pytest.approx(-1.25)
    _, st = policy_loss(logp, torch.zeros(2), adv, num_tokens=2, eps_low=0.2, eps_high=0.2)
    assert st.clipped == 2


def test_k3_hand_value():
    logp = torch.tensor([math.log(0.5), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    kl = k3_kl(logp, ref)
    # delta = log 0.5: 0.5 - log 0.5 - 1; equal log-probs: 0
    assert kl[0].item() == pytest.approx(0.5 - math.log(0.5) - 1, rel=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_kl_and_entropy_terms():
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    ref = torch.tensor([math.log(0.25)])
    ent = torch.tensor([0.7], requires_grad=True)
    loss, st = policy_loss(logp, logp.detach(), torch.tensor([1.0]), num_tokens=1,
                           ref_logp=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    k3 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(-1.0 + 0.1 * k3 - 0.01 * 0.7, rel=1e-6)
    assert st.kl == pytest.approx(k3, rel=1e-6)
    loss.backward()
    assert ent.grad.item() == pytest.approx(-0.01)
    # d/dlogp [-rho + 0.1 (exp(ref - logp) - (ref - logp) - 1)] = -1 + 0.1 (1 - 0.5)
    assert logp.grad.item() == pytest.approx(-1.0 + 0.1 * 0.5, rel=1e-6)


def test_token_mean_over_accumulated_batch():
    """Micro-batch losses normalised by the mini-batch token count add up to the token mean."""
    torch.manual_seed(0)
    logp = torch.randn(10, dtype=torch.float64).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(10, dtype=torch.float64)
    # sequence advantages broadcast to tokens: a 7-token and a 3-token sequence
    adv = torch.tensor([1.0] * 7 + [-2.0] * 3, dtype=torch.float64)
    whole, _ = policy_loss(logp, old, adv, num_tokens=10)
    g_whole = torch.autograd.grad(whole, logp)[0]
    parts = [policy_loss(logp[s], old[s], adv[s], num_tokens=10)[0]
             for s in (slice(0, 7), slice(7, 10))]
    total = parts[0] + parts[1]
    assert total.item() == pytest.approx(whole.item())
    assert torch.allclose(torch.autograd.grad(total, logp)[0], g_whole)
    # not the mean of per-sequence means
    seq_means = (parts[0] * 10 / 7 + parts[1] * 10 / 3) / 2
    assert seq_means.item() != pytest.approx(whole.item())


def test_policy_loss_errors():
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), num_tokens=0)
    with pytest.raises(ValueError, match="1-D"):
        policy_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), num_tokens=2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), num_tokens=2, kl_coef=0.1)


@pytest.mark.parametrize("chunk", [4096, 5])
def test_token_logprobs_match_log_softmax(chunk):
    torch.manual_seed(1)
    m, d, v, temp = 13, 8, 11, 0.7
    h = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64)
    y = torch.randint(0, v, (m,))
    lp, ent = token_logprobs(h, w, y, temperature=temp, bias=b, with_entropy=True,
                             chunk_size=chunk)
    logits = (h @ w.t() + b) / temp
    ref = torch.log_softmax(logits, -1)
    ref_lp = ref.gather(-1, y[:, None]).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    assert torch.allclose(lp, ref_lp, atol=1e-10)
    assert torch.allclose(ent, ref_ent, atol=1e-10)
    g = torch.autograd.grad((lp * torch.arange(m)).sum() + ent.sum(), (h, w))
    g_ref = torch.autograd.grad((ref_lp * torch.arange(m)).sum() + ref_ent.sum(), (h, w))
    for a, r in zip(g, g_ref, strict=True):
        assert torch.allclose(a, r, atol=1e-10)
