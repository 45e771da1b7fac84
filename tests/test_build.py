"""The compiled extension: the CPU part is importable, and the CUDA sources compile with nvcc
wherever nvcc is present (even with no GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import g2rl_kernels
from g2rl_kernels.ops import group_novelty_op

ROOT = Path(__file__).resolve().parents[1]


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()


def test_cpu_extension_is_built():
    ext = group_novelty_op.cpu_extension()
    assert ext.num_threads() >= 1
    assert hasattr(ext, "group_novelty")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
def test_cuda_sources_compile(tmp_path):
    """nvcc compiles the CUDA kernel for a Hopper and an Ampere target (sm_90, sm_80)."""
    obj = tmp_path / "group_novelty_cuda.o"
    cmd = [
        NVCC, "-c", str(ROOT / "csrc" / "group_novelty_cuda.cu"), "-o", str(obj), "-O3",
        "-std=c++17", "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert obj.stat().st_size > 0
    # the kernel is really in there, for every dtype
    if shutil.which("cuobjdump") or (Path(NVCC).parent / "cuobjdump").exists():
        cuobjdump = shutil.which("cuobjdump") or str(Path(NVCC).parent / "cuobjdump")
        names = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True,
                               text=True).stdout
        assert "sm_90" in names and "sm_80" in names


@pytest.mark.skipif(NVCC is None or os.environ.get("G2RL_BUILD_CUDA", "auto") == "0",
                    reason="nvcc not found or G2RL_BUILD_CUDA=0: the CUDA part is not built")
def test_cuda_extension_built_where_nvcc_is_found():
    """With the default G2RL_BUILD_CUDA=auto, `pip install -e .` built g2rl_kernels._C_cuda."""
    assert g2rl_kernels.cuda_available()
    assert group_novelty_op.cuda_extension().max_group_size >= 1024


@pytest.mark.parametrize("mode, builds", [("auto", True), ("1", False)])
def test_a_failing_nvcc_costs_only_the_cuda_part(tmp_path, mode, builds):
    """An nvcc that cannot compile (e.g. an older toolkit beside a newer host compiler): with
    G2RL_BUILD_CUDA=auto the CPU extension is still built and the install goes on; with 1 the
    build fails."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'release 13.0' && exit 0\n"
                    "echo 'nvcc: unsupported host compiler' >&2; exit 1\n")
    nvcc.chmod(0o755)
    env = {**os.environ, "CUDA_HOME": str(home), "G2RL_BUILD_CUDA": mode}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"),
         "-t", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    built = sorted(p.name.split(".")[0] for p in (tmp_path / "lib").rglob("_C*.so"))
    if builds:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "nvcc failed" in proc.stderr and "building without the CUDA part" in proc.stderr
        assert built == ["_C"]
    else:
        assert proc.returncode != 0
        assert "_C_cuda" not in built
