"""``--novelty-shape correct``: only correct answers are shaped; wrong ones keep their reward."""

import math

import pytest
import torch

from g2rl.trainer import advantages_for

KW = dict(lam=0.5, clip=3.0, mode="centered", eps=1e-6, scale=True)


def _inputs(seed: int = 0, b: int = 6, g: int = 8, d: int = 16):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, g, d, generator=gen)
    rewards = torch.where(torch.rand(b, g, generator=gen) < 0.4, 1.0, -1.0)
    rewards[0] = 1.0  # all correct
    rewards[1] = -1.0  # all wrong
    rewards[2, :3] = 1.0  # several correct
    return feats, rewards


def test_default_is_the_paper_chain():
    feats, rewards = _inputs()
    a = advantages_for("g2rl", feats, rewards, **KW)
    b = advantages_for("g2rl", feats, rewards, **KW, shape="all")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["centered", "eq12"])
def test_correct_only_by_hand(mode):
    feats, rewards = _inputs(1)
    kw = dict(KW, mode=mode)
    full = advantages_for("g2rl", feats, rewards, **kw)
    out = advantages_for("g2rl", feats, rewards, **kw, shape="correct")
    ok = rewards > 0
    assert torch.equal(out.novelty, full.novelty) and torch.equal(out.cosine, full.cosine)
    assert torch.equal(out.shaped_rewards[ok], full.shaped_rewards[ok])
    assert torch.equal(out.shaped_rewards[~ok], rewards[~ok])
    for b in range(rewards.shape[0]):
        r = out.shaped_rewards[b].double()
        if bool((rewards[b] == rewards[b, 0]).all()):
            assert torch.equal(out.advantages[b], torch.zeros_like(out.advantages[b]))
            continue
        want = (r - r.mean()) / max(float(r.std()) + 1e-6, 0.05)
        torch.testing.assert_close(out.advantages[b].double(), want, atol=2e-5, rtol=1e-5)
        # a wrong answer never gets a positive advantage
        assert bool((out.advantages[b][~ok[b]] < 0).all())
    # the paper's chain does give some wrong answers a positive advantage here (near misses)
    assert bool((full.advantages[~ok] > 0).any()) or mode == "eq12"


def test_correct_only_with_uniform_groups_shaped():
    feats, rewards = _inputs(2)
    out = advantages_for("g2rl", feats, rewards, **KW, uniform_groups="shape", shape="correct")
    r = out.shaped_rewards[0].double()  # all correct: shaped, so not uniform any more
    want = (r - r.mean()) / max(float(r.std()) + 1e-6, 0.05)
    torch.testing.assert_close(out.advantages[0].double(), want, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.advantages[1], torch.zeros(8))  # all wrong: all -1, std 0


def test_nan_reward_left_out():
    feats, rewards = _inputs(3)
    rewards[2, 5] = math.nan
    out = advantages_for("g2rl", feats, rewards, **KW, shape="correct")
    assert float(out.advantages[2, 5]) == 0.0 and float(out.shaped_rewards[2, 5]) == 0.0
    assert bool(torch.isfinite(out.advantages).all())
    keep = [i for i in range(8) if i != 5]
    r = out.shaped_rewards[2, keep].double()
    want = (r - r.mean()) / max(float(r.std()) + 1e-6, 0.05)
    torch.testing.assert_close(out.advantages[2, keep].double(), want, atol=2e-5, rtol=1e-5)


def test_grpo_ignores_shape_and_bad_value_raises():
    feats, rewards = _inputs(4)
    a = advantages_for("grpo", feats, rewards, **KW)
    b = advantages_for("grpo", feats, rewards, **KW, shape="correct")
    assert torch.equal(a.advantages, b.advantages)
    with pytest.raises(ValueError, match="shape"):
        advantages_for("g2rl", feats, rewards, **KW, shape="wrong")


def test_config_option():
    from g2rl.config import ConfigError, parse_config

    assert parse_config([]).novelty_shape == "all"
    assert parse_config(["--novelty-shape", "correct"]).novelty_shape == "correct"
    with pytest.raises((ConfigError, SystemExit)):
        parse_config(["--novelty-shape", "wrong"])
