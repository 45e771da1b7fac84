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
    "rollout_logprobs",
    "logprob_mismatch",
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
        logprobs: ``None``, or ``N`` lists of the engine's log-probs of the sampled tokens, one
            per response token (as the engine computed them while sampling: after the
            temperature, top-k and top-p). Only the vLLM rollout fills it.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated: list[bool]
    texts: list[str]
    n: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.prompt_ids), len(self.response_ids), len(self.truncated), len(self.texts)}
        if len(sizes) != 1:
            raise ValueError(f"RolloutBatch fields have different lengths: {sorted(sizes)}")
        if self.n < 1 or len(self.prompt_ids) % self.n:
            raise ValueError(f"{len(self.prompt_ids)} samples is not a multiple of n={self.n}")
        if self.logprobs is not None:
            bad = [i for i, (lp, r) in enumerate(zip(self.logprobs, self.response_ids,
                                                     strict=False)) if len(lp) != len(r)]
            if len(self.logprobs) != len(self.response_ids) or bad:
                raise ValueError("RolloutBatch.logprobs must hold one log-prob per response "
                                 f"token (first bad sample: {bad[0] if bad else 'count'})")

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
    logprobs: Sequence[Sequence[float]] | None = None,
) -> RolloutBatch:
    """Assemble a :class:`RolloutBatch` from raw generated ids (plain data, any engine).

    Args:
        prompts: ``P`` prompt id lists.
        completions: ``P * n`` generated id lists, grouped by prompt; anything after the first
            EOS (padding) is dropped.
        n: samples per prompt.
        eos_ids: ids that end a response.
        decode: ids -> text (special tokens skipped).
        logprobs: optional ``P * n`` lists of the sampled tokens' log-probs, one per generated
            id; cut together with the ids.
    """
    if len(completions) != len(prompts) * n:
        raise ValueError(f"expected {len(prompts)} x {n} completions, got {len(completions)}")
    if logprobs is not None and len(logprobs) != len(completions):
        raise ValueError(f"expected {len(completions)} log-prob lists, got {len(logprobs)}")
    eos = set(int(e) for e in eos_ids)
    prompt_ids: list[list[int]] = []
    response_ids: list[list[int]] = []
    truncated: list[bool] = []
    kept_logprobs: list[list[float]] | None = None if logprobs is None else []
    for i, comp in enumerate(completions):
        ids, trunc = cut_at_eos(comp, eos)
        prompt_ids.append([int(t) for t in prompts[i // n]])
        response_ids.append(ids)
        truncated.append(trunc)
        if kept_logprobs is not None and logprobs is not None:
            lp = logprobs[i]
            if len(lp) < len(ids):
                raise ValueError(f"completion {i}: {len(lp)} log-probs for {len(ids)} tokens")
            kept_logprobs.append([float(x) for x in lp[: len(ids)]])
    texts = [decode(r) for r in response_ids]
    return RolloutBatch(prompt_ids, response_ids, truncated, texts, n=n, logprobs=kept_logprobs)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise ``ValueError`` naming the first bad sampling option (shared by the engines)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")


def generation_eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """The union of the EOS ids of the model's generation config, the model config (each an
    int or a list) and the tokenizer, in that order, without repeats.

    All three count: a Qwen3 base checkpoint's configs name ``<|endoftext|>`` while its chat
    template ends a turn with ``<|im_end|>`` (the tokenizer's EOS); TRL takes the union too.
    """
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None),
                getattr(getattr(model, "config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for e in [src] if isinstance(src, int) else list(src):
            if int(e) not in ids:
                ids.append(int(e))
    if not ids:
        raise ValueError("no EOS token id: set generation_config.eos_token_id or pass eos ids")
    return ids


def rollout_logprobs(batch: RolloutBatch, device: torch.device | str | None = None
                     ) -> torch.Tensor | None:
    """``(M,)`` float32 engine log-probs of every response token, sample after sample (the
    row-major order of the trainer's packed response mask), or None when the engine gave
    none."""
    if batch.logprobs is None:
        return None
    flat = [x for row in batch.logprobs for x in row]
    return torch.tensor(flat, dtype=torch.float32, device=device)


def logprob_mismatch(rollout_logp: torch.Tensor | None, trainer_logp: torch.Tensor
                     ) -> dict[str, float]:
    """Train-inference mismatch over the response tokens: the mean and the max of
    ``|rollout_logp - trainer_logp|`` (both ``(M,)``), as ``logprob_diff_mean`` and
    ``logprob_diff_max``; an empty dict when the engine gave no log-probs."""
    if rollout_logp is None:
        return {}
    if rollout_logp.shape != trainer_logp.shape:
        raise ValueError(f"engine log-probs {tuple(rollout_logp.shape)} do not match the "
                         f"trainer's {tuple(trainer_logp.shape)}")
    if rollout_logp.numel() == 0:
        return {"logprob_diff_mean": 0.0, "logprob_diff_max": 0.0}
    diff = (rollout_logp.to(trainer_logp.device).float() - trainer_logp.float()).abs()
    return {"logprob_diff_mean": float(diff.mean()), "logprob_diff_max": float(diff.max())}
