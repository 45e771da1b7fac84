"""The CUDA group novelty kernels compile for sm_80 and sm_90 without register spills, in both
variants (work arrays in shared memory and in global scratch), for every feature dtype."""

from __future__ import annotations

import re
import subprocess

import pytest
from test_build import NVCC, ROOT


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
def test_kernels_compile_without_spills(tmp_path):
    cmd = [
        NVCC, "-c", str(ROOT / "csrc" / "group_novelty_cuda.cu"), "-o", str(tmp_path / "k.o"),
        "-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    log = proc.stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
    kernels = {(name, arch) for name, arch in entries if "group_novelty_kernel" in name}
    # 3 dtypes x {shared, global} work arrays, per architecture
    assert len(kernels) == 12, entries
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == 12 and all(s == ("0", "0") for s in spills), log
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert registers and max(registers) <= 64, registers  # __launch_bounds__(256, 4)
