"""``torch.ops.g2rl.group_novelty``: the compiled group novelty chain as a torch custom op.

The extension modules take raw data pointers, shapes and strides (they are built against pybind11
only); this module allocates the float32 outputs, passes the pointers and, on CUDA, the current
stream, and registers a fake implementation so the op traces under ``torch.compile``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_cuda_ext: ModuleType | None | bool = False  # False: not looked up yet


def cpu_extension() -> ModuleType:
    """The C++ extension ``g2rl_kernels._C`` (always built by ``pip install -e .``)."""
    try:
        return importlib.import_module("g2rl_kernels._C")
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "g2rl_kernels._C is not built: install the package with `pip install -e .` from the "
            f"repository root ({exc})"
        ) from exc


def cuda_extension() -> ModuleType | None:
    """The CUDA extension ``g2rl_kernels._C_cuda``, or None when it was not built."""
    global _cuda_ext
    if _cuda_ext is False:
        try:
            _cuda_ext = importlib.import_module("g2rl_kernels._C_cuda")
        except ImportError:
            _cuda_ext = None
    return _cuda_ext  # type: ignore[return-value]


def _outputs(features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    B, G, _ = features.shape
    kw = {"dtype": torch.float32, "device": features.device}
    return (
        torch.empty((B, G, G), **kw),
        torch.empty((B, G), **kw),
        torch.empty((B, G), **kw),
        torch.empty((B, G), **kw),
    )


def _args(features: torch.Tensor, rewards: torch.Tensor, outs: tuple[torch.Tensor, ...]):
    B, G, d = features.shape
    return (
        features.data_ptr(), DTYPE_CODES[features.dtype], B, G, d, *features.stride(),
        rewards.data_ptr(), *rewards.stride(), *(o.data_ptr() for o in outs),
    )


def group_novelty_cpu(
    features: torch.Tensor,
    rewards: torch.Tensor,
    lam: float,
    clip: float,
    mode: int,
    eps: float,
    scale_advantages: bool,
    span_floor: float,
    std_floor: float,
    zero_uniform: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (B, G, d) float32/bf16/fp16, rewards (B, G) float32 ->
    cosine (B, G, G), novelty (B, G), shaped (B, G), advantages (B, G), float32. CPU kernel.

    Called straight from eager code (the custom op's dispatch costs about 30 us per call) and
    as the op's CPU kernel under tracing."""
    outs = _outputs(features)
    non_finite = cpu_extension().group_novelty(
        *_args(features, rewards, outs), lam, clip, mode, eps, scale_advantages, span_floor,
        std_floor, zero_uniform,
    )
    if non_finite:
        raise ValueError(
            f"features or rewards contain {non_finite} NaN or inf values (features shape "
            f"{tuple(features.shape)}, rewards shape {tuple(rewards.shape)})"
        )
    return outs


group_novelty = torch.library.custom_op("g2rl::group_novelty", group_novelty_cpu,
                                        mutates_args=())


@group_novelty.register_kernel("cuda")
def group_novelty_cuda(
    features: torch.Tensor,
    rewards: torch.Tensor,
    lam: float,
    clip: float,
    mode: int,
    eps: float,
    scale_advantages: bool,
    span_floor: float,
    std_floor: float,
    zero_uniform: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same as :func:`group_novelty_cpu` on CUDA tensors: one launch on the current stream."""
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(
            "g2rl_kernels was built without CUDA (rebuild: G2RL_BUILD_CUDA=1 pip install -e .)"
        )
    G = features.shape[1]
    if G > ext.max_group_size:
        raise ValueError(f"features: group size G={G} exceeds the CUDA kernel's limit "
                         f"{ext.max_group_size}")
    device = features.device
    # torch's current device is made the features' one, so that the extension's own (static)
    # CUDA runtime, which selects the same device, leaves the thread's context as torch expects.
    with torch.cuda.device(device):
        outs = _outputs(features)
        stream = torch.cuda.current_stream(device).cuda_stream
        ext.group_novelty(
            device.index, stream, *_args(features, rewards, outs), lam, clip, mode, eps,
            scale_advantages, span_floor, std_floor, zero_uniform,
        )
    return outs


@group_novelty.register_fake
def _group_novelty_fake(features, rewards, lam, clip, mode, eps, scale_advantages, span_floor,
                        std_floor, zero_uniform):
    return _outputs(features)
