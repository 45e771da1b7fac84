"""Compiles the Triton kernels for an H100 (sm_90) ahead of time, without a GPU.

The interpreter does not check what only the GPU compiler does (dot shapes and layouts, types
of loop-carried values, constexpr plumbing, register spills). Triton ships ptxas, so the whole
pipeline down to a cubin runs on the CPU; the resource usage of every cubin is checked for
spills (local memory / stack) with the bundled cuobjdump when it is there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # pragma: no cover
    pytest.skip(f"this Triton has no ASTSource/GPUTarget ({e})", allow_module_level=True)

from g2rl_kernels.ops import sensitivity_triton as K  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SCALARS = ("N", "V", "D", "S", "stride_hn", "stride_hd", "stride_wv", "stride_wd",
           "tiles_per_split", "num_n_blocks", "num_v_tiles")


def _signature(fn, dtype: str) -> dict:
    sig = {}
    for a in fn.arg_names:
        if a in ("h_ptr", "w_ptr", "b_ptr"):
            sig[a] = f"*{dtype}"
        elif a == "y_ptr":
            sig[a] = "*i64"
        elif a == "seq_ptr":
            sig[a] = "*i32"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32"
        elif a == "inv_temp":
            sig[a] = "fp32"
        elif a in SCALARS:
            sig[a] = "i32"
        else:
            sig[a] = "constexpr"
    return sig


def _jobs(dtype: str):
    fp32 = dtype == "fp32"
    precision = "tf32x3" if fp32 else "tf32"
    for kernel, fn in (("lse", K._lse_kernel), ("pool", K._pool_kernel),
                       ("token", K._token_kernel)):
        bn, bv, bd, warps, stages = K.GPU_CONFIGS[(kernel, fp32)]
        consts = dict(HAS_BIAS=True, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, UPCAST=False,
                      PRECISION=precision)
        if kernel == "pool":
            consts["GROUP"] = 8
        if kernel == "token":
            consts["CAST_P"] = not fp32
        yield kernel, fn, consts, dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True)
    yield ("seq_matmul", K._seq_matmul_kernel,
           dict(BLOCK_S=16, BLOCK_V=32, BLOCK_D=64, PRECISION="tf32x3"),
           dict(num_warps=4, enable_fp_fusion=True))


@pytest.mark.skipif(not (NVIDIA_BIN / "ptxas").exists(), reason="Triton's bundled ptxas is missing")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernels_compile_for_sm90_without_spills(dtype, tmp_path):
    target = GPUTarget("cuda", 90, 32)
    cuobjdump = NVIDIA_BIN / "cuobjdump"
    for kernel, fn, consts, options in _jobs(dtype):
        names = fn.arg_names
        src = ASTSource(fn, signature=_signature(fn, dtype),
                        constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=target, options=options)
        cubin = compiled.asm.get("cubin")
        assert cubin, f"{kernel}: no cubin"
        if not (cuobjdump.exists() and shutil.which(str(cuobjdump))):
            continue
        path = tmp_path / f"{kernel}.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in usage.splitlines() if "REG:" in ln)
        fields = dict(f.split(":") for f in line.split() if ":" in f)
        assert fields.get("LOCAL") == "0", f"{kernel} {dtype} spills: {line.strip()}"
        assert int(fields.get("STACK", "0")) <= 64, f"{kernel} {dtype} spills: {line.strip()}"
