"""Rollout results, the response mask and the engine-independent post-processing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "RolloutBatch",
    "Rollout",
    "response_mask",
    "cut_at_eos",
    "build_batch",
    "generation_eos_ids",
]


@dataclass
class RolloutBatch:
    """``N = P * n`` sampled responses for ``P`` prompts.

    Samples are grouped by prompt: sample ``i`` belongs to prompt ``i // n`` (prompts are
    repeated ``n`` times consecutively in ``prompt_ids``).

    Attributes:
        prompt_ids: ``N`` lists of prompt token ids (no padding).
        response_ids: ``N`` lists of generated token ids, cut after the first EOS (kept), no
            padding. These are the sampled ids themselves, never re-tokenised text.
        truncated: ``N`` flags: no EOS within the token budget.
        texts: ``N`` decoded responses (special tokens skipped).
        n: samples per prompt.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: list[bool]
    texts: list[str]
    n: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {len(self.prompt_ids), len(self.response_ids), len(self.truncated), len(self.texts)}
        if len(sizes) != 1:
            raise ValueError(f"RolloutBatch fields have different lengths: {sorted(sizes)}")
        if self.n < 1 or len(self.prompt_ids) % self.n:
            raise ValueError(f"{len(self.prompt_ids)} samples is not a multiple of n={self.n}")

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_prompts(self) -> int:
        return len(self.response_ids) // self.n

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


class Rollout(Protocol):
    """What the trainer needs from a rollout engine."""

    def generate(self, prompts: list[list[int]], n: int, *, seed: int | None = None
                 ) -> RolloutBatch: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def response_mask(ids: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the response tokens up to and including the first EOS.

    Args:
        ids: ``(N, L)`` generated token ids (right-padded with anything, e.g. pad == eos).
        eos_ids: the EOS ids; any of them ends a response.

    Returns:
        ``mask`` ``(N, L)`` bool, True up to and including the first EOS of each row (the whole
        row when it has none), and ``truncated`` ``(N,)`` bool, True for rows without an EOS.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (N, L), got shape {tuple(ids.shape)}")
    eos = torch.as_tensor(list(eos_ids), dtype=ids.dtype, device=ids.device)
    if eos.numel() == 0:
        raise ValueError("eos_ids is empty")
    is_eos = torch.isin(ids, eos)  # (N, L)
    # Number of EOS tokens strictly before each position; a token is kept while it is 0.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = before == 0
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int] | set[int]) -> tuple[list[int], bool]:
    """``ids`` cut after the first EOS (kept) and whether none was found (truncated)."""
    eos = set(eos_ids)
    out: list[int] = []
    for t in ids:
        out.append(int(t))
        if t in eos:
            return out, False
    return out, True


def build_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    n: int,
    eos_ids: Sequence[int],
    decode: Callable[[list[int]], str],
) -> RolloutBatch:
    """Assemble a :class:`RolloutBatch` from raw generated ids (plain data, any engine).

    Args:
        prompts: ``P`` prompt id lists.
        completions: ``P * n`` generated id lists, grouped by prompt; anything after the first
            EOS (padding) is dropped.
        n: samples per prompt.
        eos_ids: ids that end a response.
        decode: ids -> text (special tokens skipped).
    """
    if len(completions) != len(prompts) * n:
        raise ValueError(f"expected {len(prompts)} x {n} completions, got {len(completions)}")
    eos = set(int(e) for e in eos_ids)
    prompt_ids: list[list[int]] = []
    response_ids: list[list[int]] = []
    truncated: list[bool] = []
    for i, comp in enumerate(completions):
        ids, trunc = cut_at_eos(comp, eos)
        prompt_ids.append([int(t) for t in prompts[i // n]])
        response_ids.append(ids)
        truncated.append(trunc)
    texts = [decode(r) for r in response_ids]
    return RolloutBatch(prompt_ids, response_ids, truncated, texts, n=n)


def generation_eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """EOS ids of the model's generation config (an int or a list), else the tokenizer's."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None),
                getattr(getattr(model, "config", None), "eos_token_id", None)):
        if src is None:
            continue
        for e in [src] if isinstance(src, int) else list(src):
            if int(e) not in ids:
                ids.append(int(e))
        if ids:
            break
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("no EOS token id: set generation_config.eos_token_id or pass eos ids")
    return ids
