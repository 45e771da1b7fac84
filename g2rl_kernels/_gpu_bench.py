"""Helpers of ``python -m g2rl_kernels.gpu_check``: inputs, the PyTorch baselines, timers, flop
models and the float64 spot checks of each benchmarked configuration.

Nothing here is specific to CUDA: the same code runs on CPU tensors (``--device cpu --smoke``),
with ``time.perf_counter`` in place of CUDA events and no peak-memory counter.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

import g2rl_kernels
from g2rl_kernels import reference
from g2rl_kernels.sensitivity import SensitivityOutput

SENS_FIELDS = SensitivityOutput._fields
# Fixed tolerances of group_novelty against the float64 oracle (tests/test_group_novelty.py)
NOVELTY_TOL = {"cosine": 2e-6, "novelty": 1e-5, "shaped_rewards": 5e-4, "advantages": 4e-3}

# Executed-flop models (multiply-add = 2 flops) of each benchmarked operation. N tokens, V
# vocabulary, d hidden size, S sequences; B groups of G responses.
FLOP_FORMULAS = {
    "gemm": "2 m n k",
    "logprob_only": "2 N V d (logits; lse and gather are elementwise)",
    "natural": "4 N V d (logits, then p @ W)",
    "fused": "4 N V d + 2 S V d (two logits passes, then r @ W)",
    "chunked": "2 N V d + 2 S V d (one logits GEMM, then r @ W)",
    "fused_tokens": "6 N V d (lse pass; logits again and p @ W)",
    "chunked_tokens": "4 N V d (logits GEMM, then (e(y) - p) @ W)",
    "novelty": "2 B G^2 d (the Gram matrices)",
}


def flops(op: str, n: int = 0, v: int = 0, d: int = 0, s: int = 0) -> float:
    """Flops of ``op`` by :data:`FLOP_FORMULAS` (for "novelty": n = B, v = G; for "gemm": the
    m, n, k are n, v, d)."""
    nvd = float(n) * v * d
    return {
        "gemm": 2 * nvd, "logprob_only": 2 * nvd, "natural": 4 * nvd,
        "fused": 4 * nvd + 2.0 * s * v * d, "chunked": 2 * nvd + 2.0 * s * v * d,
        "fused_tokens": 6 * nvd, "chunked_tokens": 4 * nvd, "novelty": 2.0 * n * v * v * d,
    }[op]


class SensInputs(NamedTuple):
    hidden: torch.Tensor  # (N, d)
    weight: torch.Tensor  # (V, d)
    targets: torch.Tensor  # (N,) int64
    seq_index: torch.Tensor  # (N,) int64, contiguous sequences
    num_seqs: int


def make_inputs(n: int, num_seqs: int, v: int, d: int, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0,
                logit_std: float = 2.0) -> SensInputs:
    """Random inputs built in place, logits' std about ``logit_std``; the same construction as
    benchmarks/test_bench_sensitivity.py. Tokens are in ``num_seqs`` contiguous sequences."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(n, d, dtype=dtype, device=device).normal_(generator=g)
    weight = torch.empty(v, d, dtype=dtype, device=device).normal_(generator=g)
    weight.mul_(logit_std / math.sqrt(d))
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    seq_index = torch.arange(n, device=device) * num_seqs // n
    return SensInputs(hidden, weight, targets, seq_index, num_seqs)


def novelty_inputs(b: int, g: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    """(B, G, d) features with a shared direction (so the novelties spread), (B, G) rewards
    in {-1, +1}: the construction of tests/test_group_novelty.py."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, g, d, generator=gen)
    feats += 1.5 * torch.randn(b, 1, d, generator=gen) * torch.rand(b, g, 1, generator=gen)
    rewards = torch.randint(0, 2, (b, g), generator=gen).float() * 2 - 1
    return feats.to(dtype).to(device), rewards.to(device)


# ----------------------------------------------------------------------------- baselines


def logprob_chunk(v: int, budget_bytes: int = 1 << 30) -> int:
    """Token chunk of the log-prob-only baseline: a (chunk, V) float32 block of at most
    ``budget_bytes``."""
    return max(1, budget_bytes // (4 * max(v, 1)))


def logprob_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk: int | None = None) -> SensitivityOutput:
    """The log-prob pass a GRPO step pays anyway, in chunked PyTorch: per token chunk the
    logits h @ W^T (in the input dtype, then float32), logsumexp, gather.

    Returns a SensitivityOutput with logprobs and lse (N,) float32; the other fields None."""
    n = hidden.shape[0]
    chunk = chunk or logprob_chunk(weight.shape[0])
    logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logprobs)
    for s0 in range(0, n, chunk):
        z = (hidden[s0:s0 + chunk] @ weight.T).float()
        lse_c = torch.logsumexp(z, dim=-1)
        lse[s0:s0 + chunk] = lse_c
        logprobs[s0:s0 + chunk] = z.gather(1, targets[s0:s0 + chunk, None]).squeeze(1) - lse_c
    return SensitivityOutput(logprobs, None, lse, None, None)


def natural(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            seq_index: torch.Tensor, num_seqs: int) -> SensitivityOutput:
    """The obvious PyTorch code: full (N, V) float32 logits, log_softmax, p @ W, pooling with
    a~_t = 1 / (count + 1e-8). Peak about :func:`natural_bytes`."""
    logits = (hidden @ weight.T).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    logprobs = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(p * logp).sum(-1)
    phi = weight[targets].float() - (p.to(weight.dtype) @ weight).float()
    dev = hidden.device
    count = torch.zeros(num_seqs, device=dev).index_add_(
        0, seq_index, torch.ones(len(targets), device=dev))
    a = (1.0 / (count + 1e-8))[seq_index]
    feats = torch.zeros(num_seqs, hidden.shape[1], device=dev)
    feats.index_add_(0, seq_index, phi * a[:, None])
    return SensitivityOutput(logprobs, entropy, lse, feats, None)


def natural_bytes(n: int, v: int) -> int:
    """Peak of :func:`natural` above its inputs: four live (N, V) float32 tensors (logits,
    log-probs, probabilities, the entropy product)."""
    return 16 * n * v


# ----------------------------------------------------------------------------- sensitivity


class Unavailable(Exception):
    """A row that this checkout or this device cannot run (recorded as skipped)."""


def impl_kwargs(impl: str, interpreted: bool) -> dict:
    """Keyword arguments selecting ``impl`` ("fused" or "chunked"); ``interpreted``: the Triton
    kernels under TRITON_INTERPRET=1 on CPU tensors (``_backend="triton"``)."""
    if not interpreted:
        return {"impl": impl}
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise Unavailable("the Triton paths on CPU tensors need TRITON_INTERPRET=1")
    return {"impl": impl, "_backend": "triton"}


def sensitivity_call(inputs: SensInputs, impl: str, *, interpreted: bool = False,
                     pooled: bool = True, tokens: bool = False,
                     check_values: bool = False) -> Callable[[], SensitivityOutput]:
    """A zero-argument call of g2rl_kernels.sensitivity on ``inputs``."""
    kw = impl_kwargs(impl, interpreted)
    kw.update(check_values=check_values, return_token_features=tokens)
    if pooled:
        kw.update(seq_index=inputs.seq_index, num_seqs=inputs.num_seqs)
    h, w, y = inputs.hidden, inputs.weight, inputs.targets

    def call() -> SensitivityOutput:
        return g2rl_kernels.sensitivity(h, w, y, **kw)

    return call


# ----------------------------------------------------------------------------- timing


class KernelHang(RuntimeError):
    """A GPU call did not finish within its deadline: the device cannot be used any more."""


class Timer:
    """Seconds of one call: CUDA events on a CUDA device, perf_counter on the CPU.

    On CUDA the wait polls the end event with a deadline (``deadline_s``) instead of blocking
    in the driver, so a hung kernel raises :class:`KernelHang` (and the report can be saved)
    rather than stalling until the process is killed."""

    def __init__(self, device: torch.device, deadline_s: float = 120.0):
        self.cuda = device.type == "cuda"
        self.deadline_s = deadline_s

    def _wait(self, event) -> None:
        t0 = time.perf_counter()
        while not event.query():
            if time.perf_counter() - t0 > self.deadline_s:
                raise KernelHang(f"a GPU call ran past {self.deadline_s:.0f} s")
            time.sleep(1e-4)

    def sync(self) -> None:
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
            self._wait(done)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        self._wait(end)
        return start.elapsed_time(end) / 1e3


def summarise(times: list[float]) -> dict:
    """Median, min, max and the spread (max - min) / median of a list of seconds."""
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0,
            "times_s": list(times)}


def gemm_rate(dtype: torch.dtype, size: int, device: torch.device, reps: int = 10) -> dict:
    """Measured rate of a (size x size) @ (size x size) product: median of ``reps`` runs."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=g)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=g)
    timer = Timer(device)
    for _ in range(2):
        torch.mm(a, b)
    timer.sync()
    stats = summarise([timer(lambda: torch.mm(a, b)) for _ in range(reps)])
    f = flops("gemm", size, size, size)
    return {**stats, "flops": f, "tflops": f / stats["median_s"] / 1e12}


# ----------------------------------------------------------------------------- spot checks


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float((x.double() - ref.double()).abs().max())


def check_slice(inputs: SensInputs, pooled: bool, max_tokens: int = 1024) -> torch.Tensor:
    """Token indices of the spot check: the first and last sequence (pooled rows; whole
    sequences, so their features can be recomputed), else the first and last tokens."""
    n = inputs.hidden.shape[0]
    if pooled:
        last = inputs.num_seqs - 1
        keep = (inputs.seq_index == 0) | (inputs.seq_index == last)
        return keep.nonzero().squeeze(1)
    half = max(1, max_tokens // 2)
    idx = torch.cat([torch.arange(min(half, n)), torch.arange(max(n - half, min(half, n)), n)])
    return idx.to(inputs.hidden.device)


class SpotReference(NamedTuple):
    idx: torch.Tensor  # (k,) token indices into the full problem
    seqs: list[int]  # sequence ids whose features are compared (row i of ref.seq_features)
    ref: SensitivityOutput  # float64 on the slice
    tol: dict  # field -> absolute tolerance: a float, or a tensor of the field's shape
    tol_strict: dict  # the same from float32's error alone (16-bit inputs: tighter)


def field_tolerances(ref: SensitivityOutput, errs: dict, w_scale: float) -> dict:
    """Absolute tolerance of each present field of ``ref`` (the tests' rule): 4 x ``errs[f]``
    (the error plain PyTorch makes) plus 1e-5 x (1 + max |value|); for the features the scale
    is at least max |W| = ``w_scale`` (a feature is a difference of W-sized terms, W[y] - p @ W:
    float32 cancellation error scales with |W| even where the difference is ~0)."""
    tol: dict = {}
    for f in SENS_FIELDS:
        r = getattr(ref, f)
        if r is None:
            continue
        scale = float(r.abs().max()) if r.numel() else 0.0
        if f in ("seq_features", "token_features"):
            scale = max(scale, w_scale)
        tol[f] = 4 * errs[f] + 1e-5 * (1 + scale)
    return tol


def rounded_g_bound(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, d) float64 bound of the error of rounding g (N, V) float64 (rows e(y_t) - p_t, 0 for
    ignored tokens) to nearest in the dtype of the 16-bit ``weight`` (V, d) before the product
    with W: u (|g_t| @ |W|), u the unit roundoff (bfloat16 2^-8, float16 2^-11); float16 also
    2^-25 / c_t (1 @ |W|) for the entries of the row, scaled by c_t = 2^-floor(log2 max |g_t|),
    that fall below its smallest normal number (absolute error at most half its smallest
    subnormal, 2^-25)."""
    w = weight.double()
    if weight.dtype == torch.float16:
        g_max = g.abs().amax(dim=1)
        scale = torch.where(g_max > 0, torch.exp2(-torch.floor(torch.log2(g_max))), 1.0)
        tail = 2.0**-25 / scale[:, None] * w.abs().sum(dim=0)[None, :]
        return 2.0**-11 * (g.abs() @ w.abs()) + tail
    return 2.0**-8 * (g.abs() @ w.abs())


def spot_reference(inputs: SensInputs, pooled: bool, tokens: bool) -> SpotReference:
    """float64 outputs on a slice, with the test suite's tolerances (tests/_sensitivity_helpers
    ``tolerances``, as on CUDA): per field 4 x the worst error plain PyTorch makes in the input
    dtype or float32 on the same (rounded) inputs, plus 1e-5 x (1 + scale) (features: scale
    includes max |W|). Token features with a 16-bit W: the float32 part only, plus the
    elementwise bound of rounding (:func:`rounded_g_bound`, as in the tests)
    g_t = e(y_t) - p_t to W's dtype for the tensor-core product (the 16-bit reference
    subtracts p_y W[y] from W[y] in 16 bits: no yardstick). ``tol_strict``: float32's error
    alone (what a path that accumulates in float32 should meet; recorded, not required)."""
    idx = check_slice(inputs, pooled)
    h, w, y = inputs.hidden[idx], inputs.weight, inputs.targets[idx]
    kw: dict = {"return_token_features": tokens}
    seqs: list[int] = []
    if pooled:
        seqs = sorted({0, inputs.num_seqs - 1})
        remap = (inputs.seq_index[idx] == seqs[-1]).long() if len(seqs) == 2 else None
        kw.update(seq_index=remap if remap is not None else torch.zeros_like(y),
                  num_seqs=len(seqs))
    h64, w64 = h.double(), w.double()
    ref = reference.sensitivity(h64, w64, y, **kw)
    fields = [f for f in SENS_FIELDS if getattr(ref, f) is not None]
    by_dtype = {}  # the reference's own error in float32 and in the input dtype
    for dt in dict.fromkeys((torch.float32, h.dtype)):
        base = reference.sensitivity(h.to(dt), w.to(dt), y, **kw)
        by_dtype[dt] = {f: max_err(getattr(base, f), getattr(ref, f)) for f in fields}
    errs_strict = dict.fromkeys(SENS_FIELDS, 0.0) | by_dtype[torch.float32]
    errs = dict(errs_strict)
    for f in fields:
        if f != "token_features":
            errs[f] = max(e[f] for e in by_dtype.values())
    w_scale = float(w.abs().max())
    tol = field_tolerances(ref, errs, w_scale)
    tol_strict = field_tolerances(ref, errs_strict, w_scale)
    if tokens and w.dtype in (torch.bfloat16, torch.float16):
        g = -torch.softmax(h64 @ w64.T, dim=-1)
        g[torch.arange(len(y), device=g.device), y] += 1.0
        bound = rounded_g_bound(g, w)
        tol["token_features"] = tol["token_features"] + bound
        tol_strict["token_features"] = tol_strict["token_features"] + bound
    return SpotReference(idx, seqs, ref, tol, tol_strict)


def _ratio(diff: torch.Tensor, tol) -> float:
    return float((diff / tol).max()) if diff.numel() else 0.0


def check_sensitivity(out: SensitivityOutput, spot: SpotReference) -> dict:
    """Compare every field ``out`` has against the float64 slice; also whether all of ``out``
    is finite. Returns {"ok", "strict_ok", "finite", "tokens", "sequences", "fields": {f:
    {max_abs_err, tol (the largest, if elementwise), ratio (worst error / tolerance),
    ratio_strict (against ``tol_strict``), rel_err, ok}}}."""
    fields, finite = {}, True
    for f in SENS_FIELDS:
        x, r = getattr(out, f), getattr(spot.ref, f)
        if x is None or r is None:
            continue
        finite = finite and bool(torch.isfinite(x).all())
        part = x[spot.seqs] if f == "seq_features" else x[spot.idx]
        if tuple(part.shape) != tuple(r.shape):
            fields[f] = {"ok": False, "ratio_strict": math.inf,
                         "error": f"shape {tuple(part.shape)}, want {tuple(r.shape)}"}
            continue
        diff = (part.double() - r).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        tol = spot.tol[f]
        ratio = _ratio(diff, tol)
        tol_max = float(tol.max()) if isinstance(tol, torch.Tensor) else tol
        scale = float(r.abs().max()) if r.numel() else 0.0
        fields[f] = {"max_abs_err": err, "tol": tol_max,
                     "elementwise_tol": isinstance(tol, torch.Tensor), "ratio": ratio,
                     "ratio_strict": _ratio(diff, spot.tol_strict[f]),
                     "rel_err": err / scale if scale > 0 else err,
                     "ok": math.isfinite(ratio) and ratio <= 1.0}
    ok = finite and bool(fields) and all(v["ok"] for v in fields.values())
    strict = ok and all(v["ratio_strict"] <= 1.0 for v in fields.values())
    return {"ok": ok, "strict_ok": strict, "finite": finite, "tokens": int(spot.idx.numel()),
            "sequences": spot.seqs, "fields": fields}


def check_novelty(out, feats: torch.Tensor, rewards: torch.Tensor) -> dict:
    """group_novelty against the float64 reference with the test suite's fixed tolerances."""
    ref = reference.group_novelty(feats.double().cpu(), rewards.double().cpu())
    fields = {}
    for f, tol in NOVELTY_TOL.items():
        x = getattr(out, f)
        err = max_err(x.cpu(), getattr(ref, f))
        fields[f] = {"max_abs_err": err, "tol": tol, "ok": math.isfinite(err) and err <= tol}
    finite = all(bool(torch.isfinite(t).all()) for t in out)
    return {"ok": finite and all(v["ok"] for v in fields.values()), "finite": finite,
            "groups": int(feats.shape[0]), "fields": fields}
