"""HFRollout on a tiny Qwen3 model: ids, truncation and texts consistent with ``generate``."""

import pytest
import torch
from _tiny_lm import make_model, make_tokenizer

from g2rl.data import encode_prompt
from g2rl.rollout import HFRollout, RolloutBatch, make_rollout, response_mask


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def model(tok):
    # Near-uniform next-token distribution: some samples hit an EOS, others run out of budget.
    return make_model(len(tok), seed=0)


def prompts(tok):
    return [encode_prompt(tok, q, None) for q in ["1+2=", "hello there", "x"]]


def test_generate_shapes_and_consistency(tok, model):
    eos = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    roll = HFRollout(model, tok, max_new_tokens=16, eos_token_ids=eos)
    p = prompts(tok)
    b = roll.generate(p, 4, seed=3)
    assert isinstance(b, RolloutBatch) and len(b) == 12 and b.n == 4
    assert b.prompt_ids == [x for x in p for _ in range(4)]
    for ids, trunc, text in zip(b.response_ids, b.truncated, b.texts, strict=True):
        assert 1 <= len(ids) <= 16
        n_eos = sum(t in eos for t in ids)
        if trunc:
            assert len(ids) == 16 and n_eos == 0
        else:
            assert n_eos == 1 and ids[-1] in eos  # cut after the first EOS, kept
        assert text == tok.decode(ids, skip_special_tokens=True)
    assert any(b.truncated) and not all(b.truncated)


def test_same_as_model_generate(tok, model):
    """The batch is exactly what generate sampled, cut at the EOS, for the same seed."""
    from transformers import GenerationConfig

    eos = [1, 2]
    p = prompts(tok)
    roll = HFRollout(model, tok, max_new_tokens=6, eos_token_ids=eos, temperature=0.7)
    b = roll.generate(p, 2, seed=11)

    rep = [x for x in p for _ in range(2)]
    width = max(map(len, rep))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in rep])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rep])
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=1.0,
                           top_k=0, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(11)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    gen = out[:, width:]
    m, trunc = response_mask(gen, eos)
    expected = [row[: int(k.sum())] for row, k in zip(gen.tolist(), m, strict=True)]
    assert b.response_ids == expected
    assert b.truncated == trunc.tolist()


def test_seed_is_reproducible_and_leaves_global_rng(tok, model):
    roll = HFRollout(model, tok, max_new_tokens=5)
    p = prompts(tok)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = roll.generate(p, 2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert roll.generate(p, 2, seed=5).response_ids == a.response_ids
    assert roll.generate(p, 2, seed=6).response_ids != a.response_ids


def test_batching_does_not_change_greedy_results(tok, model):
    p = prompts(tok)
    whole = HFRollout(model, tok, max_new_tokens=6, temperature=0.0).generate(p, 2)
    split = HFRollout(model, tok, max_new_tokens=6, temperature=0.0, batch_size=2).generate(p, 2)
    assert whole.response_ids == split.response_ids
    single = [HFRollout(model, tok, max_new_tokens=6, temperature=0.0).generate([x], 1)
              for x in p]
    assert [s.response_ids[0] for s in single] == whole.response_ids[::2]


def test_restores_training_mode_and_no_grad(tok, model):
    model.train()
    roll = HFRollout(model, tok, max_new_tokens=3)
    roll.generate(prompts(tok)[:1], 1, seed=0)
    assert model.training
    model.eval()
    roll.generate(prompts(tok)[:1], 1, seed=0)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    roll.sync_weights(model)  # no-op


def test_default_eos_from_generation_config(tok, model):
    assert HFRollout(model, tok, max_new_tokens=2).eos_token_ids == [1, 2]
    model.generation_config.eos_token_id = 2
    try:
        # the union (issue 8): generation config first, then model config, then tokenizer
        ids = HFRollout(model, tok, max_new_tokens=2).eos_token_ids
        cfg_eos = model.config.eos_token_id
        cfg_eos = cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]
        extra = {*cfg_eos, tok.eos_token_id} - {None, 2}
        assert ids[0] == 2 and set(ids) == {2} | extra and len(ids) == len(set(ids))
    finally:
        model.generation_config.eos_token_id = [1, 2]


def test_make_rollout_hf_and_auto(tok, model):
    r = make_rollout("hf", model, tok, max_new_tokens=3, gpu_memory_utilization=0.5)
    assert isinstance(r, HFRollout)
    if not torch.cuda.is_available():
        assert isinstance(make_rollout("auto", model, tok, max_new_tokens=3), HFRollout)


def test_bad_arguments(tok, model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFRollout(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        HFRollout(model, tok, max_new_tokens=1, top_p=0)
    roll = HFRollout(model, tok, max_new_tokens=1)
    with pytest.raises(ValueError, match="n must be"):
        roll.generate([[3]], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        roll.generate([[]], 1)
    assert len(roll.generate([], 2)) == 0
