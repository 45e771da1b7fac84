"""NaN rewards (answers that could not be scored) handled as TRL does (issue 8, section 3):
left out of their group's mean, std and novelty peers, advantage 0. No TRL needed here."""

from __future__ import annotations

import math

import pytest
import torch

import g2rl_kernels
from g2rl.trainer import group_novelty_skip_nan

KW = dict(mode="centered", span_floor=0.01, uniform_groups="zero")


def trl_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's group advantages (scale_rewards='group'), float64, written out."""
    r = rewards.double()
    mean = torch.nanmean(r, dim=1, keepdim=True)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True)
    var = torch.where(valid, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (n - 1)
    adv = (r - mean) / (var.sqrt() + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lambda_zero_equals_trl_with_nan(seed):
    gen = torch.Generator().manual_seed(seed)
    b, g, d = 7, 5, 11
    feats = torch.randn(b, g, d, generator=gen)
    rewards = torch.randint(0, 6, (b, g), generator=gen).float() * 1.5 - 2.0
    rewards[torch.rand(b, g, generator=gen) < 0.25] = math.nan
    rewards[0] = math.nan  # a group nobody scored
    rewards[1, 1:] = math.nan  # a group of one
    out = group_novelty_skip_nan(feats, rewards, lam=0.0, clip=None, eps=1e-4, std_floor=0.0,
                                 **KW)
    torch.testing.assert_close(out.advantages.double(), trl_advantages(rewards), atol=2e-6,
                               rtol=1e-6)
    assert (out.advantages[torch.isnan(rewards)] == 0).all()
    assert (out.advantages[:2] == 0).all()


def test_shaped_groups_with_nan_use_their_scored_members_only():
    gen = torch.Generator().manual_seed(3)
    b, g, d = 4, 6, 9
    feats = torch.randn(b, g, d, generator=gen)
    rewards = torch.randint(0, 2, (b, g), generator=gen).float() * 2 - 1
    rewards[0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])
    rewards[2] = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    rewards[2, [1, 4]] = math.nan
    kw = dict(lam=0.8, clip=3.0, eps=1e-6, std_floor=0.05, **KW)
    out = group_novelty_skip_nan(feats, rewards, **kw)
    keep = torch.tensor([0, 2, 3, 5])
    sub = g2rl_kernels.group_novelty(feats[2, keep][None], rewards[2, keep][None], **kw)
    torch.testing.assert_close(out.advantages[2, keep], sub.advantages[0])
    torch.testing.assert_close(out.novelty[2, keep], sub.novelty[0])
    torch.testing.assert_close(out.cosine[2][keep][:, keep], sub.cosine[0])
    assert (out.advantages[2, [1, 4]] == 0).all() and (out.cosine[2, 1] == 0).all()
    # groups without NaN are the batched call's
    full = g2rl_kernels.group_novelty(feats[[0, 1, 3]], rewards[[0, 1, 3]], **kw)
    torch.testing.assert_close(out.advantages[[0, 1, 3]], full.advantages)
    # and the scored members of group 2 differ from what a 0 reward in place of NaN gives
    zeroed = g2rl_kernels.group_novelty(feats[2:3], rewards[2:3].nan_to_num(0.0), **kw)
    assert not torch.allclose(zeroed.advantages[0, keep], sub.advantages[0])


def test_no_nan_is_one_batched_call():
    feats = torch.randn(3, 4, 5)
    rewards = torch.tensor([[1.0, -1, 1, -1], [1, 1, 1, 1], [0.5, 2, -1, 0]])
    kw = dict(lam=0.5, clip=None, eps=1e-6, std_floor=0.05, **KW)
    a = group_novelty_skip_nan(feats, rewards, **kw)
    b = g2rl_kernels.group_novelty(feats, rewards, **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_trainer_step_with_unscored_answers(tmp_path):
    """Trainer.step with a reward function that returns None for some answers: the step runs
    (no NaN/inf error), the reward metrics leave them out."""
    from g2rl.config import TrainConfig
    from g2rl.data import Example
    from g2rl.rollout.hf import HFRollout
    from g2rl.tiny_model import TinySpec, build_model, build_tokenizer
    from g2rl.trainer import Trainer

    tok = build_tokenizer()
    model = build_model(tok, TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=16))
    calls = {"n": 0}

    def reward(text: str, answer: str) -> float | None:
        calls["n"] += 1
        return None if calls["n"] % 3 == 0 else float(len(text) % 2) * 2 - 1

    cfg = TrainConfig(prompts_per_step=2, group_size=4, max_new_tokens=4, mini_batches=1,
                      output_dir=str(tmp_path))
    examples = [Example(prompt=f"{i} 2 3>5", answer="2+3") for i in range(4)]
    roll = HFRollout(model, tok, max_new_tokens=4)
    trainer = Trainer(cfg, model, tok, examples, reward, roll)
    m = trainer.step()
    assert calls["n"] == 8
    assert math.isfinite(m["reward_mean"]) and math.isfinite(m["reward_std"])
    assert math.isfinite(m["adv_abs_mean"]) and math.isfinite(m["pg_loss"])
