"""Public entry point of the group novelty chain: validates its arguments and dispatches to the
compiled extension (C++ on the CPU, CUDA on the GPU) through a ``torch.library`` custom op. On a
GPU where the CUDA extension cannot run (not built, or built with a CUDA runtime newer than the
driver supports) a batched float32 PyTorch composition of the same chain runs instead, after one
warning that says how to rebuild (:func:`cuda_backend`).

Formulas: ``G2RL_METHOD.md`` sections 2-4 (normalise, Gram, novelty, shaping, standardisation).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from g2rl_kernels.ops import group_novelty_op

MODES = {"centered": 0, "eq12": 1}
UNIFORM_GROUPS = ("zero", "shape")
FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NoveltyOutput(NamedTuple):
    """Result of :func:`group_novelty`; every field is float32 (float64 from the reference)."""

    cosine: torch.Tensor  # (B, G, G) S_ij
    novelty: torch.Tensor  # (B, G) nu
    shaped_rewards: torch.Tensor  # (B, G) clipped shaped reward r~
    advantages: torch.Tensor  # (B, G) standardised r~


def cuda_available() -> bool:
    """True when the extension was built with its CUDA part."""
    return group_novelty_op.cuda_extension() is not None


def cuda_backend(device: torch.device | str | int | None = None) -> str:
    """What :func:`group_novelty` runs on CUDA tensors of ``device`` (default: the current
    one): ``"extension"`` (the compiled CUDA kernel) or ``"torch"`` (the float32 PyTorch
    fallback). Decided once per device, at first use, with one warning when it falls back."""
    if device is None and not torch.cuda.is_available():
        raise ValueError(f"no CUDA device (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}): cuda_backend() needs one")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else (
        torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    return "extension" if group_novelty_op.use_extension(device) else "torch"


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_novelty_args(
    features: torch.Tensor,
    rewards: torch.Tensor,
    *,
    lam: float,
    clip: float | None,
    mode: str,
    eps: float,
    span_floor: float = 0.01,
    std_floor: float = 0.05,
    uniform_groups: str = "zero",
    reference: bool = False,
    check_finite: bool | None = None,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the argument for any bad input.

    ``reference`` relaxes the checks for the plain PyTorch reference: float64 is allowed.
    ``check_finite=True`` scans the tensors for NaN/inf here (one host sync on CUDA); None and
    False skip it: the CPU and CUDA kernels and the PyTorch fallback count NaN/inf inputs
    themselves while they read them, and raise.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be 3-D (B, G, d), got {_shape(features)}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D (B, G), got {_shape(rewards)}")
    if features.shape[:2] != rewards.shape:
        raise ValueError(
            "features (B, G, d) and rewards (B, G) disagree on B or G: "
            f"features {tuple(features.shape)}, rewards {tuple(rewards.shape)}"
        )
    allowed = FEATURE_DTYPES + ((torch.float64,) if reference else ())
    if features.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"features must have a float dtype ({names}), got {_shape(features)}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must have a float dtype, got {_shape(rewards)}")
    if features.device != rewards.device:
        raise ValueError(
            f"features and rewards must be on one device, got {features.device} and "
            f"{rewards.device}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if not (_is_number(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    if clip is not None and not (_is_number(clip) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be None or a finite number > 0, got {clip!r}")
    for name, value in (("eps", eps), ("span_floor", span_floor), ("std_floor", std_floor)):
        if not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if uniform_groups not in UNIFORM_GROUPS:
        raise ValueError(f"uniform_groups must be one of {list(UNIFORM_GROUPS)}, got "
                         f"{uniform_groups!r}")
    if check_finite:
        finite = torch.isfinite(features).all() & torch.isfinite(rewards).all()
        if not bool(finite):  # the one host sync
            name = "features" if not bool(torch.isfinite(features).all()) else "rewards"
            bad = features if name == "features" else rewards
            raise ValueError(f"{name} contain NaN or inf ({_shape(bad)})")


def _is_number(x: object) -> bool:
    """A real number: Python int/float, NumPy scalar or 0-d tensor (not bool)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Real)


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
    """Group cosines, novelty, shaped rewards and advantages of B groups of G responses.

    One call does the whole chain for all groups (one kernel launch and one host sync on CUDA),
    accumulating in float32. Any G works on every GPU: groups whose work arrays fit in shared
    memory keep them there, larger ones use a global scratch buffer. Where the CUDA extension
    cannot run, CUDA tensors go to a float32 PyTorch composition of the same chain
    (:func:`cuda_backend`).

    Args:
        features: (B, G, d) sequence features Phi in float32, bfloat16 or float16, on the CPU or
            a CUDA device; any strides.
        rewards: (B, G) base rewards (float), same device.
        lam: shaping strength lambda in [0, 1]; 0 leaves the rewards untouched (plain GRPO).
        clip: shaped rewards are clipped to [-clip, clip]; None: no clip. The paper's c = 3 is a
            bound for rewards in {-1, +1}; with rewards on another scale use None (or a clip
            that suits them), else the clip changes the rewards themselves.
        mode: ``"centered"`` (f = 1 + lam (2 nubar - 1)) or ``"eq12"`` (f = 1 + lam r nubar).
        eps: used in the norm, the peer weights and the std.
        scale_advantages: divide by max(group std + eps, std_floor); otherwise only subtract
            the group mean.
        span_floor: delta of nubar = clamp(0.5 + (nu - (lo + hi) / 2) / max(hi - lo, delta),
            0, 1): min-max where the spread of nu is at least delta, compressed towards 0.5
            below it (so near-identical scores do not become full-range rounding noise).
        std_floor: the group std is floored at this before the division (0: no floor).
        uniform_groups: ``"zero"`` (default): a group whose base rewards are all equal gets
            advantage 0, as in GRPO, so novelty acts only inside mixed groups; ``"shape"`` (the
            paper): such groups are shaped and standardised too. ``shape`` is unsafe with sparse
            rewards (spec section 4: the policy collapsed on every seed of the built-in task).

    Returns:
        :class:`NoveltyOutput` of float32 tensors on the input device: cosine (B, G, G),
        novelty (B, G), shaped_rewards (B, G), advantages (B, G).
    """
    validate_novelty_args(features, rewards, lam=lam, clip=clip, mode=mode, eps=eps,
                          span_floor=span_floor, std_floor=std_floor,
                          uniform_groups=uniform_groups)
    args = (features, rewards.to(torch.float32), float(lam),
            math.inf if clip is None else float(clip), MODES[mode], float(eps),
            bool(scale_advantages), float(span_floor), float(std_floor),
            uniform_groups == "zero")
    if torch.compiler.is_compiling() or not _plain_tensors(features, rewards):
        return NoveltyOutput(*torch.ops.g2rl.group_novelty(*args))
    # eager: call the kernel directly and skip the dispatcher's overhead
    if features.is_cuda:
        return NoveltyOutput(*group_novelty_op.group_novelty_cuda(*args))
    return NoveltyOutput(*group_novelty_op.group_novelty_cpu(*args))


def _plain_tensors(*tensors: torch.Tensor) -> bool:
    """True for ordinary dense CPU/CUDA tensors (not fake, meta or tensor subclasses)."""
    return all(type(t) is torch.Tensor and t.device.type in ("cpu", "cuda") for t in tensors)
