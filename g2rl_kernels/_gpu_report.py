"""Reporting side of ``python -m g2rl_kernels.gpu_check``: the machine and software versions,
the GPU test run (pytest in a subprocess, counted from its JUnit XML) and the JSON/markdown
outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from g2rl_kernels._gpu_bench import FLOP_FORMULAS

# Test files of the kernels (their CUDA cases are selected by TEST_SELECTION)
TEST_PATTERNS = ("test_sensitivity*.py", "test_group_novelty*.py", "test_build.py")
TEST_SELECTION = "cuda or gpu"


def repo_root() -> Path:
    """The directory above the g2rl_kernels package (the repository in an editable install)."""
    return Path(__file__).resolve().parent.parent


def _cmd(args: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def extension_versions() -> dict:
    """CUDA runtime the group-novelty extension was built with and the driver's CUDA version
    (as CUDA encodes them: 12080 = 12.8; driver 0 = no driver), or None without the CUDA part."""
    try:
        from g2rl_kernels import _C_cuda
    except ImportError:
        return {"extension_cuda_runtime": None, "extension_cuda_driver": None}
    return {"extension_cuda_runtime": int(_C_cuda.runtime_version()),
            "extension_cuda_driver": int(_C_cuda.driver_version())}


def environment(device: torch.device) -> dict:
    """Device, driver, torch/Triton/CUDA versions, git commit of the checkout."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = repo_root()
    commit = _cmd(["git", "rev-parse", "HEAD"], cwd=root)
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    env = {
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": None if dirty is None or commit is None else bool(dirty),
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extension_versions(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                       f"--id={device.index or 0}"])
        env.update(
            device_name=props.name, capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
            driver=driver, cudnn=torch.backends.cudnn.version(),
            allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        env.update(device_name=platform.processor() or platform.machine(), driver=None)
    return env


def run_gpu_tests(out_dir: Path, timeout_s: float, tests_dir: Path | None = None,
                  patterns: tuple[str, ...] = TEST_PATTERNS,
                  selection: str = TEST_SELECTION) -> dict:
    """Run the kernels' CUDA tests with pytest in a subprocess; counts from its JUnit XML.

    Returns {"status": "passed" | "failed" | "timeout" | "skipped" | "error", counts, failed
    test ids, the command, the output's tail}."""
    tests_dir = tests_dir or repo_root() / "tests"
    if not tests_dir.is_dir():
        return {"status": "skipped",
                "reason": f"no tests directory at {tests_dir} (g2rl_kernels is not installed "
                          "from a checkout of the repository)"}
    files = sorted({str(p) for pat in patterns for p in tests_dir.glob(pat)})
    if not files:
        return {"status": "skipped", "reason": f"no test files matching {patterns} in {tests_dir}"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed here"}
    # absolute (pytest runs from the repository root) and fresh (no stale file of a former run)
    xml = (out_dir / "gpu_tests_junit.xml").resolve()
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "-k", selection, "-q", "-p",
           "no:cacheprovider", f"--junitxml={xml}", "--durations=15"]
    result: dict = {"command": " ".join(cmd), "timeout_s": timeout_s}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tests_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        # SIGINT: pytest stops, reports what ran and writes its JUnit XML (a kill would not)
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        timed_out = True
    result.update(seconds=time.perf_counter() - t0, returncode=proc.returncode,
                  output_tail=(out or "")[-3000:])
    if xml.is_file():
        result.update(parse_junit(xml))
    if timed_out:
        result.update(status="timeout", reason=f"pytest ran past {timeout_s:.0f} s; the counts "
                                               "are of the tests that ran")
        return result
    if not xml.is_file():
        result.update(status="error", reason="pytest wrote no JUnit XML")
        return result
    bad = result["failed"] + result["errors"]
    result["status"] = "failed" if bad or proc.returncode not in (0, 5) else "passed"
    return result


def parse_junit(path: Path) -> dict:
    """Counts (tests, passed, failed, errors, skipped) and failing test ids of a JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failing[:50]}


# ----------------------------------------------------------------------------- outputs


def _finite(x):
    """NaN and infinities as strings (strict JSON parsers refuse them as numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write_json(report: dict, path: Path) -> None:
    """Strict JSON (NaN/inf as strings), written to a temporary file and renamed: a run killed
    while writing leaves the previous report, not half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(report), indent=1, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x * 1e3:.3g}"


def _row_cells(row: dict) -> list[str]:
    t = row.get("timing") or {}
    check = row.get("check")
    if row["status"] in ("skipped", "oom", "error"):
        verdict = row["status"].upper() if row["status"] != "skipped" else "skipped"
    elif check is None:
        verdict = "n/a"
    else:
        verdict = "**BAD RESULT**" if not check["ok"] else (
            "ok" if check.get("strict_ok", True) else "ok (16-bit-level)")
    time_cell = ""
    if t:
        time_cell = (f"{_ms(t['median_s'])} [{_ms(t['min_s'])}-{_ms(t['max_s'])}] "
                     f"x{len(t['times_s'])}")
    peak = row.get("peak_mib")
    share = row.get("share_of_bf16_gemm")
    vs = row.get("time_vs_logprob_only")
    return [
        row["name"], row.get("config", ""), time_cell,
        "" if row.get("tflops") is None else f"{row['tflops']:.3g}",
        "" if share is None else f"{100 * share:.1f}%",
        "" if peak is None else f"{peak:.0f}",
        "" if vs is None else f"{vs:.2f}",
        verdict, (row.get("reason") or row.get("note") or "").replace("|", "/"),
    ]


def render_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    roofs = report.get("roofs", {})
    lines = [
        f"# g2rl_kernels GPU check ({env.get('device_name')})", "",
        f"- device: {env.get('device_name')} ({env['device_type']}), driver {env.get('driver')}, "
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), Triton {env['triton']}, "
        f"Python {env['python']}",
        f"- checkout: {env.get('git_commit')}"
        + (" (uncommitted changes)" if env.get("git_dirty") else ""),
        f"- date: {env['date_utc']}; smoke sizes: {s['smoke']}; budget {s['budget_s']} s, "
        f"ran {report['summary']['elapsed_s']:.0f} s",
    ]
    for name, r in roofs.items():
        if r.get("tflops") is not None:
            lines.append(f"- roof {name}: {r['tflops']:.4g} TFLOP/s ({r['size']}^3 torch.mm, "
                         f"median of {len(r['times_s'])})")
    tests = report.get("tests", {})
    lines.append(f"- GPU tests: {_tests_line(tests)}")
    lines += [f"  - failing: {t}" for t in tests.get("failing", [])[:20]]
    sm = report["summary"]
    lines += [f"- rows: {sm['counts']}; verdict: **{sm['verdict']}**", "",
              "Time: median [min-max] in ms x runs, after a compile/warm-up call. Sensitivity rows "
              "run with check_values=False unless the name says check_values=True. "
              "TFLOP/s counts the flop model of the row's op (below); % is of the measured bf16 "
              "GEMM rate. Peak: torch.cuda.max_memory_allocated above the inputs (MiB"
              + ("; not measured on the CPU" if env["device_type"] != "cuda" else "") + "). "
              "vs lp: time / the log-prob-only pass of the same configuration. Check: the "
              "outputs of a slice (first and last sequence) against float64, within 4 x the "
              "error of plain PyTorch in the input dtype or float32 (the test suite's rule); "
              "\"ok\" also within 4 x float32's error, \"ok (16-bit-level)\" only the "
              "former.", "",
              "| row | config | time ms | TFLOP/s | % bf16 GEMM | peak MiB | vs lp | check | "
              "note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_row_cells(row)) + " |")
    lines += ["", "Flop models (N tokens, V vocabulary, d hidden, S sequences, B groups of G):",
              ""]
    lines += [f"- {op}: {f}" for op, f in FLOP_FORMULAS.items()]
    return "\n".join(lines) + "\n"


def _tests_line(tests: dict) -> str:
    if not tests:
        return "not run"
    counts = ""
    if "passed" in tests:
        counts = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} "
                  f"errors, {tests['skipped']} skipped")
    if tests.get("status") in ("skipped", "timeout", "error", "running"):
        line = f"{tests['status']}: {tests.get('reason', '')}".rstrip(": ")
        return f"{line} ({counts})" if counts else line
    return (f"{tests['status']}: {tests['passed']} passed, {tests['failed']} failed, "
            f"{tests['errors']} errors, {tests['skipped']} skipped "
            f"({tests.get('seconds', 0):.0f} s)")
