"""Sensitivity outputs (log-probs, entropies, lse, G2RL sequence features): time and peak memory.

Run: pytest benchmarks/test_bench_sensitivity.py --benchmark-only

CPU, float32, N = 4096 tokens in 16 sequences, V = 32768, d = 512; three implementations of
the same outputs, timed in the same run (one pytest-benchmark group):

- ``pooled``: ``g2rl_kernels.sensitivity`` (chunked CPU path, q accumulation, then q @ W);
- ``natural``: plain PyTorch: full (N, V) logits, log_softmax, p @ W, then pooling;
- ``per_token``: ``g2rl_kernels.sensitivity(return_token_features=True)``, then pooling.

Peak memory "above the inputs" is the growth of the process's peak resident set size during
one call, measured in a fresh subprocess per implementation after the inputs are built in place
and a small warm-up call has initialised the libraries: the peak (VmHWM) is reset to the current
RSS through /proc/self/clear_refs just before the call (``ru_maxrss`` where that is missing).
It counts every page the call touches (torch's CPU allocator, MKL's buffers), which tracemalloc
would not see. It goes to ``benchmark.extra_info`` (MiB), with the ratios against ``pooled``.

Two more CPU groups (issue 12), each with its baseline in the same run:

- sharp logits, float32, N = 2048 in 32 sequences, V = 32768, d = 256: ``flat`` (logits' std
  about 1, the baseline) and ``sharp`` (std about 30: a confident model or a low temperature;
  most exp arguments below -87, torch.exp's denormal slow path without the clamp);
- 16-bit inputs, N = 1024 in 32 sequences, V = 151936, d = 896 (Qwen2.5-0.5B's LM head):
  ``float32`` (the same shape in float32, the baseline), ``bfloat16`` (W upcast one vocabulary
  chunk at a time) and ``bfloat16_upcast_first`` (float32 copies of W and h made first: what
  the CPU path did before, for comparison).

GPU (skipped without one): bf16, N = 32768, V = 151936, d = 2048 (Qwen3-1.7B): time, TFLOP/s
counted as 4 N V d, the fraction of a large bf16 ``torch.matmul`` rate measured in the same
run, and a chunked PyTorch baseline.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import g2rl_kernels

# inputs built in place (no temporaries that would inflate the baseline peak RSS); the same
# construction as python -m g2rl_kernels.gpu_check
from g2rl_kernels._gpu_bench import make_inputs

CPU_SHAPE = dict(n=4096, num_seqs=16, v=32768, d=512)
SHARP_SHAPE = dict(n=2048, num_seqs=32, v=32768, d=256)
HALF_SHAPE = dict(n=1024, num_seqs=32, v=151936, d=896)
GPU_SHAPE = dict(n=32768, num_seqs=64, v=151936, d=2048)
_results: dict = {}


def pooled(hidden, weight, targets, seq_index, num_seqs):
    return g2rl_kernels.sensitivity(hidden, weight, targets, seq_index=seq_index,
                                    num_seqs=num_seqs)


def pooled_no_checks(hidden, weight, targets, seq_index, num_seqs):
    """The hot-path call: no value scan (that is the one host synchronisation on CUDA)."""
    return g2rl_kernels.sensitivity(hidden, weight, targets, seq_index=seq_index,
                                    num_seqs=num_seqs, check_values=False)


def per_token(hidden, weight, targets, seq_index, num_seqs):
    out = g2rl_kernels.sensitivity(hidden, weight, targets, return_token_features=True)
    count = torch.zeros(num_seqs, device=hidden.device).index_add_(
        0, seq_index, torch.ones(len(targets), device=hidden.device))
    a = (1.0 / (count + 1e-8))[seq_index]
    feats = torch.zeros(num_seqs, hidden.shape[1], device=hidden.device)
    feats.index_add_(0, seq_index, out.token_features * a[:, None])
    return out._replace(seq_features=feats)


def natural(hidden, weight, targets, seq_index, num_seqs):
    """The obvious PyTorch code: full logits, softmax, p @ W, pooling."""
    logits = hidden @ weight.T  # (N, V)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[:, None]
    p = logp.exp()
    logprobs = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(p * logp).sum(-1)
    phi = weight[targets] - p @ weight  # (N, d)
    count = torch.zeros(num_seqs).index_add_(0, seq_index, torch.ones(len(targets)))
    a = (1.0 / (count + 1e-8))[seq_index]
    feats = torch.zeros(num_seqs, hidden.shape[1]).index_add_(0, seq_index, phi * a[:, None])
    return g2rl_kernels.SensitivityOutput(logprobs, entropy, lse, feats, None)


def pooled_upcast_first(hidden, weight, targets, seq_index, num_seqs):
    """16-bit inputs the way the CPU path used to treat them: float32 copies first."""
    return pooled(hidden.float(), weight.float(), targets, seq_index, num_seqs)


IMPLS = {"pooled": pooled, "natural": natural, "per_token": per_token}
# (implementation, input shape, input dtype) of every row whose peak memory is measured
PEAK_ROWS = {
    **{impl: (fn, CPU_SHAPE, torch.float32) for impl, fn in IMPLS.items()},
    "float32": (pooled, HALF_SHAPE, torch.float32),
    "bfloat16": (pooled, HALF_SHAPE, torch.bfloat16),
    "bfloat16_upcast_first": (pooled_upcast_first, HALF_SHAPE, torch.bfloat16),
}


def peak_rss_mib(impl: str) -> float:
    """Peak RSS growth (MiB) of one call of ``impl`` in a fresh subprocess."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--peak", impl],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def _peak_main(impl: str) -> None:
    fn, shape, dtype = PEAK_ROWS[impl]
    small = make_inputs(n=64, num_seqs=4, v=1024, d=shape["d"], dtype=dtype, seed=1)
    fn(*small)  # initialise torch/MKL outside the measurement
    del small
    args = make_inputs(**shape, dtype=dtype)
    try:  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, method = _status_kib("VmRSS"), "VmHWM after clear_refs"
    except OSError:
        before, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    fn(*args)
    if method == "ru_maxrss":
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    else:
        after = _status_kib("VmHWM")
    print(json.dumps({"impl": impl, "peak_mib": (after - before) / 1024, "method": method}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sensitivity_cpu(benchmark, impl):
    args = make_inputs(**CPU_SHAPE)
    fn = IMPLS[impl]
    benchmark.group = "sensitivity cpu float32 N=4096 S=16 V=32768 d=512"
    peak = peak_rss_mib(impl)
    out = benchmark.pedantic(fn, args=args, rounds=3, iterations=1, warmup_rounds=1)
    _results[impl] = dict(time_s=benchmark.stats.stats.min, peak_mib=peak)
    benchmark.extra_info.update(CPU_SHAPE, impl=impl, threads=torch.get_num_threads(),
                                peak_mib_above_inputs=round(peak, 1),
                                load_average_1min=round(os.getloadavg()[0], 2))
    if "pooled" in _results and impl != "pooled":
        base = _results["pooled"]
        benchmark.extra_info.update(
            time_vs_pooled=round(_results[impl]["time_s"] / base["time_s"], 2),
            peak_vs_pooled=round(peak / max(base["peak_mib"], 1e-9), 1),
        )
    assert out.seq_features.shape == (CPU_SHAPE["num_seqs"], CPU_SHAPE["d"])
    assert torch.isfinite(out.seq_features).all()


def _time_vs(benchmark, key: str, base_key: str) -> None:
    """Record this row's min time (and peak) and its ratios against the group's baseline."""
    if base_key in _results and key != base_key:
        base, row = _results[base_key], _results[key]
        benchmark.extra_info[f"time_vs_{base_key.split(':')[1]}"] = round(
            row["time_s"] / base["time_s"], 2)
        if "peak_mib" in row:
            benchmark.extra_info[f"peak_vs_{base_key.split(':')[1]}"] = round(
                row["peak_mib"] / max(base["peak_mib"], 1e-9), 2)


@pytest.mark.parametrize("logits", ["flat", "sharp"])
def test_sensitivity_cpu_sharp_logits(benchmark, logits):
    """Confident models: the same shapes with the logits' std about 1 and about 30."""
    std = {"flat": 1.0, "sharp": 30.0}[logits]
    args = make_inputs(**SHARP_SHAPE, logit_std=std)
    benchmark.group = "sensitivity cpu float32 sharp logits N=2048 S=32 V=32768 d=256"
    out = benchmark.pedantic(pooled, args=args, rounds=5, iterations=1, warmup_rounds=1)
    _results[f"sharp:{logits}"] = dict(time_s=benchmark.stats.stats.min)
    benchmark.extra_info.update(SHARP_SHAPE, logits=logits, logit_std=std,
                                threads=torch.get_num_threads(),
                                load_average_1min=round(os.getloadavg()[0], 2))
    _time_vs(benchmark, f"sharp:{logits}", "sharp:flat")
    assert torch.isfinite(out.seq_features).all()


@pytest.mark.parametrize("impl", ["float32", "bfloat16", "bfloat16_upcast_first"])
def test_sensitivity_cpu_16bit(benchmark, impl):
    """16-bit inputs at Qwen2.5-0.5B's LM head: time and peak memory above the inputs."""
    fn, shape, dtype = PEAK_ROWS[impl]
    args = make_inputs(**shape, dtype=dtype)
    benchmark.group = "sensitivity cpu 16-bit N=1024 S=32 V=151936 d=896"
    peak = peak_rss_mib(impl)
    out = benchmark.pedantic(fn, args=args, rounds=2, iterations=1, warmup_rounds=1)
    _results[f"half:{impl}"] = dict(time_s=benchmark.stats.stats.min, peak_mib=peak)
    w_mib = args[1].numel() * args[1].element_size() / 2**20
    benchmark.extra_info.update(shape, impl=impl, dtype=str(dtype), weight_mib=round(w_mib, 1),
                                peak_mib_above_inputs=round(peak, 1),
                                threads=torch.get_num_threads(),
                                load_average_1min=round(os.getloadavg()[0], 2))
    _time_vs(benchmark, f"half:{impl}", "half:float32")
    assert torch.isfinite(out.seq_features).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def chunked_torch_gpu(hidden, weight, targets, seq_index, num_seqs, chunk=4096):
    """A chunked PyTorch baseline on the GPU: bf16 logits per chunk, float32 softmax, q
    accumulation, then (S, V) @ (V, d) in float32."""
    n, d = hidden.shape
    q = torch.zeros(num_seqs, weight.shape[0], device=hidden.device)
    count = torch.zeros(num_seqs, device=hidden.device).index_add_(
        0, seq_index, torch.ones(n, device=hidden.device))
    a = 1.0 / (count + 1e-8)
    lse = torch.empty(n, device=hidden.device)
    for s0 in range(0, n, chunk):
        z = (hidden[s0:s0 + chunk] @ weight.T).float()
        lse[s0:s0 + chunk] = torch.logsumexp(z, -1)
        p = torch.softmax(z, -1).mul_(a[seq_index[s0:s0 + chunk], None])
        q.index_add_(0, seq_index[s0:s0 + chunk], p)
    q.neg_().index_put_((seq_index, targets), a[seq_index], accumulate=True)
    return q @ weight.float()


def _cuda_time(fn, *args, reps=3) -> float:
    fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(reps):
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _impl_no_checks(impl: str):
    def fn(hidden, weight, targets, seq_index, num_seqs):
        return g2rl_kernels.sensitivity(hidden, weight, targets, seq_index=seq_index,
                                        num_seqs=num_seqs, check_values=False, impl=impl)
    return fn


# flops of each GPU row: the fused passes compute the logits twice; the chunked path once
# (cuBLAS) plus the (S, V) @ (V, d) product; the torch baseline like the chunked path
GPU_IMPLS = {
    "triton_fused": (_impl_no_checks("fused"), lambda n, v, d, s: 4 * n * v * d + 2 * s * v * d),
    "triton_chunked": (_impl_no_checks("chunked"),
                       lambda n, v, d, s: 2 * n * v * d + 2 * s * v * d),
    "chunked_torch": (chunked_torch_gpu, lambda n, v, d, s: 2 * n * v * d + 2 * s * v * d),
}


@CUDA
@pytest.mark.parametrize("impl", list(GPU_IMPLS))
def test_sensitivity_gpu(benchmark, impl):
    s = GPU_SHAPE
    args = make_inputs(**s, dtype=torch.bfloat16, device="cuda")
    fn, flop_count = GPU_IMPLS[impl]
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_rate = 2 * 8192**3 / _cuda_time(torch.matmul, a, a, reps=10)
    del a
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    t = _cuda_time(fn, *args)
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    flops = flop_count(s["n"], s["v"], s["d"], args[-1])
    benchmark.group = "sensitivity cuda bf16 N=32768 V=151936 d=2048"
    benchmark.extra_info.update(
        s, impl=impl, time_s=t, tflops=flops / t / 1e12, matmul_tflops=mm_rate / 1e12,
        fraction_of_matmul=flops / t / mm_rate, peak_mib_above_inputs=peak,
        device=torch.cuda.get_device_name(),
    )

    def run():
        fn(*args)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        _peak_main(sys.argv[2])
    else:
        raise SystemExit("usage: test_bench_sensitivity.py --peak IMPL")
