"""Rollouts with transformers' ``generate`` (CPU or GPU, same module as the trainer)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from .base import RolloutBatch, build_batch, check_sampling, generation_eos_ids

__all__ = ["HFRollout"]


class HFRollout:
    """Sample responses with ``model.generate`` on the trainer's own module.

    Sampling is plain temperature / top-p / top-k sampling: a fresh ``GenerationConfig`` is
    built so that no repetition penalty or other processor of the checkpoint's generation
    config changes the sampling distribution (the trainer's log-probs assume it).

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel``).
        tokenizer: its tokenizer (for decoding and the pad id).
        max_new_tokens: response token budget.
        temperature: sampling temperature; 0 means greedy.
        top_p, top_k: nucleus / top-k filtering (1.0 and 0 disable them).
        eos_token_ids: ids that end a response; default: the model's generation config.
        batch_size: at most this many sequences (prompts x n) per ``generate`` call.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> None:
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.batch_size = batch_size
        self.eos_token_ids = (
            [int(e) for e in eos_token_ids]
            if eos_token_ids
            else generation_eos_ids(model, tokenizer)
        )
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        sample = self.temperature > 0
        kw: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None),
        )
        if sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**kw)

    def _left_pad(self, prompts: Sequence[Sequence[int]], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` left-padded ids and attention mask."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if len(p):
                ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
                mask[i, width - len(p):] = 1
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, *, seed: int | None = None
                 ) -> RolloutBatch:
        """Sample ``n`` responses for each prompt (token ids, no padding).

        ``seed`` makes the sampling reproducible without touching the global RNG state; with
        ``seed=None`` the global torch RNG is used (and advanced).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompts:
            return RolloutBatch([], [], [], [], n=n)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        device = next(self.model.parameters()).device
        per_call = max(1, (self.batch_size or len(prompts) * n) // n)
        cfg = self._generation_config()
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        devices = [device] if device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices) if seed is not None else nullcontext()
        try:
            with rng:
                if seed is not None:
                    torch.manual_seed(seed)
                for start in range(0, len(prompts), per_call):
                    chunk = prompts[start:start + per_call]
                    # Each prompt repeated n times consecutively (greedy decoding included).
                    ids, mask = self._left_pad([p for p in chunk for _ in range(n)], device)
                    out = self.model.generate(
                        input_ids=ids, attention_mask=mask, generation_config=cfg
                    )
                    seqs = out if isinstance(out, torch.Tensor) else out.sequences
                    gen = seqs[:, ids.shape[1]:].tolist()  # (len(chunk) * n, <= max_new)
                    completions.extend(gen)
        finally:
            self.model.train(was_training)
        return build_batch(prompts, completions, n, self.eos_token_ids, self._decode)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation runs on the trainer's module itself."""
        if model is not self.model:
            self.model = model
