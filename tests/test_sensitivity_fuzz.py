"""Differential fuzzing of g2rl_kernels.sensitivity (hypothesis) against the float64 reference,
and against apple's cut-cross-entropy (a second, independent implementation) where it applies.

Every example is a :class:`FuzzCase`: the sizes and options plus the seed of the tensors, so a
failure prints the case and a command that replays exactly it:

    G2RL_FUZZ_REPLAY='<json>' pytest tests/test_sensitivity_fuzz.py -k replay

(add ``G2RL_FUZZ_BACKEND=triton TRITON_INTERPRET=1`` for a case of the Triton subset).

Profiles (environment variable ``G2RL_FUZZ_PROFILE``):

- ``ci`` (default): a fixed, derandomised set of examples (400 against the reference, 100
  against cut-cross-entropy) up to N = 300, V = 4099, d = 200: well under two minutes here.
- ``long``: random examples (hypothesis prints the seed of a failing run; ``G2RL_FUZZ_SEED=N``
  replays a run), up to N = 512, V = 8192, d = 256, 3000 + 1000 examples
  (``G2RL_FUZZ_EXAMPLES`` overrides the count).

The Triton kernels are fuzzed by the same strategies through the interpreter on a bounded
subset (tests/_sensitivity_interpreted_cases.py imports :func:`fuzz_cases` and
:func:`check_fuzz_case` from here).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import pytest
import torch
from _sensitivity_helpers import (
    backend_kwargs,
    check_outputs,
    to,
    tolerances,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import g2rl_kernels
from g2rl_kernels import reference

PROFILE = os.environ.get("G2RL_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"G2RL_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRIMES = (2, 3, 5, 17, 97, 257, 1009, 4099)


@dataclass(frozen=True)
class FuzzCase:
    """Everything that defines one example (the tensors come from ``seed``)."""

    n: int
    v: int
    d: int
    dtype: str
    seed: int
    temperature: float = 1.0
    temperature_kind: str = "float"  # "float", "np.float32" or "tensor"
    bias: str = "none"  # "none", "normal", "float32" (a float32 bias), "large_negative"
    logits: str = "flat"  # "flat" (std ~1), "sharp" (std ~30) or "peaked" (a few one-hot rows)
    ignore: float = 0.1  # share of ignored tokens
    ignore_index: int = -100
    weights: str = "none"  # "none", "rand" or "zeros" (rand with zeros, one all-zero sequence)
    layout: str = "sorted"  # "sorted" or "shuffled" seq_index
    seqs: int = 1  # sequences with tokens (<= n)
    empty_seqs: int = 0  # more sequence ids with no token at all
    num_seqs_kind: str = "int"  # "int", "np.int64" or "tensor"
    pooled: bool = True
    token_features: bool = True
    chunk_size: int | None = None  # CPU path options
    vocab_chunk: int | None = None
    num_splits: int | None = None  # Triton path options
    blocks: tuple[int, int, int] | None = None

    def replay_command(self, backend: str = "torch") -> str:
        env = "" if backend == "torch" else f"G2RL_FUZZ_BACKEND={backend} TRITON_INTERPRET=1 "
        return (f"{env}G2RL_FUZZ_REPLAY='{json.dumps(asdict(self))}' "
                f"pytest tests/test_sensitivity_fuzz.py -k replay")


def fuzz_inputs(case: FuzzCase) -> dict:
    """Keyword arguments of ``g2rl_kernels.sensitivity`` for a case (CPU tensors)."""
    g = torch.Generator().manual_seed(case.seed)
    n, v, d = case.n, case.v, case.d
    hidden = torch.randn(n, d, generator=g)
    std = {"flat": 1.0, "sharp": 30.0, "peaked": 1.0}[case.logits]
    weight = torch.randn(v, d, generator=g) * (std / math.sqrt(d))
    targets = torch.randint(0, v, (n,), generator=g)
    if case.logits == "peaked":
        for j, t in enumerate(torch.randperm(n, generator=g)[: min(4, n)].tolist()):
            row = (j * 7919 + 3) % v
            weight[row] = 12.0 * hidden[t] / math.sqrt(d)
            if j % 2 == 0:
                targets[t] = row
    targets[torch.rand(n, generator=g) < case.ignore] = case.ignore_index
    seqs = max(1, min(case.seqs, n))
    cuts = sorted(torch.randperm(max(n - 1, 1), generator=g)[: seqs - 1].add(1).tolist())
    seq_index = torch.zeros(n, dtype=torch.int64)
    for b, (s0, s1) in enumerate(zip([0, *cuts], [*cuts, n], strict=True)):
        seq_index[s0:s1] = b
    if seqs >= 3:  # one sequence with no counted token
        targets[seq_index == 1] = case.ignore_index
    if case.layout == "shuffled":
        seq_index = seq_index[torch.randperm(n, generator=g)]
    token_weights = None
    if case.weights != "none":
        token_weights = torch.rand(n, generator=g) * 3
        if case.weights == "zeros":
            token_weights[torch.rand(n, generator=g) < 0.3] = 0.0
            token_weights[seq_index == seqs - 1] = 0.0  # a sequence whose weights are all 0
    bias = None
    if case.bias != "none":
        bias = torch.randn(v, generator=g) * 2
        if case.bias == "large_negative":
            bias[torch.rand(v, generator=g) < 0.3] = -1e4
            bias[int(torch.randint(0, v, (1,), generator=g))] = -3e4
    dt = DTYPES[case.dtype]
    num_seqs = seqs + case.empty_seqs
    num_seqs_arg = {"int": num_seqs, "np.int64": np.int64(num_seqs),
                    "tensor": torch.tensor(num_seqs)}[case.num_seqs_kind]
    temperature = {"float": case.temperature, "np.float32": np.float32(case.temperature),
                   "tensor": torch.tensor(case.temperature)}[case.temperature_kind]
    bias_dt = torch.float32 if case.bias == "float32" else dt
    kw = dict(hidden=hidden.to(dt), weight=weight.to(dt), targets=targets,
              bias=None if bias is None else bias.to(bias_dt), temperature=temperature,
              ignore_index=case.ignore_index, return_token_features=case.token_features)
    if case.pooled:
        kw.update(seq_index=seq_index, num_seqs=num_seqs_arg, token_weights=token_weights)
    return kw


def reference_kwargs(kw: dict) -> dict:
    """The same call for the reference and the tolerance helpers: plain Python scalars."""
    out = dict(kw)
    out["temperature"] = float(kw["temperature"])
    if kw.get("num_seqs") is not None:
        out["num_seqs"] = int(kw["num_seqs"])
    return out


def _options(case: FuzzCase, backend: str) -> dict | None:
    if backend == "triton":
        opts = {"num_splits": case.num_splits} if case.num_splits else {}
        if case.blocks:
            opts["blocks"] = tuple(case.blocks)
    elif backend == "triton-chunked":
        opts = {"chunk_size": case.chunk_size} if case.chunk_size else {}
    else:
        opts = {k: getattr(case, k) for k in ("chunk_size", "vocab_chunk") if getattr(case, k)}
    return opts or None


def check_fuzz_case(case: FuzzCase, backend: str = "torch") -> None:
    """Run one case and compare every output with the float64 reference (tolerance: 4 x the
    error plain float32 PyTorch makes, plus 1e-5 x (1 + max |value|)); exact zeros where the
    definition says 0. Failures name the case and the command that replays it."""
    try:
        _check(case, backend)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{case}\nreplay: {case.replay_command(backend)}") from None


def _check(case: FuzzCase, backend: str) -> None:
    kw = fuzz_inputs(case)
    ref_kw = reference_kwargs(kw)
    ref64 = reference.sensitivity(**to(ref_kw, torch.float64))
    tol = tolerances(ref_kw, [torch.float32], ref64, rounded_g=backend.startswith("triton"))
    out = g2rl_kernels.sensitivity(**kw, **backend_kwargs(backend),
                                   _options=_options(case, backend))
    check_outputs(out, ref64, tol, f"{backend} vs float64 reference")
    ignored = kw["targets"] == case.ignore_index
    assert torch.equal(out.logprobs[ignored], torch.zeros(int(ignored.sum()))), "logprobs"
    assert torch.equal(out.entropy[ignored], torch.zeros(int(ignored.sum()))), "entropy"
    if out.token_features is not None:
        assert not out.token_features[ignored].any(), "token_features of ignored tokens"
    if out.seq_features is not None:
        a = (~ignored).double()
        if kw["token_weights"] is not None:
            a = a * kw["token_weights"].double()
        mass = torch.zeros(int(kw["num_seqs"]), dtype=torch.float64)
        mass.index_add_(0, kw["seq_index"], a)
        empty = mass == 0
        assert not out.seq_features[empty].any(), "features of sequences with no counted mass"


def fuzz_cases(max_n: int, max_v: int, max_d: int,
               dtypes: tuple[str, ...] = tuple(DTYPES)) -> st.SearchStrategy[FuzzCase]:
    """FuzzCase strategy: sizes from 1 (V also primes, d not only multiples of 16), every
    dtype and option; chunk sizes small enough that several chunks run."""

    @st.composite
    def build(draw) -> FuzzCase:
        n = draw(st.integers(1, max_n))
        v = draw(st.one_of(st.integers(1, max_v),
                           st.sampled_from([p for p in PRIMES if p <= max_v])))
        d = draw(st.integers(1, max_d))
        ignore_index = draw(st.sampled_from([-100, -1, v + 7]))
        return FuzzCase(
            n=n, v=v, d=d, dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**31)),
            temperature=draw(st.sampled_from([1.0, 0.3, 0.7, 1.6, 4.0])),
            temperature_kind=draw(st.sampled_from(["float", "np.float32", "tensor"])),
            bias=draw(st.sampled_from(["none", "normal", "float32", "large_negative"])),
            logits=draw(st.sampled_from(["flat", "sharp", "peaked"])),
            ignore=draw(st.sampled_from([0.0, 0.15, 0.5, 1.0])),
            ignore_index=ignore_index,
            weights=draw(st.sampled_from(["none", "rand", "zeros"])),
            layout=draw(st.sampled_from(["sorted", "shuffled"])),
            seqs=draw(st.integers(1, max(1, min(n, 40)))),
            empty_seqs=draw(st.integers(0, 2)),
            num_seqs_kind=draw(st.sampled_from(["int", "np.int64", "tensor"])),
            pooled=draw(st.booleans()) or draw(st.booleans()),  # mostly pooled
            token_features=draw(st.booleans()),
            chunk_size=draw(st.one_of(st.none(), st.integers(1, max(1, n)))),
            vocab_chunk=draw(st.one_of(st.none(), st.integers(1, max(1, v)))),
            num_splits=draw(st.one_of(st.none(), st.integers(1, 4))),
            blocks=draw(st.sampled_from([None, (16, 64, 16), (32, 128, 32)])),
        )

    return build()


def fuzz_settings(examples: int, long_examples: int) -> settings:
    """ci: derandomised (the same examples every run); long: random, printed seed."""
    count = int(os.environ.get("G2RL_FUZZ_EXAMPLES", long_examples if LONG else examples))
    return settings(max_examples=count, deadline=None, derandomize=not LONG, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def maybe_seed(test):
    value = os.environ.get("G2RL_FUZZ_SEED")
    return seed(int(value))(test) if value else test


CPU_SIZES = (512, 8192, 256) if LONG else (300, 4099, 200)


@maybe_seed
@fuzz_settings(examples=400, long_examples=3000)
@given(case=fuzz_cases(*CPU_SIZES))
def test_fuzz_cpu_against_float64(case):
    check_fuzz_case(case, backend="torch")


@pytest.mark.skipif("G2RL_FUZZ_REPLAY" not in os.environ,
                    reason="set G2RL_FUZZ_REPLAY to a case printed by a failing fuzz test")
def test_fuzz_replay():
    fields = json.loads(os.environ["G2RL_FUZZ_REPLAY"])
    if fields.get("blocks"):
        fields["blocks"] = tuple(fields["blocks"])
    case = FuzzCase(**fields)
    backend = os.environ.get("G2RL_FUZZ_BACKEND", "torch")  # "triton" needs TRITON_INTERPRET=1
    check_fuzz_case(case, backend=backend)


def test_fuzz_case_is_reproducible():
    """The same case gives the same tensors (what a printed case is worth)."""
    case = FuzzCase(n=30, v=97, d=20, dtype="bfloat16", seed=5, bias="large_negative",
                    weights="zeros", layout="shuffled", seqs=4, logits="peaked")
    a, b = fuzz_inputs(case), fuzz_inputs(case)
    for k, x in a.items():
        assert torch.equal(x, b[k]) if isinstance(x, torch.Tensor) else x == b[k], k


def test_fuzz_checker_has_teeth(monkeypatch):
    """check_fuzz_case fails on a slightly wrong result and prints the replay command."""
    case = FuzzCase(n=20, v=50, d=8, dtype="float32", seed=3, seqs=3)
    check_fuzz_case(case)
    original = g2rl_kernels.sensitivity

    def off_by_a_bit(*args, **kwargs):
        out = original(*args, **kwargs)
        out.lse.add_(1e-3)
        return out

    monkeypatch.setattr(g2rl_kernels, "sensitivity", off_by_a_bit)
    with pytest.raises(AssertionError, match=r"lse: max abs error(.|\n)*G2RL_FUZZ_REPLAY="):
        check_fuzz_case(case)


# --- a second oracle: apple's cut-cross-entropy (its CPU implementation, torch.compile) ---


def _cce():
    """cut_cross_entropy.linear_cross_entropy, or a skip saying why it cannot run here."""
    cce = pytest.importorskip(
        "cut_cross_entropy", reason="cut-cross-entropy is not installed (pip install -e '.[test]')"
    )
    try:  # its CPU path is torch.compile (inductor needs a C++ compiler)
        e = torch.randn(3, 4, requires_grad=True)
        cce.linear_cross_entropy(e, torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                 reduction="none", impl="torch_compile").sum().backward()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cut-cross-entropy's CPU implementation (torch.compile) does not run "
                    f"here: {type(exc).__name__}: {exc}")
    return cce.linear_cross_entropy


@pytest.fixture(scope="module")
def cce_loss():
    return _cce()


def check_against_cce(case: FuzzCase, linear_cross_entropy) -> None:
    """-CE of cut-cross-entropy is our logprob, and its gradient with respect to the hidden
    states is minus our token feature. Bias and temperature are folded in by augmenting:
    e = [h / T, 1], c = [W, b / T], so e c^T = (W h + b) / T (float32 copies of the inputs)."""
    kw = fuzz_inputs(case)
    ref_kw = reference_kwargs(kw)
    t = ref_kw["temperature"]
    h, w = kw["hidden"].float(), kw["weight"].float()
    bias = kw["bias"].float() if kw["bias"] is not None else torch.zeros(case.v)
    e = torch.cat([h / t, torch.ones(case.n, 1)], 1).requires_grad_(True)
    c = torch.cat([w, (bias / t)[:, None]], 1)
    targets = kw["targets"]
    loss = linear_cross_entropy(e, c, targets, ignore_index=case.ignore_index, reduction="none",
                                impl="torch_compile")
    (grad,) = torch.autograd.grad(loss.sum(), e)
    ours = g2rl_kernels.sensitivity(**kw)
    ref64 = reference.sensitivity(**to(ref_kw, torch.float64))
    tol = tolerances(ref_kw, [torch.float32], ref64)
    peer = ours._replace(logprobs=-loss.detach(), token_features=-grad[:, : case.d])
    counted = targets != case.ignore_index
    what = f"{case}\nreplay: {case.replay_command()}"
    for name, got in (("cut-cross-entropy", peer), ("g2rl", ours)):
        for f in ("logprobs", "token_features"):
            x, r = getattr(got, f)[counted], getattr(ref64, f)[counted]
            err = float((x.double() - r).abs().max()) if x.numel() else 0.0
            assert err <= tol[f], f"{name} {f} vs float64: {err:.3g} > {tol[f]:.3g}\n{what}"
    for f in ("logprobs", "token_features"):  # the two implementations agree with each other
        err = float((getattr(ours, f) - getattr(peer, f))[counted].abs().max())
        assert err <= 2 * tol[f], f"g2rl vs cut-cross-entropy {f}: {err:.3g}\n{what}"


@st.composite
def _cce_cases(draw) -> FuzzCase:
    base = draw(fuzz_cases(*((512, 8192, 256) if LONG else (300, 4099, 200))))
    # at least two counted tokens and sizes >= 2 (torch.compile specialises sizes 0 and 1,
    # every such shape would compile again); float32 copies are what both sides compute on
    return replace(base, n=max(base.n, 4), v=max(base.v, 2), ignore=min(base.ignore, 0.15),
                   ignore_index=-100, pooled=False, token_features=True, chunk_size=None,
                   vocab_chunk=None)


@maybe_seed
@fuzz_settings(examples=100, long_examples=1000)
@given(case=_cce_cases())
def test_fuzz_against_cut_cross_entropy(cce_loss, case):
    counted = int((fuzz_inputs(case)["targets"] != -100).sum())
    if counted < 2:
        return  # nothing to compare (and a size torch.compile would specialise on)
    check_against_cce(case, cce_loss)
