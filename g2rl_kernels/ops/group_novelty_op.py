"""``torch.ops.g2rl.group_novelty``: the compiled group novelty chain as a torch custom op.

The extension modules take raw data pointers, shapes and strides (they are built against pybind11
only); this module allocates the float32 outputs, passes the pointers and, on CUDA, the current
stream, and registers a fake implementation so the op traces under ``torch.compile``.

On CUDA tensors the op uses ``g2rl_kernels._C_cuda`` when it was built and the driver can run it
(checked once per device, at first use: :func:`cuda_fallback_reason`); otherwise it runs
:func:`group_novelty_torch`, the same chain as batched PyTorch operations in float32, after one
warning that says why and how to rebuild.
"""

from __future__ import annotations

import importlib
import math
import warnings
from types import ModuleType

import torch

from g2rl_kernels.ops.matmul_precision import float32_products

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_MODE_NAMES = ("centered", "eq12")  # index: the mode code of g2rl_kernels.novelty.MODES

_cuda_ext: ModuleType | None | bool = False  # False: not looked up yet
_cuda_import_error: str | None = None  # why a built _C_cuda did not load
_use_ext: dict[int, bool] = {}  # per CUDA device index: the extension runs there
_max_shared_G: dict[int, int] = {}  # per CUDA device index: largest G without scratch
_warned = False


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
        except ModuleNotFoundError:
            _cuda_ext = None
        except ImportError as exc:  # built, but it does not load (a symbol or ABI mismatch)
            global _cuda_import_error
            _cuda_import_error = str(exc)
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
        raise _non_finite_error(non_finite, features, rewards)
    return outs


def _non_finite_error(count: int, features: torch.Tensor, rewards: torch.Tensor) -> ValueError:
    return ValueError(
        f"features or rewards contain {count} NaN or inf values (features shape "
        f"{tuple(features.shape)}, rewards shape {tuple(rewards.shape)})"
    )


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
    """Same as :func:`group_novelty_cpu` on CUDA tensors: one launch on the current stream and
    one host sync (reading the kernel's count of NaN/inf inputs). Runs
    :func:`group_novelty_torch` instead where the extension cannot run (:func:`use_extension`).
    """
    if not use_extension(features.device):
        return group_novelty_torch(features, rewards, lam, clip, mode, eps, scale_advantages,
                                   span_floor, std_floor, zero_uniform)
    ext = cuda_extension()
    B, G, _ = features.shape
    if G > ext.max_group_size:
        raise ValueError(f"features: group size G={G} exceeds the CUDA kernel's limit "
                         f"{ext.max_group_size}")
    device = features.device
    # torch's current device is made the features' one, so that the extension's own (static)
    # CUDA runtime, which selects the same device, leaves the thread's context as torch expects.
    with torch.cuda.device(device):
        outs = _outputs(features)
        non_finite = torch.empty(1, dtype=torch.int32, device=device)
        work = None  # per-group work arrays in shared memory ...
        if G > _max_shared_group_size(ext, device.index):  # ... or in global scratch
            work = torch.empty(B * (5 * G + 1), dtype=torch.float32, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        ext.group_novelty(
            device.index, stream, *_args(features, rewards, outs),
            0 if work is None else work.data_ptr(), non_finite.data_ptr(),
            lam, clip, mode, eps, scale_advantages, span_floor, std_floor, zero_uniform,
        )
        count = int(non_finite.item())  # the one host sync
    if count:
        raise _non_finite_error(count, features, rewards)
    return outs


def _max_shared_group_size(ext: ModuleType, index: int) -> int:
    G = _max_shared_G.get(index)
    if G is None:
        G = _max_shared_G[index] = int(ext.max_shared_group_size(index))
    return G


def group_novelty_torch(
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
    """The chain as batched PyTorch operations in float32 on the inputs' device (any device):
    the CUDA fallback. Arguments and results as :func:`group_novelty_cpu`: features (B, G, d),
    rewards (B, G) float32 -> cosine (B, G, G), novelty, shaped, advantages (B, G), float32.

    It is :func:`g2rl_kernels.reference.novelty.novelty_chain` run in float32 with IEEE float32
    matmuls (TF32 off for the Gram), and raises on NaN/inf inputs after one host sync."""
    # imported here: the reference imports g2rl_kernels.novelty, which imports this module
    from g2rl_kernels.reference.novelty import novelty_chain

    B, G, _ = features.shape
    if B * G == 0:
        return _outputs(features)
    bad = (~torch.isfinite(features)).sum() + (~torch.isfinite(rewards)).sum()
    # float32 throughout, also inside a caller's autocast region (which would run the Gram in
    # 16 bits: cosine errors of about 1e-3) and without TF32
    with float32_products(features.device.type, exact_fp32=True):
        out = novelty_chain(
            features.to(torch.float32), rewards.to(torch.float32), lam=lam,
            clip=None if math.isinf(clip) else clip, mode=_MODE_NAMES[mode], eps=eps,
            scale_advantages=scale_advantages, span_floor=span_floor, std_floor=std_floor,
            uniform_groups="zero" if zero_uniform else "shape",
        )
    count = int(bad.item())  # the one host sync
    if count:
        raise _non_finite_error(count, features, rewards)
    return tuple(t.contiguous() for t in out)


def version_string(version: int) -> str:
    """CUDA version as cudaRuntimeGetVersion/cudaDriverGetVersion give it -> "12.8" (0: "none")."""
    return f"{version // 1000}.{version % 1000 // 10}" if version > 0 else "none"


def cuda_fallback_reason(
    *,
    built: bool,
    runtime_version: int = 0,
    driver_version: int = 0,
    torch_cuda: str | None = None,
    probe_error: str = "",
) -> str | None:
    """None when the CUDA extension can run, else the warning that says why not and how to
    rebuild it (a pure function of the versions, tested with injected values).

    Args:
        built: g2rl_kernels._C_cuda is importable.
        runtime_version: CUDA runtime the extension was built with (1000 major + 10 minor).
        driver_version: newest CUDA version the driver supports (same encoding; 0: no driver).
        torch_cuda: ``torch.version.cuda`` (e.g. "12.8").
        probe_error: error of loading the kernel on the device ("" when it loaded).
    """
    drv = version_string(driver_version) if built else "unknown"
    rt = version_string(runtime_version) if built else "not built"
    if torch_cuda:
        major = torch_cuda.split(".")[0]
        toolkit = f"a CUDA {major}.x toolkit, the major version torch was built with"
        home = f"/usr/local/cuda-{torch_cuda}"
    else:
        toolkit, home = "a CUDA toolkit the driver supports", "/usr/local/cuda-<version>"
    build = "G2RL_BUILD_CUDA=1 " if not built else ""
    rebuild = (f"rebuild it against {toolkit}: `CUDA_HOME={home} {build}pip install -e . "
               "--no-build-isolation` from the repository root (--no-build-isolation lets the "
               "build see torch and pick a matching nvcc itself)")
    if not built and _cuda_import_error:
        why = f"g2rl_kernels._C_cuda is there but does not load ({_cuda_import_error})"
    elif not built:
        why = ("g2rl_kernels._C_cuda was not built (no nvcc was found when the package was "
               "installed, or G2RL_BUILD_CUDA=0)")
    elif driver_version <= 0:
        why = f"the extension's CUDA runtime {rt} finds no CUDA driver"
    elif driver_version // 1000 < runtime_version // 1000:
        why = (f"the extension was built with CUDA runtime {rt} (linked statically), which "
               f"needs a driver for CUDA {runtime_version // 1000}.x, but the installed driver "
               f"supports CUDA {drv} at most")
    elif probe_error:
        why = (f"the extension (CUDA runtime {rt}) cannot load its kernel on this GPU: "
               f"{probe_error}")
        rebuild += ("; for a GPU newer than the built architectures add its compute "
                    "capability to G2RL_CUDA_ARCH (default 80;86;89;90)")
    else:
        return None
    return (f"g2rl_kernels.group_novelty: CUDA tensors go to the PyTorch fallback (the same "
            f"chain as batched float32 operations on the GPU: the same results to float32 "
            f"rounding, slower) because "
            f"{why}. Driver: CUDA {drv}; extension runtime: CUDA {rt}; "
            f"torch.version.cuda: {torch_cuda}. To use the extension, {rebuild}.")


def use_extension(device: torch.device) -> bool:
    """True when the CUDA extension runs on this CUDA device; decided once per device (the
    first call loads the kernel there), with one warning per process when it does not."""
    global _warned
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _use_ext.get(index)
    if ok is not None:
        return ok
    ext = cuda_extension()
    runtime = driver = 0
    probe_error = ""
    if ext is not None:
        runtime, driver = int(ext.runtime_version()), int(ext.driver_version())
        if driver > 0 and driver // 1000 >= runtime // 1000:
            with torch.cuda.device(index):
                probe_error = ext.probe(index)
    reason = cuda_fallback_reason(built=ext is not None, runtime_version=runtime,
                                  driver_version=driver, torch_cuda=torch.version.cuda,
                                  probe_error=probe_error)
    _use_ext[index] = ok = reason is None
    if reason is not None and not _warned:
        _warned = True
        warnings.warn(reason, RuntimeWarning, stacklevel=4)
    return ok


@group_novelty.register_fake
def _group_novelty_fake(features, rewards, lam, clip, mode, eps, scale_advantages, span_floor,
                        std_floor, zero_uniform):
    return _outputs(features)
