"""Shared by the sensitivity tests (CPU path, interpreted Triton, CUDA): random inputs, an
autograd oracle independent of the package, dtype-aware tolerances and NaN-poisoned outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import g2rl_kernels
from g2rl_kernels import _gpu_bench, reference
from g2rl_kernels.sensitivity import SensitivityOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIELDS = SensitivityOutput._fields


@dataclass(frozen=True)
class Case:
    n: int
    v: int
    d: int
    dtype: str = "float32"
    seed: int = 0
    temperature: float = 1.0
    bias: bool = False
    weights: bool = False
    peaked: bool = False
    ignore: float = 0.15  # share of ignored tokens (besides the all-ignored sequence)
    layout: str = "sorted"  # "sorted": contiguous sequences; "random": shuffled seq_index
    ignore_index: int = -100
    token_features: bool = True
    pooled: bool = True
    options: tuple = ()  # _options items (chunk_size, vocab_chunk, num_splits, blocks)
    logit_std: float | None = None  # scale W so that the logits' std is about this (sharp)

    @property
    def id(self) -> str:
        flags = [f"T{self.temperature}"] if self.temperature != 1.0 else []
        flags += [name for name in ("bias", "weights", "peaked") if getattr(self, name)]
        flags += [f"std{self.logit_std:g}"] if self.logit_std is not None else []
        flags += [] if self.layout == "sorted" else [self.layout]
        flags += [f"{k}{v}" for k, v in self.options]
        flags += [] if self.pooled else ["nopool"]
        flags += [] if self.token_features else ["notok"]
        return "-".join([f"N{self.n}", f"V{self.v}", f"d{self.d}", self.dtype, *flags])


def cycle_case(i: int, n: int, v: int, d: int, dtype: str, **kw) -> Case:
    """The i-th case of a sweep: the optional features rotate with i so every one is covered."""
    return Case(
        n=n, v=v, d=d, dtype=dtype, seed=1000 + i,
        temperature=(1.0, 0.7, 1.3)[i % 3], bias=i % 2 == 1, weights=i % 4 in (1, 2),
        peaked=i % 5 in (0, 3), layout="random" if i % 7 == 3 else "sorted",
        ignore_index=-100 if i % 6 else -1, **kw,
    )


def backend_kwargs(backend: str) -> dict:
    """Keyword arguments of ``g2rl_kernels.sensitivity`` for a test backend name: "torch",
    "auto", "triton" (the fused Triton path) or "triton-chunked" (the chunked Triton path)."""
    if backend == "triton":
        return dict(_backend="triton", impl="fused")
    if backend == "triton-chunked":
        return dict(_backend="triton", impl="chunked")
    return dict(_backend=backend)


def make_inputs(case: Case) -> dict:
    """CPU inputs of a case: hidden/weight already rounded to the case dtype.

    Sequences: seq 0 has one token, the last used sequence has all its tokens ignored, and one
    more sequence id has no token at all (num_seqs = used + 1).
    """
    g = torch.Generator().manual_seed(case.seed)
    n, v, d = case.n, case.v, case.d
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * ((case.logit_std or 2.0) / math.sqrt(d))
    targets = torch.randint(0, v, (n,), generator=g)
    if case.peaked and n:
        # rows of W a large multiple of some h: logit ~ 12 sqrt(d) for that token
        for j, t in enumerate(torch.randperm(n, generator=g)[: min(3, n, v)].tolist()):
            row = (j * 7919) % v
            weight[row] = 12.0 * hidden[t] / math.sqrt(d)
            if j % 2 == 0:
                targets[t] = row  # the peaked token is the target (logprob ~ 0)
    targets[torch.rand(n, generator=g) < case.ignore] = case.ignore_index
    # sequences
    if n >= 3:
        cuts = sorted(torch.randperm(n - 2, generator=g)[: max(1, n // 9)].add(2).tolist())
        bounds = [0, 1, *cuts, n]
        seq_index = torch.zeros(n, dtype=torch.int64)
        for b, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seq_index[s0:s1] = b
        used = len(bounds) - 1
        targets[seq_index == used - 1] = case.ignore_index  # an all-ignored sequence
    else:
        seq_index = torch.arange(n)
        used = n
    if case.layout == "random":
        perm = torch.randperm(n, generator=g)
        seq_index = seq_index[perm]
        targets = targets[perm]
    token_weights = None
    if case.weights:
        token_weights = torch.rand(n, generator=g) * 2
        token_weights[torch.rand(n, generator=g) < 0.2] = 0.0
    bias = torch.randn(v, generator=g) if case.bias else None
    dt = DTYPES[case.dtype]
    return dict(
        hidden=hidden.to(dt), weight=weight.to(dt), targets=targets, seq_index=seq_index,
        num_seqs=used + 1, token_weights=token_weights,
        bias=None if bias is None else bias.to(dt), temperature=case.temperature,
        ignore_index=case.ignore_index,
    )


def call_kwargs(inputs: dict, case: Case) -> dict:
    kw = dict(inputs)
    if not case.pooled:
        kw.update(seq_index=None, num_seqs=None, token_weights=None)
    kw["return_token_features"] = case.token_features
    return kw


def to(inputs: dict, dtype: torch.dtype | None = None, device=None) -> dict:
    """Float tensors to dtype (if given) and every tensor to device (if given)."""
    out = {}
    for k, x in inputs.items():
        if isinstance(x, torch.Tensor):
            if dtype is not None and x.dtype.is_floating_point and k != "token_weights":
                x = x.to(dtype)
            if device is not None:
                x = x.to(device)
        out[k] = x
    return out


def oracle(kw: dict) -> SensitivityOutput:
    """float64 outputs from autograd and torch.distributions, independent of g2rl_kernels.

    phi_t = -T d/dh_t sum_t CE((W h_t + b) / T, y_t)  (the 1/T of the gradient dropped).
    """
    h = kw["hidden"].double().requires_grad_(True)
    w = kw["weight"].double()
    t = kw["temperature"]
    y = kw["targets"]
    ii = kw["ignore_index"]
    logits = h @ w.T
    if kw.get("bias") is not None:
        logits = logits + kw["bias"].double()
    logits = logits / t
    counted = y != ii
    ce = F.cross_entropy(logits, y, ignore_index=ii, reduction="none")
    (grad,) = torch.autograd.grad(ce.sum(), h) if h.shape[0] else (torch.zeros_like(h),)
    with torch.no_grad():
        phi = -t * grad
        ent = torch.distributions.Categorical(logits=logits).entropy()
        out = dict(
            logprobs=-ce, entropy=torch.where(counted, ent, 0.0),
            lse=torch.logsumexp(logits, -1), seq_features=None,
            token_features=phi if kw.get("return_token_features") else None,
        )
        if kw.get("seq_index") is not None:
            seq, s = kw["seq_index"], kw["num_seqs"]
            a = torch.ones(len(y), dtype=torch.float64)
            if kw.get("token_weights") is not None:
                a = kw["token_weights"].double()
            a = a * counted
            feats = torch.zeros(s, h.shape[1], dtype=torch.float64)
            for b in range(s):
                sel = seq == b
                feats[b] = (a[sel, None] * phi[sel]).sum(0) / (a[sel].sum() + 1e-8)
            out["seq_features"] = feats
    return SensitivityOutput(**{f: out[f] for f in FIELDS})


def max_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if x is None or ref is None:
        return 0.0
    if x.numel() == 0:
        return 0.0
    return float((x.double().cpu() - ref.double().cpu()).abs().max())


def tolerances(kw: dict, dtypes: list[torch.dtype], ref64: SensitivityOutput,
               rounded_g: bool = False) -> dict:
    """Per field: 4 x the worst error plain PyTorch (the reference) makes in the given dtypes
    against float64 on the same inputs, plus a floor of 1e-5 x (1 + max |value|) (for the
    features: 1e-5 x (1 + max(|value|, |W|))).

    rounded_g (the Triton paths with a 16-bit W: g_t = e(y_t) - p_t is rounded to W's dtype for
    the tensor-core product g @ W): the token features' tolerance is then elementwise, the
    float32 one plus the bound of that rounding (:func:`rounded_g_bound`), never the error of
    the reference in the 16-bit dtype (which subtracts p_y W[y] from W[y] in 16 bits and is
    wrong by up to 100% when p_y -> 1).
    """
    errs = {f: 0.0 for f in FIELDS}
    for dt in dtypes:
        base = reference.sensitivity(**to(kw, dt))
        for f in FIELDS:
            if rounded_g and f == "token_features" and dt != torch.float32:
                continue
            errs[f] = max(errs[f], max_err(getattr(base, f), getattr(ref64, f)))
    w = kw.get("weight")
    w_scale = float(w.abs().max()) if isinstance(w, torch.Tensor) and w.numel() else 0.0
    tol = _gpu_bench.field_tolerances(ref64, errs, w_scale)
    w16 = isinstance(w, torch.Tensor) and w.dtype in (torch.bfloat16, torch.float16)
    if rounded_g and w16 and ref64.token_features is not None:
        tol["token_features"] = tol["token_features"] + rounded_g_bound(kw)
    return tol


def rounded_g_bound(kw: dict) -> torch.Tensor:
    """(N, d) float64 bound of the error of rounding g_t = e(y_t) - p_t (0 for ignored tokens)
    to nearest in W's dtype before the product with W (``_gpu_bench.rounded_g_bound``, the
    bound gpu_check uses too) for the inputs of a ``sensitivity`` call."""
    h, w = kw["hidden"].double(), kw["weight"].double()
    logits = h @ w.T
    if kw.get("bias") is not None:
        logits = logits + kw["bias"].double()
    p = torch.softmax(logits / kw["temperature"], dim=-1)
    counted = kw["targets"] != kw["ignore_index"]
    g = -p
    rows = torch.nonzero(counted).flatten()
    g[rows, kw["targets"][rows].long()] += 1.0
    g[~counted] = 0.0
    return _gpu_bench.rounded_g_bound(g, kw["weight"])


def poisoned(kw: dict, device) -> SensitivityOutput:
    """NaN-filled float32 output buffers, for the ``_out`` hook."""
    n, d = kw["hidden"].shape
    nan = dict(fill_value=math.nan, dtype=torch.float32, device=device)
    s = kw.get("num_seqs")
    return SensitivityOutput(
        torch.full((n,), **nan), torch.full((n,), **nan), torch.full((n,), **nan),
        torch.full((s, d), **nan) if kw.get("seq_index") is not None else None,
        torch.full((n, d), **nan) if kw.get("return_token_features") else None,
    )


def check_outputs(out: SensitivityOutput, expected: SensitivityOutput, tol: dict,
                  what: str = "") -> None:
    """Every requested output present, float32, finite, and within tol of expected."""
    problems = []
    for f in FIELDS:
        x, r = getattr(out, f), getattr(expected, f)
        if (x is None) != (r is None):
            problems.append(f"{f}: got {'None' if x is None else 'a tensor'}, expected "
                            f"{'None' if r is None else 'a tensor'}")
            continue
        if x is None:
            continue
        if x.dtype != torch.float32 or tuple(x.shape) != tuple(r.shape):
            problems.append(f"{f}: got {x.dtype} {tuple(x.shape)}, expected float32 "
                            f"{tuple(r.shape)}")
            continue
        if not bool(torch.isfinite(x).all()):
            problems.append(f"{f}: {int((~torch.isfinite(x)).sum())} non-finite elements")
            continue
        err = max_err(x, r)
        t = tol[f]
        if isinstance(t, torch.Tensor):  # elementwise tolerance
            ratio = float(((x.double().cpu() - r.double().cpu()).abs() / t).max())
            if not ratio <= 1.0:
                problems.append(f"{f}: max abs error {err:.3g}, {ratio:.3g} x its elementwise "
                                f"tolerance")
        elif not err <= t:
            problems.append(f"{f}: max abs error {err:.3g} > tolerance {t:.3g}")
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(problems))


def run_and_check(case: Case, backend: str, device="cpu", strict: bool = True) -> None:
    """Run one case through ``g2rl_kernels.sensitivity`` with poisoned outputs and check it
    against the float64 reference and the autograd oracle.

    strict: tolerances from the float32 error of plain PyTorch (right for the CPU path and the
    interpreter, which compute on float32 copies of the inputs); otherwise from the error in
    the case's own dtype as well (GPU tensor-core dots on 16-bit inputs).
    """
    inputs = make_inputs(case)
    kw = call_kwargs(inputs, case)
    ref64 = reference.sensitivity(**to(kw, torch.float64))
    orc = oracle(kw)
    dtypes = [torch.float32] if strict else [torch.float32, DTYPES[case.dtype]]
    tol = tolerances(kw, dtypes, ref64,
                     rounded_g=backend.startswith("triton") or str(device) != "cpu")
    # the reference itself agrees with the independent oracle
    for f in FIELDS:
        r, o = getattr(ref64, f), getattr(orc, f)
        if r is not None and r.numel():
            assert max_err(r, o) <= 1e-9 * (1 + float(o.abs().max())), f"reference {f}"
    dev_kw = to(kw, device=device)
    buffers = poisoned(kw, device)
    out = g2rl_kernels.sensitivity(
        **dev_kw, **backend_kwargs(backend), _out=buffers,
        _options=dict(case.options) or None
    )
    for f in FIELDS:  # written into the poisoned buffers, not elsewhere
        if getattr(buffers, f) is not None and getattr(out, f) is not None:
            assert getattr(out, f).data_ptr() == getattr(buffers, f).data_ptr(), f
    out = SensitivityOutput(*(None if x is None else x.cpu() for x in out))
    check_outputs(out, ref64, tol, f"{case.id} vs float64 reference")
    check_outputs(out, orc, tol, f"{case.id} vs autograd oracle")


def with_options(case: Case, **options) -> Case:
    return replace(case, options=tuple(sorted(options.items())))


# Cases run through the Triton interpreter (slow: moderate sizes, few cases); every V, d and N
# of the issue appears, with every dtype and feature.
INTERPRETED_CASES = [
    cycle_case(0, 257, 4099, 130, "float32"),
    cycle_case(1, 33, 1000, 64, "float32"),
    cycle_case(2, 1, 17, 16, "float32"),
    cycle_case(3, 257, 1, 40, "float32"),
    cycle_case(4, 33, 4099, 40, "bfloat16"),
    cycle_case(5, 257, 1000, 130, "float16"),
    cycle_case(6, 33, 17, 130, "bfloat16"),
    cycle_case(7, 1, 4099, 64, "float16"),
    cycle_case(8, 257, 17, 64, "bfloat16", token_features=False),
    cycle_case(9, 33, 1, 16, "float16"),
    cycle_case(10, 33, 1000, 16, "float32", pooled=False),
    with_options(cycle_case(11, 257, 4099, 40, "float32"), num_splits=3),
    with_options(cycle_case(12, 33, 1000, 40, "bfloat16"), blocks=(16, 64, 16)),
    with_options(cycle_case(13, 257, 1000, 40, "float32"), blocks=(32, 64, 16), num_splits=4),
    replace(cycle_case(14, 257, 1000, 64, "float32"), layout="random", peaked=True),
    replace(cycle_case(15, 33, 4099, 130, "float16"), peaked=True, weights=True, bias=True),
    replace(cycle_case(16, 257, 17, 40, "float32"), temperature=0.7, peaked=True),
    replace(cycle_case(17, 33, 1000, 40, "float32"), temperature=1.3, bias=True),
]

def _chunked(case: Case, i: int) -> Case:
    """A case for the chunked Triton path: several chunks, small blocks every third case."""
    options = {"chunk_size": max(1, case.n // 3 + i % 5)}
    if i % 3 == 1:
        options["blocks"] = (("grad", (16, 64)), ("stats", (16, 64)))
    return replace(case, options=tuple(sorted(options.items())))


INTERPRETED_CHUNKED_CASES = [_chunked(c, i) for i, c in enumerate(INTERPRETED_CASES)
                             if not c.options]
INTERPRETED_CHUNKED_CONTAINMENT = [
    (torch.float32, {}),
    (torch.bfloat16, {"chunk_size": 7}),
    (torch.float32, {"shuffled": True, "seqs": 40, "chunk_size": 16}),
]

# issue 12 on the Triton path (interpreted): containment settings and sharp-logit cases
INTERPRETED_CONTAINMENT = [
    (torch.float32, {}),
    (torch.bfloat16, {"blocks": (16, 64, 16)}),
    (torch.float32, {"shuffled": True, "seqs": 40, "num_splits": 2}),
]
INTERPRETED_SHARP_CASES = [
    replace(cycle_case(20, 65, 1000, 40, "float32"), logit_std=30.0, weights=True),
    replace(cycle_case(21, 33, 517, 24, "bfloat16"), logit_std=100.0, temperature=0.7),
]


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation torch makes while fn() runs (the profiler's
    memory events; the Triton interpreter's own numpy buffers are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.self_cpu_memory_usage for e in prof.events()] + [0])


def peak_live_bytes(fn) -> int:
    """Peak of the bytes torch holds allocated on the CPU while fn() runs, above what was held
    before: the profiler's net allocation of each op (its own, without its children's) and its
    free events outside ops, in time order (a buffer allocated and freed inside one op is not
    seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


# --- bad values: containment with check_values=False (the same rule on every backend) ---

BAD_VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def containment_inputs(n: int = 70, v: int = 300, d: int = 24, seqs: int = 9,
                       shuffled: bool = False, seed: int = 21) -> dict:
    """Clean inputs and the three tokens that get a bad hidden state in the containment tests:
    ``counted`` (weight > 0, sequence ``bad_seq``), ``ignored`` (target ignore_index) and
    ``zero_weight`` (counted, token weight 0), each in a different sequence."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    targets = torch.randint(0, v, (n,), generator=g)
    seq_index = torch.arange(n) * seqs // n
    if shuffled:
        seq_index = seq_index[torch.randperm(n, generator=g)]
    token_weights = torch.rand(n, generator=g) + 0.5
    order = torch.argsort(seq_index, stable=True).tolist()  # tokens grouped by sequence
    counted, ignored, zero_weight = order[3], order[n // 3], order[2 * n // 3]
    assert len({int(seq_index[t]) for t in (counted, ignored, zero_weight)}) == 3
    targets[ignored] = -100
    token_weights[zero_weight] = 0.0
    kw = dict(hidden=hidden, weight=weight, targets=targets, seq_index=seq_index, num_seqs=seqs,
              token_weights=token_weights, bias=torch.randn(v, generator=g),
              temperature=0.9, ignore_index=-100, return_token_features=True)
    bad = dict(counted=counted, ignored=ignored, zero_weight=zero_weight)
    return dict(kw=kw, bad=bad)


def check_containment(backend: str, value: str, dtype: torch.dtype = torch.float32,
                      **options) -> None:
    """A non-finite element in three tokens' hidden states, check_values=False: only those
    tokens' outputs and the feature of the sequence of the counted one are non-finite; every
    other output equals the clean run's."""
    spec = containment_inputs(shuffled=options.pop("shuffled", False),
                              seqs=options.pop("seqs", 9))
    kw, bad = to(spec["kw"], dtype), spec["bad"]
    kw["token_weights"] = spec["kw"]["token_weights"]
    run = dict(**backend_kwargs(backend), _options=options or None)
    clean = g2rl_kernels.sensitivity(**kw, **run)
    broken = dict(kw)
    broken["hidden"] = kw["hidden"].clone()
    for j, t in enumerate(bad.values()):
        broken["hidden"][t, (5 + 7 * j) % kw["hidden"].shape[1]] = BAD_VALUES[value]
    out = g2rl_kernels.sensitivity(**broken, **run, check_values=False)
    n = kw["hidden"].shape[0]
    rows = [t for t in range(n) if t not in bad.values()]
    bad_seq = int(kw["seq_index"][bad["counted"]])
    finite = [b for b in range(kw["num_seqs"]) if b != bad_seq]
    what = f"{backend} {dtype} {value} {options}"
    for f in ("logprobs", "entropy", "lse", "token_features"):
        torch.testing.assert_close(getattr(out, f)[rows], getattr(clean, f)[rows], rtol=1e-6,
                                   atol=1e-6, msg=lambda m, f=f: f"{what} {f}: {m}")
    torch.testing.assert_close(out.seq_features[finite], clean.seq_features[finite], rtol=1e-5,
                               atol=1e-6, msg=lambda m: f"{what} seq_features: {m}")
    c, i, z = bad["counted"], bad["ignored"], bad["zero_weight"]
    for t in (c, z):  # counted tokens: every per-token output is non-finite
        for f in ("logprobs", "entropy", "lse"):
            assert not torch.isfinite(getattr(out, f)[t]), (what, f, t)
        assert not torch.isfinite(out.token_features[t]).any(), (what, t)
    # the ignored token: logprob, entropy and token feature are 0 by definition; lse is its own
    assert out.logprobs[i] == 0 and out.entropy[i] == 0, what
    assert torch.equal(out.token_features[i], torch.zeros_like(out.token_features[i])), what
    assert not torch.isfinite(out.lse[i]), what
    assert torch.isnan(out.seq_features[bad_seq]).all(), what


def check_weight_containment(backend: str, **options) -> None:
    """A NaN token weight (check_values=False) makes its own sequence's feature NaN, nothing
    else: the per-token outputs do not depend on token weights at all."""
    spec = containment_inputs()
    kw = spec["kw"]
    run = dict(**backend_kwargs(backend), _options=options or None)
    clean = g2rl_kernels.sensitivity(**kw, **run)
    t = spec["bad"]["counted"]
    broken = dict(kw, token_weights=kw["token_weights"].clone())
    broken["token_weights"][t] = math.nan
    out = g2rl_kernels.sensitivity(**broken, **run, check_values=False)
    b = int(kw["seq_index"][t])
    others = [s for s in range(kw["num_seqs"]) if s != b]
    for f in ("logprobs", "entropy", "lse", "token_features"):
        torch.testing.assert_close(getattr(out, f), getattr(clean, f), rtol=0, atol=0)
    torch.testing.assert_close(out.seq_features[others], clean.seq_features[others], rtol=1e-5,
                               atol=1e-6)
    assert torch.isnan(out.seq_features[b]).all(), backend


class ExpArguments(torch.overrides.TorchFunctionMode):
    """Records the smallest argument of every torch.exp / Tensor.exp(_) call while active."""

    def __init__(self):
        super().__init__()
        self.smallest: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.exp, torch.Tensor.exp, torch.Tensor.exp_) and args[0].numel():
            self.smallest.append(float(args[0].min()))
        return func(*args, **(kwargs or {}))


def check_masked_bias(backend: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      **options) -> None:
    """A bias of -inf masks vocabulary entries (issue 9): whole V tiles, whole V splits and
    whole chunk tiles of -inf logits, and targets on masked entries (logprob -inf, every other
    output finite), against the float64 reference."""
    g = torch.Generator().manual_seed(11)
    n, v, d = 50, 700, 32
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.4).to(dtype)
    bias = torch.randn(v, generator=g)
    bias[:300] = -math.inf  # the first tiles (and V splits) hold nothing else
    bias[400::5] = -math.inf
    y = torch.randint(300, v, (n,), generator=g)
    y[y % 5 == 0] += 1  # no target on a masked entry, except these two:
    y[3], y[7], y[8] = 10, 405, -100
    kw = dict(hidden=h, weight=w, targets=y, seq_index=torch.arange(n) // 10, num_seqs=5,
              bias=bias.to(dtype), temperature=0.8, ignore_index=-100,
              return_token_features=True)
    out = g2rl_kernels.sensitivity(**to(kw, device=device), **backend_kwargs(backend),
                                   _options=options or None)
    out = SensitivityOutput(*(None if x is None else x.cpu() for x in out))
    ref64 = reference.sensitivity(**to(kw, torch.float64))
    masked = torch.zeros(n, dtype=torch.bool)
    masked[[3, 7]] = True
    assert torch.equal(ref64.logprobs[masked], torch.full((2,), -math.inf, dtype=torch.float64))
    assert torch.equal(out.logprobs[masked], torch.full((2,), -math.inf)), out.logprobs[masked]
    # compare everything else (the masked targets' logprobs replaced by 0 on both sides)
    out = out._replace(logprobs=torch.where(masked, 0.0, out.logprobs))
    ref64 = ref64._replace(logprobs=torch.where(masked, 0.0, ref64.logprobs))
    tol_kw = dict(kw, targets=torch.where(masked, 301, y))  # same sizes, no -inf logprob
    tol = tolerances(tol_kw, [torch.float32], reference.sensitivity(**to(tol_kw, torch.float64)),
                     rounded_g=backend.startswith("triton"))
    check_outputs(out, ref64, tol, f"{backend} {dtype} {options}: -inf bias entries")


def confident_inputs(dtype: torch.dtype, p_target: float, seed: int = 0, v: int = 300,
                     shared_direction: float = 0.0):
    """(hidden (20, 64), weight (v, 64), targets (20,)) of ``dtype`` where token 0's target
    has probability about p_target (p_y -> 1: the cancellation case of the token features).
    ``shared_direction``: every row of W gets this multiple of one common unit vector (LM-head
    rows share a mean direction: the probability tail sum_v p_v W[v] then does not cancel)."""
    g = torch.Generator().manual_seed(seed)
    n, d = 20, 64
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2 / math.sqrt(d))
    if shared_direction:
        common = torch.randn(d, generator=g)
        w += shared_direction * common / common.norm()
    y = torch.randint(0, v, (n,), generator=g)
    u = h[0] / h[0].norm()
    lo, hi = 0.0, 400.0
    for _ in range(60):  # bisect the scale of W[y_0] along h_0
        mid = (lo + hi) / 2
        w[y[0]] = u * mid
        p = torch.softmax((h[0].double() @ w.double().T), 0)[y[0]]
        lo, hi = (mid, hi) if p < p_target else (lo, mid)
    return h.to(dtype), w.to(dtype), y
