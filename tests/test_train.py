"""``python -m g2rl.train`` end to end at tiny sizes (each method), the step's pieces against
hand-computed values, and the bad-input errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from g2rl.config import METHODS
from g2rl.train import main

TINY = [
    "--steps", "2", "--prompts-per-step", "3", "--group-size", "4", "--sft-steps", "4",
    "--sft-batch-size", "8", "--train-problems", "100", "--eval-problems", "6", "--eval-n", "2",
    "--eval-ks", "1,2", "--max-new-tokens", "8", "--micro-batch-size", "5", "--no-progress",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache directory for the tiny model, shared by every test file of the session."""
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


@pytest.fixture(scope="module")
def tiny_path(cache):
    from g2rl.tiny_model import tiny_model_path

    return str(tiny_model_path(cache))


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end(method, tmp_path, cache):
    out = tmp_path / "run"
    rc = main([*TINY, "--method", method, "--cache-dir", cache, "--output-dir", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("reward_mean", "accuracy", "kl", "entropy", "clip_frac", "novelty_mean",
                    "response_len", "time"):
            assert math.isfinite(m[key]), key
        assert -1 <= m["reward_mean"] <= 1 and 0 <= m["accuracy"] <= 1
        assert 0 <= m["novelty_mean"] <= 1
        assert m["tokens"] > 0
        # geometry (spec section 6) and the collapse flag, every method
        assert -1 <= m["feature_cos_mean"] <= 1 and 0 <= m["feature_neg_share"] <= 1
        assert 1 <= m["distinct_per_group"] <= 4
        assert 0 <= m["uniform_group_frac"] <= 1 and 0 <= m["adv_mass_uniform"] <= 1
        assert m["collapse_warning"] is False
        if method == "embedding":  # the packaged sentence model is installed with [test]
            assert -1 <= m["semantic_cos_mean"] <= 1
    summary = json.loads((out / "eval_summary.json").read_text())
    for name in ("before_sft", "start", "end"):
        assert 0 <= summary[name]["pass@1"] <= 1
        assert "pass@2" in summary[name] and "maj@2" in summary[name]
        assert -1 <= summary[name]["feature_cos_mean"] <= 1
    ckpt = Path(summary["final_checkpoint"])
    assert ckpt.name == "step_000002"
    for f in ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json",
              "config.json", "tokenizer.json"):
        assert (ckpt / f).is_file(), f
    assert json.loads((ckpt / "trainer_state.json").read_text())["data_position"] == 6
    assert (out / "training.png").stat().st_size > 1000
    assert "method: " + method in (out / "config.yaml").read_text()
    # the checkpoint loads with plain transformers, as g2rl.eval does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(ckpt))
    AutoTokenizer.from_pretrained(str(ckpt))


def test_jsonl_data_with_math_reward(tmp_path, tiny_path):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["--model", tiny_path, "--data", str(data), "--eval-data", str(data),
               "--eval-problems", "2", "--eval-n", "2", "--eval-ks", "1", "--steps", "1",
               "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
               "--kl-coef", "0", "--no-progress", "--output-dir", str(out)])
    assert rc == 0
    cfg = (out / "config.yaml").read_text()
    assert "reward: math" in cfg and "sft_steps: 0" in cfg
    assert "Please reason step by step" in cfg  # the paper's system prompt
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# ----------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', "line 2"),
    ('{"prompt": "a"}\n', "missing field 'answer'"),
])
def test_bad_dataset(tmp_path, tiny_path, capsys, content, match):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    rc = main(["--model", tiny_path, "--data", str(data), "--output-dir", str(tmp_path / "r"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data" in err and str(data) in err and match in err


def test_model_dir_without_config(tmp_path, capsys):
    rc = main(["--model", str(tmp_path), "--data", "builtin", "--sft-steps", "0",
               "--output-dir", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert f"--model {tmp_path}: no config.json" in capsys.readouterr().err


def test_resume_needs_a_checkpoint_and_fresh_runs_refuse_old_ones(tmp_path, cache, capsys):
    rc = main([*TINY, "--cache-dir", cache, "--output-dir", str(tmp_path), "--resume"])
    assert rc == 2
    assert "--resume: no complete checkpoint" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000001" / "trainer_state.json").write_text("{}")
    rc = main([*TINY, "--cache-dir", cache, "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "already holds checkpoints; add --resume" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, cache, capsys, monkeypatch):
    import g2rl.trainer as trainer_mod

    real = trainer_mod.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan"), stats

    monkeypatch.setattr(trainer_mod, "policy_loss", poisoned)
    out = tmp_path / "run"
    rc = main([*TINY, "--cache-dir", cache, "--output-dir", str(out)])
    assert rc == 1
    assert "RL step 1: the loss is nan" in capsys.readouterr().err
    from g2rl.checkpoint import latest_checkpoint

    assert latest_checkpoint(out / "checkpoints").name == "step_000000"
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()


def test_non_finite_hidden_states_stop_with_exit_code_1(tmp_path, cache, capsys, monkeypatch):
    """A diverged policy (NaN hidden states in the no-grad sensitivity pass) ends the run like a
    non-finite loss: exit code 1 and a message, not a traceback."""
    import g2rl.trainer as trainer_mod

    real = trainer_mod.response_hidden
    monkeypatch.setattr(trainer_mod, "response_hidden",
                        lambda model, batch: real(model, batch) * float("nan"))
    out = tmp_path / "run"
    rc = main([*TINY, "--cache-dir", cache, "--output-dir", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "stopped: the policy's outputs are not finite: hidden[0] (token 0" in err, err


# ----------------------------------------------------------------------- the step's pieces
def test_grpo_advantages_hand_values():
    from g2rl.trainer import advantages_for

    rewards = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    feats = torch.randn(1, 4, 5)
    for method in ("grpo", "entropy"):
        out = advantages_for(method, feats, rewards, lam=0.5, clip=3.0, mode="centered",
                             eps=1e-6, scale=True)
        # mean 0, std (n - 1) = sqrt(4 / 3): +-0.8660
        expected = torch.tensor([[1.0, -1.0, -1.0, 1.0]]) / math.sqrt(4 / 3)
        assert torch.allclose(out.advantages, expected, atol=1e-5)
        assert torch.equal(out.shaped_rewards, rewards)  # lambda = 0: no shaping
    same = advantages_for("grpo", feats, torch.ones(1, 4), lam=0.5, clip=3.0, mode="centered",
                          eps=1e-6, scale=True)
    assert torch.equal(same.advantages, torch.zeros(1, 4))
    # grpo never clips: rewards on a 0..10 scale are standardised as they are
    big = torch.tensor([[0.0, 10.0, 4.0, 7.0]])
    out = advantages_for("grpo", feats, big, lam=0.5, clip=3.0, mode="centered", eps=1e-6,
                         scale=True)
    assert torch.equal(out.shaped_rewards, big)
    torch.testing.assert_close(out.advantages, (big - big.mean()) / (big.std() + 1e-6))


def test_uniform_groups_option_reaches_the_advantages():
    from g2rl.trainer import advantages_for

    feats = torch.randn(2, 4, 6)
    rewards = torch.tensor([[-1.0] * 4, [1.0, -1.0, -1.0, 1.0]])
    kw = dict(lam=0.5, clip=3.0, mode="centered", eps=1e-6, scale=True)
    zero = advantages_for("g2rl", feats, rewards, **kw)
    shape = advantages_for("g2rl", feats, rewards, uniform_groups="shape", **kw)
    assert torch.equal(zero.advantages[0], torch.zeros(4))
    assert shape.advantages[0].abs().max() > 0.1
    torch.testing.assert_close(zero.advantages[1], shape.advantages[1])


def test_geometry_metrics_advantage_mass():
    from g2rl.trainer import advantages_for, geometry_metrics

    feats = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    rewards = torch.tensor([[-1.0] * 4, [1.0, -1.0, -1.0, 1.0]])
    kw = dict(lam=0.5, clip=3.0, mode="centered", eps=1e-6, scale=True)
    shape = advantages_for("g2rl", feats, rewards, uniform_groups="shape", **kw)
    m = geometry_metrics(shape, rewards, feats, None, "features")
    mass = shape.advantages.abs().sum(dim=1)
    assert m["uniform_group_frac"] == 0.5
    assert math.isclose(m["adv_mass_uniform"], float(mass[0] / mass.sum()), rel_tol=1e-6)
    zero = advantages_for("g2rl", feats, rewards, **kw)
    assert geometry_metrics(zero, rewards, feats, None, "features")["adv_mass_uniform"] == 0.0
    # the feature cosine over pairs i < j, computed independently
    p = torch.nn.functional.normalize(feats, dim=-1)
    cos = p @ p.transpose(1, 2)
    iu = torch.triu_indices(4, 4, 1)
    vals = cos[:, iu[0], iu[1]]
    assert math.isclose(m["feature_cos_mean"], float(vals.mean()), abs_tol=1e-5)
    assert math.isclose(m["feature_neg_share"], float((vals < 0).double().mean()),
                        rel_tol=1e-12)


def test_g2rl_advantages_hand_values():
    from g2rl.trainer import advantages_for

    # two correct responses along one direction, an incorrect one orthogonal to them
    feats = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    rewards = torch.tensor([[1.0, 1.0, -1.0]])
    out = advantages_for("g2rl", feats, rewards, lam=0.5, clip=3.0, mode="centered", eps=1e-6,
                         scale=True)
    e = math.e
    # nu_1 = 1 - w_12 * 1 = 1 - e / (e + 1/e); nu_3 = 1 (orthogonal to both peers)
    nu12 = 1 - e / (e + 1 / e)
    assert torch.allclose(out.novelty, torch.tensor([[nu12, nu12, 1.0]]), atol=1e-5)
    # nubar = [0, 0, 1] -> f = [0.5, 0.5, 1.5] -> shaped = [0.5, 0.5, -1.5]
    assert torch.allclose(out.shaped_rewards, torch.tensor([[0.5, 0.5, -1.5]]), atol=1e-5)
    # mean -1/6, centred [2/3, 2/3, -4/3], std (n - 1) = sqrt(4/3)
    s = math.sqrt(4 / 3)
    assert torch.allclose(out.advantages, torch.tensor([[2 / 3 / s, 2 / 3 / s, -4 / 3 / s]]),
                          atol=1e-5)


def test_pack_aligns_targets_with_hidden_positions():
    from g2rl.trainer import pack

    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t + 1; only response tokens are targets
    assert b.targets.tolist() == [[-100, -100, 1, 2, -100], [3, 4, 9, -100, -100]]
    assert b.num_tokens == 5
    sub = b.rows(torch.tensor([0]))
    assert sub.input_ids.shape == (1, 5)
