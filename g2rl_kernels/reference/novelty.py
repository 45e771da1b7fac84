"""Plain PyTorch reference of the G2RL group novelty chain (spec sections 2-4).

It is the oracle the compiled extension is tested against: every step is written out as the
spec states it, in the dtype of the inputs (use float64 for an oracle). :func:`novelty_chain`, the
batched chain itself, is also the float32 PyTorch fallback of the CUDA extension
(``g2rl_kernels.ops.group_novelty_op.group_novelty_torch``).
"""

from __future__ import annotations

import math

import torch

from g2rl_kernels.novelty import NoveltyOutput, validate_novelty_args


def group_novelty(
    features: torch.Tensor,
    rewards: torch.Tensor,
    *,
    lam: float = 0.5,
    clip: float | None = 3.0,
    mode: str = "centered",
    eps: float = 1e-6,
    scale_advantages: bool = True,
    span_floor: float = 0.01,
    std_floor: float = 0.05,
    uniform_groups: str = "zero",
) -> NoveltyOutput:
    """Reference group novelty, shaped rewards and advantages (options as in
    :func:`g2rl_kernels.group_novelty`).

    Args:
        features: (B, G, d) sequence features Phi, any float dtype.
        rewards: (B, G) base rewards r.

    Returns:
        NoveltyOutput with cosine (B, G, G), novelty (B, G), shaped_rewards (B, G) and
        advantages (B, G), all in the promoted float dtype of the inputs (float64 in, float64 out).
    """
    validate_novelty_args(features, rewards, lam=lam, clip=clip, mode=mode, eps=eps,
                          span_floor=span_floor, std_floor=std_floor,
                          uniform_groups=uniform_groups, reference=True, check_finite=False)
    dtype = torch.promote_types(features.dtype, rewards.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return novelty_chain(features.to(dtype), rewards.to(dtype), lam=lam, clip=clip, mode=mode,
                         eps=eps, scale_advantages=scale_advantages, span_floor=span_floor,
                         std_floor=std_floor, uniform_groups=uniform_groups)


def novelty_chain(
    phi: torch.Tensor,
    r: torch.Tensor,
    *,
    lam: float,
    clip: float | None,
    mode: str,
    eps: float,
    scale_advantages: bool,
    span_floor: float,
    std_floor: float,
    uniform_groups: str,
) -> NoveltyOutput:
    """The chain of spec sections 2-4 as batched tensor operations, in the dtype and on the
    device of ``phi`` (no argument checks: :func:`group_novelty` does them).

    Written so that it also holds up in float32 (the PyTorch fallback of the CUDA extension runs
    it): the peer-weight eps and the group mean are shifted as in ``csrc/novelty_chain.h``; in
    exact arithmetic both are the plain formulas.

    Args:
        phi: (B, G, d) features, floating point.
        r: (B, G) rewards, same dtype and device.
    """
    B, G, _ = phi.shape

    # eq. 9: normalised directions; a zero vector stays zero, so its cosines are 0.
    norms = torch.linalg.vector_norm(phi, dim=-1, keepdim=True)  # (B, G, 1)
    P = phi / (norms + eps)
    cosine = P @ P.transpose(1, 2)  # (B, G, G)

    # eq. 10: peer weights proportional to exp(r_j), j != i. Shifting by the group max leaves
    # the weights unchanged (the eps term is shifted with them) and avoids overflow.
    m = r.max(dim=1, keepdim=True).values  # (B, 1)
    e = torch.exp(r - m)  # (B, G)
    off_diag = ~torch.eye(G, dtype=torch.bool, device=phi.device)  # (G, G)
    num = e.unsqueeze(1) * off_diag  # (B, G, G): [b, i, j] = exp(r_j - m) [j != i]
    # eps * exp(-m) as exp(log(eps) - m): no overflow of exp(-m) for very negative rewards
    eps_m = torch.exp(math.log(eps) - m) if eps > 0 else torch.zeros_like(m)
    den = num.sum(dim=-1, keepdim=True) + eps_m.unsqueeze(-1)
    # no peer weight at all (a group of one, or peers' exp underflowing, with eps = 0): the
    # response is fully novel, as in csrc/novelty_chain.h
    w = num / torch.where(den > 0, den, torch.ones_like(den))
    # eq. 11
    nu = torch.clamp(1.0 - (w * cosine.square()).sum(dim=-1), min=0.0)  # (B, G)

    # section 3: min-max with a floor delta on the spread, continuous in nu.
    lo = nu.min(dim=1, keepdim=True).values
    hi = nu.max(dim=1, keepdim=True).values
    den = torch.clamp(hi - lo, min=span_floor)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    nubar = torch.where(den > 0, torch.clamp(0.5 + (nu - (lo + hi) / 2) / safe, 0.0, 1.0),
                        torch.full_like(nu, 0.5))

    # eqs. 12-13
    if mode == "centered":
        f = 1.0 + lam * (2.0 * nubar - 1.0)
    else:  # "eq12"
        f = 1.0 + lam * r * nubar
    shaped = r * f
    if clip is not None:
        shaped = torch.clamp(shaped, -clip, clip)

    # section 4: group standardisation, std with n - 1 floored at std_floor; a group of one,
    # and with uniform_groups="zero" a group whose base rewards are all equal, gets 0.
    # The mean is shifted by the first value, so that equal shaped rewards give deviations of
    # exactly 0 in float32 too (an ulp off, divided by std + eps, would be blown up).
    first = shaped[:, :1]
    mean = first + (shaped - first).mean(dim=1, keepdim=True)
    centred = shaped - mean
    if G == 1:
        adv = torch.zeros_like(shaped)
    elif scale_advantages:
        std = torch.sqrt(centred.square().sum(dim=1, keepdim=True) / (G - 1))
        den = torch.clamp(std + eps, min=std_floor)
        adv = torch.where(den > 0, centred / torch.where(den > 0, den, 1.0), 0.0)
    else:
        adv = centred
    if uniform_groups == "zero" and G > 1:
        uniform = (r == r[:, :1]).all(dim=1, keepdim=True)
        adv = torch.where(uniform, torch.zeros_like(adv), adv)
    return NoveltyOutput(cosine, nu, shaped, adv)
