"""Plain PyTorch reference of the G2RL token/sequence sensitivity (spec section 1): the oracle.

It materialises the (N, V) logits and every per-token feature, and computes everything in the
dtype of ``hidden`` (use float64 for an oracle; float32/bfloat16/float16 give the error that
plain PyTorch makes in that dtype). It returns tensors of that dtype, not float32.
"""

from __future__ import annotations

import torch

from g2rl_kernels.ops.sensitivity_checks import (
    normalised_token_weights,
    validate_sensitivity_args,
)
from g2rl_kernels.sensitivity import (
    SensitivityOutput,
    flatten_padded,
    unflatten_padded,
    validate_padded_args,
)


def sensitivity(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor | None = None,
    num_seqs: int | None = None,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_token_features: bool = False,
) -> SensitivityOutput:
    """Reference of :func:`g2rl_kernels.sensitivity`, written out as the spec states it.

    Args: as :func:`g2rl_kernels.sensitivity` (the same argument rules and value checks, always
    on); hidden (N, d) and weight (V, d) of any one float dtype, which is also the compute and
    output dtype; bias (V,) of that dtype or float32.

    Returns:
        :class:`SensitivityOutput`: logprobs (N,), entropy (N,), lse (N,), seq_features
        (num_seqs, d) or None, token_features (N, d) or None.
    """
    num_seqs, temperature, ignore_index = validate_sensitivity_args(
        hidden, weight, targets, seq_index=seq_index, num_seqs=num_seqs,
        token_weights=token_weights, bias=bias, temperature=temperature,
        ignore_index=ignore_index, reference=True,
    )
    dt = hidden.dtype
    logits = hidden @ weight.T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    logp = logits - lse[:, None]  # (N, V)
    p = logp.exp()
    counted = targets != ignore_index
    y = torch.where(counted, targets.long(), 0)
    zero = torch.zeros((), dtype=dt, device=hidden.device)
    logprobs = torch.where(counted, logp.gather(1, y[:, None]).squeeze(1), zero)
    # p log p -> 0 where p = 0 (an entry masked by a -inf bias: 0 * -inf)
    entropy = torch.where(counted, -torch.where(p > 0, p * logp, zero).sum(-1), zero)
    phi = weight[y] - p @ weight  # (N, d)
    phi = torch.where(counted[:, None], phi, zero)
    seq_features = None
    if seq_index is not None:
        a = normalised_token_weights(targets, seq_index, num_seqs, token_weights, ignore_index, dt)
        seq_features = torch.zeros(num_seqs, hidden.shape[1], dtype=dt, device=hidden.device)
        seq_features.index_add_(0, seq_index.long(), a[:, None] * phi)
    return SensitivityOutput(
        logprobs, entropy, lse, seq_features, phi if return_token_features else None
    )


def sequence_features(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_token_features: bool = False,
) -> SensitivityOutput:
    """Reference of :func:`g2rl_kernels.sequence_features` (padded (B, T) batches)."""
    validate_padded_args(hidden, targets, mask, token_weights)
    flat = flatten_padded(hidden, targets, mask, token_weights)
    out = sensitivity(
        flat.hidden, weight, flat.targets, seq_index=flat.seq_index, num_seqs=flat.num_seqs,
        token_weights=flat.token_weights, bias=bias, temperature=temperature,
        ignore_index=flat.ignore_index, return_token_features=return_token_features,
    )
    return unflatten_padded(out, hidden.shape)
