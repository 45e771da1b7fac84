"""The policy loss: PPO-style clipped surrogate, k3 KL to a reference, entropy bonus.

Token-mean aggregation over the accumulated batch: every response token of a mini-batch
weighs the same, whichever micro-batch or sequence it sits in. Each micro-batch returns
``sum(per-token loss) / tokens_in_minibatch``, so the gradients accumulated over the micro-batches
of a mini-batch are the gradient of the mini-batch's token mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0).

    Args:
        logp: (M,) log-probs of the sampled tokens under the policy.
        ref_logp: (M,) log-probs of the same tokens under the reference.
    """
    delta = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(delta) - delta - 1.0


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float
                ) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(old_logp - rollout_logp), cap)``.

    The responses were sampled by the rollout engine (pi_rollout, e.g. vLLM in bf16), while
    the clipped surrogate's ratio is taken against the trainer's old policy (pi_old, the same
    weights in the trainer's numerics). Weighting each token's policy-gradient loss by
    pi_old / pi_rollout corrects the difference; the cap bounds the variance (the truncation).

    Args:
        old_logp: (M,) the trainer's log-probs of the sampled tokens (no grad).
        rollout_logp: (M,) the engine's log-probs of the same tokens.
        cap: C > 0.

    Returns:
        (M,) weights in (0, cap], float32 (or the inputs' dtype if wider), no grad.
    """
    if old_logp.shape != rollout_logp.shape or old_logp.dim() != 1:
        raise ValueError(f"old_logp and rollout_logp must be 1-D of one length, got "
                         f"{tuple(old_logp.shape)} and {tuple(rollout_logp.shape)}")
    if not cap > 0 or not math.isfinite(cap):
        raise ValueError(f"cap must be a finite number > 0, got {cap}")
    dtype = torch.promote_types(old_logp.dtype, torch.float32)
    delta = (old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype)).clamp(-20.0, 20.0)
    return torch.exp(delta).clamp(max=cap)


@dataclass
class LossStats:
    """Sums over tokens (divide by the token count for means)."""

    loss: float = 0.0  # the returned (already normalised) loss values, summed
    pg_loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clipped: float = 0.0
    ratio: float = 0.0
    tokens: int = 0
    tis_weight: float = 0.0  # sum of the truncated importance-sampling weights (0 when off)
    tis_capped: float = 0.0  # tokens whose weight hit the cap

    def add(self, other: LossStats) -> None:
        for name in ("loss", "pg_loss", "kl", "entropy", "clipped", "ratio", "tokens",
                     "tis_weight", "tis_capped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    num_tokens: int,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate over M response tokens, normalised by ``num_tokens``.

    per-token loss = -w * min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
                     + kl_coef * k3(logp, ref_logp) - entropy_coef * H

    with rho = exp(logp - old_logp) and w = 1, or with ``tis_cap`` C > 0 the truncated
    importance-sampling weight w = min(exp(old_logp - rollout_logp), C) (:func:`tis_weights`,
    no gradient; as TRL's ``vllm_importance_sampling_correction`` and verl's TIS).

    Args:
        logp: (M,) log-probs with autograd.
        old_logp: (M,) log-probs of the sampling policy (no grad).
        advantages: (M,) per-token advantages (the response's advantage on each of its tokens).
        num_tokens: response tokens in the whole accumulated (mini-)batch; the returned loss is
            ``sum(per-token loss) / num_tokens``.
        ref_logp: (M,) reference log-probs, needed when ``kl_coef > 0``.
        entropy: (M,) token entropies with autograd, needed when ``entropy_coef > 0``.
        rollout_logp: (M,) the rollout engine's log-probs of the tokens, needed when
            ``tis_cap > 0``.
        tis_cap: the cap C of the truncated importance-sampling correction (0: off).

    Returns:
        (loss scalar, :class:`LossStats` of token sums for logging).
    """
    if not (logp.shape == old_logp.shape == advantages.shape) or logp.dim() != 1:
        raise ValueError(
            f"logp, old_logp and advantages must be 1-D of one length, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(advantages.shape)}"
        )
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if tis_cap < 0:
        raise ValueError(f"tis_cap must be >= 0, got {tis_cap}")
    weights = None
    if tis_cap > 0:
        if rollout_logp is None:
            raise ValueError("tis_cap > 0 needs rollout_logp (the rollout engine's log-probs)")
        weights = tis_weights(old_logp, rollout_logp, tis_cap).to(logp.dtype)
    old_logp = old_logp.detach().to(logp.dtype)
    advantages = advantages.detach().to(logp.dtype)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if weights is not None:
        pg = weights * pg
    per_token = pg
    kl = None
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp.detach().to(logp.dtype))
        per_token = per_token + kl_coef * kl
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs entropy")
        per_token = per_token - entropy_coef * entropy
    loss = per_token.sum() / num_tokens
    with torch.no_grad():
        is_clipped = ((ratio > 1.0 + eps_high) & (advantages > 0)) | (
            (ratio < 1.0 - eps_low) & (advantages < 0)
        )
        stats = LossStats(
            loss=float(loss),
            pg_loss=float(pg.sum()),
            kl=float(kl.sum()) if kl is not None else 0.0,
            entropy=float(entropy.sum()) if entropy is not None else 0.0,
            clipped=float(is_clipped.sum()),
            ratio=float(ratio.sum()),
            tokens=int(logp.numel()),
            tis_weight=float(weights.sum()) if weights is not None else 0.0,
            tis_capped=float((weights >= tis_cap).sum()) if weights is not None else 0.0,
        )
    return loss, stats


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``targets`` under ``softmax((hidden W^T + b) / T)``, with
    autograd, computed in float32 (float64 for float64 inputs).

    Used by the gradient pass (the no-grad pass calls ``g2rl_kernels.sensitivity``). Rows are
    processed in chunks of ``chunk_size``; when there is more than one chunk each is
    recomputed in the backward pass (activation checkpointing), so at most one chunk of logits
    ``(chunk_size, V)`` lives at a time.

    Args:
        hidden: (M, d) final hidden states (after the final norm).
        weight: (V, d) LM-head weight.
        targets: (M,) token ids.
        bias: optional (V,) LM-head bias.

    Returns:
        logp (M,) and, with ``with_entropy``, entropy (M,) (else None).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (M, d) and targets (M,), got {tuple(hidden.shape)} and "
            f"{tuple(targets.shape)}"
        )

    dtype = torch.promote_types(hidden.dtype, torch.float32)

    def chunk(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = h.to(dtype) @ weight.to(dtype).t()
        if bias is not None:
            logits = logits + bias.to(dtype)
        logits = logits / temperature
        logz = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, y[:, None]).squeeze(-1) - logz
        if with_entropy:
            probs = torch.softmax(logits, dim=-1)
            ent = logz - (probs * logits).sum(-1)
        else:
            ent = logp.new_zeros(())
        return logp, ent

    m = hidden.shape[0]
    if m <= chunk_size:
        logp, ent = chunk(hidden, targets)
        return logp, (ent if with_entropy else None)
    from torch.utils.checkpoint import checkpoint

    lps, ents = [], []
    for s in range(0, m, chunk_size):
        lp, en = checkpoint(chunk, hidden[s:s + chunk_size], targets[s:s + chunk_size],
                            use_reentrant=False)
        lps.append(lp)
        ents.append(en)
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)
