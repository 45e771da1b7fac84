"""The truncated importance-sampling (TIS) correction of the policy loss, against float64
hand computations (no vLLM needed: the weights only need the engine's log-probs)."""

from __future__ import annotations

import pytest
import torch

from g2rl.loss import k3_kl, policy_loss, tis_weights


def _inputs(m: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(m, generator=g, dtype=torch.float64) * 4
    # the engine's log-probs: mostly close to the trainer's, some far (both signs)
    rollout = old + torch.randn(m, generator=g, dtype=torch.float64) * 0.3
    logp = old + torch.randn(m, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(m, generator=g, dtype=torch.float64)
    ref = old + torch.randn(m, generator=g, dtype=torch.float64) * 0.1
    return [t.to(dtype) for t in (old, rollout, logp, adv, ref)]


@pytest.mark.parametrize("m,cap", [(1, 2.0), (7, 1.0), (513, 2.0), (64, 5.0), (33, 0.5)])
def test_tis_weights_formula(m, cap):
    old, rollout, *_ = _inputs(m, seed=m)
    w = tis_weights(old, rollout, cap)
    expected = torch.minimum(torch.exp(old.double() - rollout.double()),
                             torch.tensor(cap, dtype=torch.float64))
    assert w.dtype == torch.float32 and w.shape == (m,)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
    assert float(w.max()) <= cap and float(w.min()) > 0
    assert not w.requires_grad


def test_tis_weights_equal_one_without_mismatch_and_float64_kept():
    old = -torch.rand(50, dtype=torch.float64)
    assert torch.equal(tis_weights(old, old.clone(), 2.0), torch.ones(50, dtype=torch.float64))
    # far apart log-probs do not overflow: exp is clamped then capped
    w = tis_weights(torch.tensor([0.0, -100.0]), torch.tensor([-100.0, 0.0]), 3.0)
    assert w.tolist() == pytest.approx([3.0, float(torch.exp(torch.tensor(-20.0)))])


def test_tis_weights_errors():
    with pytest.raises(ValueError, match="1-D of one length"):
        tis_weights(torch.zeros(3), torch.zeros(4), 2.0)
    with pytest.raises(ValueError, match="1-D of one length"):
        tis_weights(torch.zeros(2, 2), torch.zeros(2, 2), 2.0)
    for cap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="cap"):
            tis_weights(torch.zeros(3), torch.zeros(3), cap)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cap", [1.0, 2.0])
def test_policy_loss_with_tis_matches_float64_reference(seed, cap):
    """loss = sum_t [-w_t min(rho A, clip(rho) A) + beta k3] / N with w = min(e^(old-roll), C),
    w without gradient; value and gradient against float64."""
    m, n_tokens, eps_low, eps_high, beta = 37, 50, 0.2, 0.28, 0.05
    old, rollout, logp, adv, ref = _inputs(m, seed)
    x = logp.clone().requires_grad_(True)
    loss, st = policy_loss(x, old, adv, num_tokens=n_tokens, eps_low=eps_low, eps_high=eps_high,
                           ref_logp=ref, kl_coef=beta, rollout_logp=rollout, tis_cap=cap)
    loss.backward()

    xd = logp.double().clone().requires_grad_(True)
    ratio = torch.exp(xd - old.double())
    a = adv.double()
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    w = torch.minimum(torch.exp(old.double() - rollout.double()),
                      torch.tensor(cap, dtype=torch.float64))
    ref_loss = (w * pg + beta * k3_kl(xd, ref.double())).sum() / n_tokens
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-8)
    assert st.tis_weight == pytest.approx(float(w.sum()), rel=1e-6)
    assert st.tis_capped == float((w >= cap).sum())
    assert st.pg_loss == pytest.approx(float((w * pg).sum()), rel=1e-5)
    assert 0 < st.tis_capped < m or cap > 1  # cap 1 clips about half of the tokens


def test_tis_with_unit_weights_is_the_plain_loss():
    old, _, logp, adv, _ = _inputs(40, seed=5)
    x1 = logp.clone().requires_grad_(True)
    x2 = logp.clone().requires_grad_(True)
    plain, st_plain = policy_loss(x1, old, adv, num_tokens=40)
    tis, st_tis = policy_loss(x2, old, adv, num_tokens=40, rollout_logp=old.clone(),
                              tis_cap=2.0)
    plain.backward()
    tis.backward()
    assert float(plain) == float(tis)
    assert torch.equal(x1.grad, x2.grad)
    assert st_plain.tis_weight == 0.0 and st_tis.tis_weight == pytest.approx(40.0)


def test_tis_off_ignores_rollout_logp_and_errors():
    old, rollout, logp, adv, _ = _inputs(10, seed=9)
    a, _ = policy_loss(logp, old, adv, num_tokens=10)
    b, _ = policy_loss(logp, old, adv, num_tokens=10, rollout_logp=rollout, tis_cap=0.0)
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="needs rollout_logp"):
        policy_loss(logp, old, adv, num_tokens=10, tis_cap=2.0)
    with pytest.raises(ValueError, match="tis_cap must be >= 0"):
        policy_loss(logp, old, adv, num_tokens=10, rollout_logp=rollout, tis_cap=-1.0)
    with pytest.raises(ValueError, match="1-D of one length"):
        policy_loss(logp, old, adv, num_tokens=10, rollout_logp=rollout[:5], tis_cap=2.0)


def test_config_tis_cap_needs_vllm():
    from g2rl.config import ConfigError, parse_config

    assert parse_config(["--tis-cap", "2", "--rollout", "vllm"]).tis_cap == 2.0
    assert parse_config([]).tis_cap == 0.0  # off by default
    with pytest.raises(ConfigError, match="--tis-cap needs"):
        parse_config(["--tis-cap", "2", "--rollout", "hf"])
    with pytest.raises(ConfigError, match="--tis-cap must be >= 0"):
        parse_config(["--tis-cap", "-1"])
    with pytest.raises(ConfigError, match="--vllm-kv-cache-gib must be >= 0"):
        parse_config(["--vllm-kv-cache-gib", "-1"])
