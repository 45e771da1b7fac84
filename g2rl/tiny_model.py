"""A tiny Qwen3-architecture causal LM and a character-level tokenizer, built locally.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over single characters
(printable ASCII plus newline) wrapped in :class:`transformers.PreTrainedTokenizerFast`, with a
small chat template; the model is a randomly initialised :class:`transformers.Qwen3ForCausalLM`
whose initial weights depend only on the seed. Both are saved with ``save_pretrained`` under a
cache directory keyed by their configuration, so later runs load the very same files (and
``AutoModelForCausalLM`` / ``AutoTokenizer`` can load them like any other checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

#: Minimal chat template: ``[system\n]Q:<user>\nA:`` (the tiny model only ever sees this).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q:{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A:{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model (about 0.8 M parameters by default)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 128
    seed: int = 1234

    @classmethod
    def sized(cls, hidden_size: int = 128, num_hidden_layers: int = 4) -> TinySpec:
        """The default spec at another width and depth: heads of 32, MLP 3x wider, two
        key-value heads (the default spec itself for 128 and 4)."""
        return cls(hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                   num_hidden_layers=num_hidden_layers, num_attention_heads=hidden_size // 32,
                   num_key_value_heads=2 if hidden_size // 32 % 2 == 0 else 1)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "|v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$G2RL_CACHE`` if set, else ``~/.cache/g2rl``."""
    return Path(os.environ.get("G2RL_CACHE", "~/.cache/g2rl")).expanduser()


def build_tokenizer():
    """A deterministic character-level :class:`PreTrainedTokenizerFast` (pad != eos, no bos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        model_max_length=TinySpec.max_position_embeddings,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_model(tokenizer, spec: TinySpec = TinySpec()):
    """A freshly initialised tiny :class:`Qwen3ForCausalLM`; its weights depend on
    ``spec.seed`` only."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, do_sample=True,
    )
    return model


def tiny_model_path(cache_dir: str | os.PathLike | None = None,
                    spec: TinySpec = TinySpec()) -> Path:
    """Directory of the cached tiny model and tokenizer, created on first use (atomically)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = root / f"tiny-qwen3-{spec.key()}"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=root))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, spec)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            if not (path / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
