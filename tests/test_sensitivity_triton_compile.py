"""Compiles every Triton kernel of the sensitivity path as a real launch on an A100 (sm_80) and
an H100 (sm_90) would, without a GPU, and checks each cubin for register spills.

The public ``g2rl_kernels.sensitivity(..., _backend="triton")`` is called on CPU tensors of real
shapes with Triton's active driver replaced by a fake CUDA one (tests/_triton_fake_target.py):
each launch goes through Triton's own ``JITFunction.run``, so the compiled signature is Triton's
specialisation of the real argument values (16-byte aligned pointers and integers divisible by
16 get ``tt.divisibility``, integers equal to 1 become constants, ``do_not_specialize`` is
honoured), the cubin comes from Triton's bundled ptxas for that target, its dynamic shared memory
is checked against the device's limit by Triton itself, and the launch is recorded instead of
run. The interpreter does not check what only the GPU compiler does (dot shapes and layouts,
loop-carried types, constexpr plumbing, spills), so this is the only GPU-side check there is
without a GPU.

The test monkeypatches these names (keep them stable):

- ``g2rl_kernels.sensitivity._pick_backend`` (module ``g2rl_kernels/sensitivity.py``): returns
  "triton" (the public entry otherwise refuses CPU tensors without TRITON_INTERPRET=1);
- ``_launch_device_ok`` and ``_sm_count`` of ``g2rl_kernels.ops.sensitivity_triton`` (and of
  every other ``g2rl_kernels.ops`` module defining them): accept CPU tensors, and report the fake
  device's SM count (which decides the number of V splits, hence the ``== 1`` specialisation).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import pkgutil
import sys

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)

pytest.importorskip("triton", reason="Triton is not installed (it is on Linux)")
import torch  # noqa: E402
from _triton_fake_target import (  # noqa: E402
    A100,
    H100,
    Device,
    Launch,
    expected_specialisation,
    fake_cuda_target,
    forget_fake_kernels,
    kernels_defined,
    missing_triton_features,
)

import g2rl_kernels  # noqa: E402
import g2rl_kernels.ops  # noqa: E402

_missing = missing_triton_features()
if _missing:  # pragma: no cover
    pytest.skip(_missing, allow_module_level=True)

SENS_MODULE = sys.modules["g2rl_kernels.sensitivity"]
HOOKS = ("_launch_device_ok", "_sm_count")


def _kernel_modules() -> list:
    """Every g2rl_kernels.ops module that defines Triton kernels (imported)."""
    mods = []
    for info in pkgutil.iter_modules(g2rl_kernels.ops.__path__):
        mod = importlib.import_module(f"g2rl_kernels.ops.{info.name}")
        if kernels_defined([mod]):
            mods.append(mod)
    return mods


KERNEL_MODULES = _kernel_modules()
from g2rl_kernels.ops import sensitivity_triton  # noqa: E402

_missing_hooks = [h for h in HOOKS if not hasattr(sensitivity_triton, h)]
if _missing_hooks:  # pragma: no cover
    pytest.skip(f"g2rl_kernels.ops.sensitivity_triton lacks the launch hooks this test patches: "
                f"{_missing_hooks}", allow_module_level=True)

IMPL_PARAM = "impl" in inspect.signature(g2rl_kernels.sensitivity).parameters
IMPLS = ("fused", "chunked") if IMPL_PARAM else (None,)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEVICES = {"sm80": A100, "sm90": H100}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One call of the wrapper: N tokens, vocabulary V, hidden size d, what is asked for."""

    name: str
    n: int
    v: int
    d: int
    bias: bool
    token_features: bool
    num_seqs: int = 16


# Qwen2.5 vocabularies (151936) at d = 896 (0.5B) and 2048 (3B-like), and small awkward sizes
# (V, N not multiples of 16: no divisibility, V tiles few enough for one tile per split)
SHAPES = (
    Shape("qwen-d896", n=4096, v=151936, d=896, bias=False, token_features=True),
    Shape("qwen-d2048-bias", n=1024, v=151936, d=2048, bias=True, token_features=False,
          num_seqs=128),  # many sequences: seq_matmul with BLOCK_S = 64
    Shape("awkward", n=1000, v=1001, d=896, bias=True, token_features=True, num_seqs=7),
)
# d not a multiple of 16: rows of h and W are not 16-byte aligned, D and the row strides get no
# divisibility hint
ODD_D = Shape("odd-d1000", n=1024, v=151936, d=1000, bias=True, token_features=True)


# impl="chunked" runs its logits GEMMs for real (torch on the CPU): N is cut to one small chunk.
# That compiles the same kernels as a large N: the chunk length C is not specialised on
# (do_not_specialize), and the logits buffer's row stride is V either way.
CHUNKED_N = 64


def _inputs(shape: Shape, dtype: torch.dtype, impl: str | None) -> dict:
    g = torch.Generator().manual_seed(0)
    n = min(shape.n, CHUNKED_N) if impl == "chunked" else shape.n
    # the fused kernels do not run: hidden/weight/bias stay uninitialised (no pages touched);
    # the chunked path's torch GEMMs do run, on zeros
    new = torch.zeros if impl == "chunked" else torch.empty
    hidden = new(n, shape.d, dtype=dtype)
    weight = new(shape.v, shape.d, dtype=dtype)
    targets = torch.randint(0, shape.v, (n,), generator=g)
    targets[::11] = -100
    seq = torch.arange(n) * shape.num_seqs // n
    return dict(hidden=hidden, weight=weight, targets=targets, seq_index=seq,
                num_seqs=shape.num_seqs, bias=new(shape.v, dtype=dtype) if shape.bias
                else None, return_token_features=shape.token_features)


_SEEN: set = set()


@functools.cache
def compile_launches(shape: Shape, dtype: str, dev: Device, impl: str | None) -> tuple:
    """Call the public wrapper under the fake ``dev``; the launches it made, compiled."""
    kw = _inputs(shape, DTYPES[dtype], impl)
    extra = {} if impl is None else {"impl": impl}
    with pytest.MonkeyPatch.context() as mp, fake_cuda_target(dev) as drv:
        mp.setattr(SENS_MODULE, "_pick_backend", lambda backend, hidden, *a, **k: "triton")
        for mod in KERNEL_MODULES:
            if hasattr(mod, "_launch_device_ok"):
                mp.setattr(mod, "_launch_device_ok", lambda t: True)
            if hasattr(mod, "_sm_count"):
                mp.setattr(mod, "_sm_count", lambda device: dev.sms)
        h, w, y = kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")
        g2rl_kernels.sensitivity(h, w, y, check_values=False, _backend="triton", **kw, **extra)
    launches = tuple(drv.launches)
    _SEEN.update(launch.fn for launch in launches)
    for launch in launches:  # report (pytest -s, or -rA with the captured output)
        print(f"[{shape.name} {dtype} impl={impl}] {launch.describe()}")
    return launches


@pytest.fixture(scope="module", autouse=True)
def _forget_fake_kernels():
    yield
    forget_fake_kernels(_SEEN)
    compile_launches.cache_clear()


def _spills(launches: tuple[Launch, ...]) -> list[str]:
    """Launches whose cubin spills (ptxas reports spills as stack frame; LOCAL is local arrays)."""
    return [launch.describe() for launch in launches if launch.usage.local or launch.usage.stack]


def _check_launches(launches: tuple[Launch, ...]) -> None:
    assert launches, "the wrapper launched no Triton kernel"
    for launch in launches:
        problems = expected_specialisation(launch)
        assert not problems, "compiled signature is not the launch's specialisation:\n" + \
            "\n".join(problems)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl={i}")
@pytest.mark.parametrize("dev", DEVICES.values(), ids=DEVICES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_compiles_as_launched_without_spills(shape, dtype, dev, impl):
    launches = compile_launches(shape, dtype, dev, impl)
    _check_launches(launches)
    spills = _spills(launches)
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_specialisation_is_the_launch_one():
    """The cubins are Triton's specialisation of the real arguments, not a generic build: a unit
    stride is a constant, D gets the divisibility hint iff d % 16 == 0, and parameters marked
    do_not_specialize (the token count N) get neither although 4096 % 16 == 0."""
    fused = "fused" if IMPL_PARAM else None
    launches = compile_launches(SHAPES[0], "bf16", H100, fused)
    odd = compile_launches(ODD_D, "bf16", H100, fused)
    unit = [(launch.kernel, k) for launch in launches for k, v in launch.args.items()
            if type(v) is int and v == 1 and launch.signature[k] == "constexpr"
            and not launch.fn.params[launch.fn.arg_names.index(k)].is_constexpr]
    assert unit, "no runtime integer equal to 1 was specialised as a constant"
    for group, d in ((launches, SHAPES[0].d), (odd, ODD_D.d)):
        with_d = [launch for launch in group if launch.args.get("D") == d]
        assert with_d, "no launch has a D argument"
        for launch in with_d:
            assert ("D" in launch.divisible16) == (d % 16 == 0), launch.describe()
    for launch in launches + odd:
        for name in launch.do_not_specialize:
            assert launch.signature[name] != "constexpr", (launch.kernel, name)
            assert name not in launch.divisible16, (launch.kernel, name)
    assert any("N" in launch.do_not_specialize and launch.args["N"] % 16 == 0
               for launch in launches), "N is specialised on (recompiles per token count)"


@pytest.mark.parametrize("dev", DEVICES.values(), ids=DEVICES.keys())
@pytest.mark.parametrize("dtype", DTYPES)
def test_d_not_multiple_of_16(dtype, dev):
    """d % 16 != 0 (no such model is common) still compiles; the rows of h and W are then not
    16-byte aligned and the loads are not vectorised: some kernels spill. Reported as an xfail
    with the measured spills (a correctness non-issue, a speed one)."""
    fused = "fused" if IMPL_PARAM else None
    launches = compile_launches(ODD_D, dtype, dev, fused)
    _check_launches(launches)
    spills = _spills(launches)
    if spills:
        pytest.xfail("d not a multiple of 16 spills:\n" + "\n".join(spills))


def test_every_kernel_is_compiled():
    """Every Triton kernel defined under g2rl_kernels.ops is launched by some configuration
    above, so a new kernel cannot escape this test."""
    launched = set()
    for shape in SHAPES:
        for impl in IMPLS:
            launched.update(launch.fn for launch in compile_launches(shape, "bf16", H100, impl))
    defined = kernels_defined(KERNEL_MODULES)
    missing = sorted(f"{f.__module__}.{f.__name__}" for f in defined - launched)
    assert not missing, f"kernels no configuration launches (add one): {missing}"
