"""A tiny Qwen3 model and a character-level tokenizer, built locally (no downloads).

Shared by the rollout / eval tests.
"""

from __future__ import annotations

import string

import torch

SPECIALS = ["<pad>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"]
CHARS = list(string.digits + string.ascii_letters + " +-*/=()[]{}\\.,?!:\n$^_")


def make_tokenizer(chat_template: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        unk_token="?",
        additional_special_tokens=["<|im_end|>", "<|im_start|>"],
    )
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return fast


def make_model(vocab_size: int, seed: int = 0, eos=(1, 2)):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=list(eos),
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = list(eos)
    model.generation_config.pad_token_id = 0
    return model
