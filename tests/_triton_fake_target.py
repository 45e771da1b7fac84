"""Compile Triton kernels exactly as a real launch would, on a machine without a GPU.

:func:`fake_cuda_target` makes a fake driver Triton's active driver: it reports a CUDA target
(an SM version, warp size 32) and a device's SM count and shared memory, and turns every launch
into compile-and-record. A wrapper called on CPU tensors inside it goes through Triton's own
launch path (``JITFunction.run``: the binder specialises the real argument values -- pointer
alignment 16, integers divisible by 16 or equal to 1, ``do_not_specialize`` -- then
``triton.compile`` for the target, down to a cubin with Triton's bundled ptxas), and then through
``CompiledKernel._init_handles`` (which checks the dynamic shared memory against the device's
limit) into the fake driver's ``load_binary`` (resource usage read from the cubin with the
bundled cuobjdump, as the CUDA driver would report it) and launcher (records the launch, runs
nothing). So what is compiled is what a GPU would compile for those arguments.

Nothing here changes Triton's code: the fake driver is installed with the public
``triton.runtime.driver.driver.set_active`` and the previous one is put back on exit; the
kernels compiled for a fake device are cached in each ``JITFunction.device_caches`` under the
fake device's key (never a real device's) and removed by :func:`forget_fake_kernels`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver as _driver_config
from triton.runtime.jit import JITFunction

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
CUOBJDUMP = NVIDIA_BIN / "cuobjdump"
PTXAS = NVIDIA_BIN / "ptxas"


@dataclasses.dataclass(frozen=True)
class Device:
    """What the fake driver reports: the target and the limits a launch is checked against."""

    name: str
    arch: int  # compute capability major * 10 + minor
    sms: int
    max_shared: int  # bytes of shared memory per block (opt-in maximum)
    regs_per_sm: int = 65536

    @property
    def key(self) -> str:  # the "device id" kernels are cached under; never a real one
        return f"fake-sm{self.arch}-{self.name}"


A100 = Device("A100", 80, sms=108, max_shared=166912)
H100 = Device("H100-SXM", 90, sms=132, max_shared=232448)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Resource usage of one cubin (cuobjdump --dump-resource-usage)."""

    regs: int
    local: int  # bytes of local memory per thread: spills (or local arrays)
    stack: int
    static_shared: int


@dataclasses.dataclass
class Launch:
    """One kernel launch the wrapper made, with what Triton compiled for it."""

    kernel: str
    device: Device
    grid: tuple[int, int, int]
    args: dict[str, Any]  # argument name -> the value passed (tensors as given)
    signature: dict[str, str]  # argument name -> Triton type, or "constexpr"
    constexprs: dict[str, Any]  # argument name -> value (declared and specialised constants)
    divisible16: frozenset[str]  # arguments compiled with tt.divisibility = 16
    do_not_specialize: frozenset[str]
    num_warps: int
    num_stages: int
    shared: int  # dynamic shared memory, bytes
    usage: Usage
    fn: JITFunction

    def describe(self) -> str:
        blocks = {k: v for k, v in self.constexprs.items() if k.isupper()}
        return (f"{self.kernel} sm_{self.device.arch} {blocks} warps={self.num_warps} "
                f"stages={self.num_stages}: {self.usage.regs} regs, local {self.usage.local} B, "
                f"stack {self.usage.stack} B, shared {self.shared} B")


def resource_usage(cubin: bytes, name: str) -> Usage:
    """Registers, local memory, stack and static shared memory of kernel ``name`` in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"Function {name}:":
            fields = dict(re.findall(r"([A-Z_\[\]0-9]+):(\d+)", lines[i + 1]))
            return Usage(int(fields["REG"]), int(fields["LOCAL"]), int(fields["STACK"]),
                         int(fields["SHARED"]))
    raise AssertionError(f"no resource usage of {name} in the cubin:\n{out}")


class _Utils:
    def __init__(self, drv: FakeCudaDriver) -> None:
        self._drv = drv

    def get_device_properties(self, device) -> dict:
        dev = self._drv.dev
        return {"max_shared_mem": dev.max_shared, "multiprocessor_count": dev.sms,
                "max_num_regs": dev.regs_per_sm, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        """As the CUDA driver: (module, function, n_regs, n_spills, max threads per block)."""
        usage = resource_usage(kernel, name)
        self._drv._pending_usage = (name, usage)
        regs_per_warp = -(-max(usage.regs, 1) // 8) * 8 * 32  # 8-register granularity
        max_threads = min(1024, self._drv.dev.regs_per_sm // regs_per_warp * 32)
        return object(), object(), usage.regs, usage.local // 4, max_threads

    def unload_module(self, module) -> None:
        return None


class FakeCudaDriver(DriverBase):
    """A driver that reports ``dev`` and records launches instead of running them."""

    def __init__(self, dev: Device) -> None:
        super().__init__()
        self.dev = dev
        self.utils = _Utils(self)
        self.launches: list[Launch] = []
        self._pending_usage: tuple[str, Usage] | None = None
        drv = self

        class Launcher:
            def __init__(self, src, metadata) -> None:
                self.src, self.metadata, self.usage = src, metadata, None

            def __call__(self, gx, gy, gz, stream, function, packed, launch_metadata,
                         enter_hook, exit_hook, *args) -> None:
                if self.usage is None:  # load_binary ran right after this launcher was made
                    name, self.usage = drv._pending_usage
                    drv._pending_usage = None
                    assert name == self.metadata.name, (name, self.metadata.name)
                drv.launches.append(_record(drv.dev, self, (gx, gy, gz), args))

        self.launcher_cls = Launcher

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by Triton's own driver discovery

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the fake driver builds no launcher")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.dev.arch, 32)

    def get_active_torch_device(self):
        raise NotImplementedError("the fake driver has no torch device")

    def get_benchmarker(self):
        raise NotImplementedError("the fake driver runs nothing")

    def get_current_device(self) -> str:
        return self.dev.key

    def set_current_device(self, device) -> None:
        return None

    def get_current_stream(self, device) -> int:
        return 0

    def get_device_capability(self, device) -> tuple[int, int]:
        return divmod(self.dev.arch, 10)


def _record(dev: Device, launcher, grid, args) -> Launch:
    src, md = launcher.src, launcher.metadata
    fn = src.fn
    names = fn.arg_names
    constexprs = {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
    divisible = frozenset(names[k[0]] for k, attrs in src.attrs.items()
                          if len(k) == 1 and ["tt.divisibility", 16] in [list(a) for a in attrs])
    dns = frozenset(names[i] if isinstance(i, int) else i for i in fn.do_not_specialize)
    assert launcher.usage is not None, f"{fn.__name__}: launched without load_binary"
    return Launch(
        kernel=fn.__name__, device=dev, grid=grid, args=dict(zip(names, args, strict=True)),
        signature=dict(src.signature), constexprs=constexprs, divisible16=divisible,
        do_not_specialize=dns, num_warps=md.num_warps, num_stages=md.num_stages,
        shared=md.shared, usage=launcher.usage, fn=fn,
    )


def missing_triton_features() -> str | None:
    """Why this Triton cannot be driven this way (None when it can)."""
    if not (PTXAS.exists() and CUOBJDUMP.exists()):
        return f"Triton's bundled ptxas/cuobjdump are missing under {NVIDIA_BIN}"
    if not (hasattr(type(_driver_config), "set_active") and "_active" in vars(_driver_config)):
        return f"triton {triton.__version__}: runtime.driver.driver has no set_active/_active"
    from triton.compiler.compiler import CompiledKernel

    for owner, attr in ((JITFunction, "run"), (CompiledKernel, "_init_handles")):
        if not hasattr(owner, attr):
            return f"triton {triton.__version__}: {owner.__name__}.{attr} is missing"
    return None


# one driver per device: a kernel compiled once keeps the launcher made by the driver that was
# active then, so a second driver for the same device key would never see its launches
_DRIVERS: dict[Device, FakeCudaDriver] = {}


@contextlib.contextmanager
def fake_cuda_target(dev: Device) -> Iterator[FakeCudaDriver]:
    """Make the fake driver of ``dev`` Triton's active driver (its ``launches`` list starts
    empty: the launches made inside the block); the previous driver is put back."""
    previous = _driver_config._active  # None until something asked for the active driver
    fake = _DRIVERS.setdefault(dev, FakeCudaDriver(dev))
    fake.launches = []
    _driver_config.set_active(fake)
    try:
        yield fake
    finally:
        _driver_config.set_active(previous)


def forget_fake_kernels(functions) -> None:
    """Drop what was compiled for fake devices from these JITFunctions' caches."""
    for fn in functions:
        for key in [k for k in fn.device_caches if isinstance(k, str) and k.startswith("fake-")]:
            for kernel in fn.device_caches[key][0].values():
                kernel.module = None  # a fake handle: nothing to unload with the real driver
            del fn.device_caches[key]


def expected_specialisation(launch: Launch) -> list[str]:
    """Differences between the compiled signature and Triton's documented rules applied to
    the launch's real argument values (empty when they agree): an integer equal to 1 becomes
    a constant, an integer divisible by 16 and a 16-byte aligned pointer get divisibility 16,
    parameters in ``do_not_specialize`` get neither."""
    problems = []
    for name, value in launch.args.items():
        declared = launch.fn.params[launch.fn.arg_names.index(name)].is_constexpr
        if declared or isinstance(value, (bool, float)) or value is None:
            continue
        dns = name in launch.do_not_specialize
        if isinstance(value, int):
            if value == 1 and not dns:
                want_const, want_div = True, False
            else:
                want_const, want_div = False, (value % 16 == 0 and not dns)
        elif hasattr(value, "data_ptr"):
            want_const, want_div = False, value.data_ptr() % 16 == 0
        else:
            continue
        got_const = launch.signature[name] == "constexpr"
        got_div = name in launch.divisible16
        if (got_const, got_div) != (want_const, want_div):
            problems.append(f"{launch.kernel}.{name}={value if isinstance(value, int) else 'ptr'}"
                            f": constant {got_const} (want {want_const}), divisible-16 {got_div}"
                            f" (want {want_div})")
    return problems


def kernels_defined(modules) -> set[JITFunction]:
    """Top-level kernels of these modules: JITFunctions no other JITFunction there calls."""
    fns = {v for m in modules for v in vars(m).values() if isinstance(v, JITFunction)}
    called = {f for f in fns for g in fns
              if g is not f and re.search(rf"\b{re.escape(f.__name__)}\s*\(", g.src)}
    return fns - called
