"""g2rl_kernels.sensitivity under real-world input (issue 12), CPU path: non-finite values
(contained with check_values=False, named with check_values=True), 16-bit inputs without a
float32 copy of W, confident (sharp) logits off torch.exp's denormal slow path, NumPy and 0-d
tensor scalars, and the argument rules that are the same on every backend. The Triton path runs
the same containment checks in _sensitivity_interpreted_cases.py."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from _sensitivity_helpers import (
    BAD_VALUES,
    FIELDS,
    Case,
    ExpArguments,
    check_containment,
    check_masked_bias,
    check_weight_containment,
    confident_inputs,
    containment_inputs,
    largest_allocation,
    run_and_check,
    with_options,
)

import g2rl_kernels
from g2rl_kernels import reference
from g2rl_kernels.ops.sensitivity_torch import CHUNK_BYTES, EXP_FLOOR, VOCAB_CHUNK_BYTES

# --- 1. non-finite values ---


@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "options",
    [{}, {"chunk_size": 16}, {"chunk_size": 7, "vocab_chunk": 64},
     {"chunk_size": 70, "shuffled": True, "seqs": 40}],  # > 32 sequences per chunk
    ids=["default", "chunk16", "chunk7-vocab64", "many-seqs"],
)
def test_non_finite_hidden_stays_in_its_token_and_sequence(value, dtype, options):
    check_containment("torch", value, dtype, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, {"chunk_size": 16, "vocab_chunk": 64}],
                         ids=["default", "chunk16-vocab64"])
def test_minus_inf_bias_masks_vocabulary_entries(dtype, options):
    check_masked_bias("torch", dtype, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p_target", [0.9, 0.999, 0.99999, 0.999999])
def test_token_features_of_confident_tokens(dtype, p_target):
    """phi = W[y] - p @ W cancels in float32 when p_y -> 1 (12% error at 1 - p_y = 1e-6); it is
    computed as (s_o W[y] - e_o @ W) / s with the target column left out of e_o (issue 9)."""
    h, w, y = confident_inputs(dtype, p_target)
    out = g2rl_kernels.sensitivity(h, w, y, return_token_features=True, _backend="torch")
    ref = reference.sensitivity(h.double(), w.double(), y, return_token_features=True)
    rel = (out.token_features.double() - ref.token_features).norm(dim=1) / \
        ref.token_features.norm(dim=1)
    assert float(rel.max()) < 1e-4, rel


@pytest.mark.parametrize("options", [{}, {"chunk_size": 70}])
def test_nan_token_weight_stays_in_its_sequence(options):
    check_weight_containment("torch", **options)


def _broken(where: str, value: float = math.nan) -> dict:
    spec = containment_inputs()
    kw, bad = dict(spec["kw"]), spec["bad"]
    if where == "hidden":
        kw["hidden"] = kw["hidden"].clone()
        kw["hidden"][bad["counted"], 5] = value
        kw["hidden"][bad["zero_weight"], 2] = value  # a later bad row: not the one named
    elif where == "weight":
        kw["weight"] = kw["weight"].clone()
        kw["weight"][123, 4] = value
        kw["weight"][200, 0] = value
    elif where == "bias":
        kw["bias"] = kw["bias"].clone()
        kw["bias"][77] = value
    return dict(kw=kw, bad=bad)


@pytest.mark.parametrize("impl", [g2rl_kernels.sensitivity, reference.sensitivity],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("value, name", [(math.nan, "NaN"), (math.inf, r"\+inf"),
                                         (-math.inf, "-inf")])
def test_check_values_names_the_first_bad_hidden_row(impl, value, name):
    spec = _broken("hidden", value)
    t = spec["bad"]["counted"]
    seq = int(spec["kw"]["seq_index"][t])
    kw = spec["kw"]
    with pytest.raises(ValueError, match=(
            rf"hidden\[{t}\] \(token {t}, sequence {seq}, target \d+\) is not finite: "
            rf"{name} at column 5; 2 counted token\(s\)")):
        impl(**kw)


def test_check_values_names_the_first_bad_weight_row_and_bias_entry():
    with pytest.raises(ValueError, match=r"weight\[123\] \(vocabulary row 123\) is not finite: "
                                         r"NaN at column 4"):
        g2rl_kernels.sensitivity(**_broken("weight")["kw"])
    for value, name in ((math.nan, "nan"), (math.inf, "inf")):
        with pytest.raises(ValueError, match=rf"bias\[77\] \(vocabulary entry 77\) is {name}; "
                                             r"every token's outputs would be non-finite"):
            g2rl_kernels.sensitivity(**_broken("bias", value)["kw"])
    # -inf masks an entry (issue 9); -inf everywhere leaves no distribution
    kw = _broken("bias", -math.inf)["kw"]
    g2rl_kernels.sensitivity(**kw)
    with pytest.raises(ValueError, match=r"bias is -inf at every one of its 300 entries"):
        g2rl_kernels.sensitivity(**dict(kw, bias=torch.full_like(kw["bias"], -math.inf)))
    # the first bad row is found past the first scan block too
    kw = _broken("weight")["kw"]
    big = torch.zeros(9000, kw["weight"].shape[1])
    big[8500, 3] = math.inf
    with pytest.raises(ValueError, match=r"weight\[8500\] .*\+inf at column 3"):
        g2rl_kernels.sensitivity(kw["hidden"], big, kw["targets"] % 9000)


def test_check_values_names_the_first_bad_index_and_weight():
    spec = containment_inputs()
    kw = dict(spec["kw"])
    kw["targets"] = kw["targets"].clone()
    kw["targets"][[9, 30]] = 300
    with pytest.raises(ValueError, match=r"got 2 bad entries, e.g. \[300, 300\]; the first is "
                                         r"targets\[9\] \(token 9\)"):
        g2rl_kernels.sensitivity(**kw)
    kw = dict(spec["kw"], token_weights=spec["kw"]["token_weights"].clone())
    kw["token_weights"][11] = math.inf
    with pytest.raises(ValueError, match=r"token_weights contain NaN or inf: 1 bad entries; the "
                                         r"first is token_weights\[11\] \(token 11\) = inf"):
        g2rl_kernels.sensitivity(**kw)


def test_ignored_tokens_hidden_is_not_checked():
    """Padding/prompt positions may hold anything: only that token's lse is non-finite."""
    spec = containment_inputs()
    kw = dict(spec["kw"], hidden=spec["kw"]["hidden"].clone())
    i = spec["bad"]["ignored"]
    kw["hidden"][i] = math.nan
    out = g2rl_kernels.sensitivity(**kw)  # check_values=True: no error
    clean = g2rl_kernels.sensitivity(**spec["kw"])
    assert torch.isnan(out.lse[i])
    assert torch.isfinite(out.seq_features).all() and torch.isfinite(out.token_features).all()
    torch.testing.assert_close(out.seq_features, clean.seq_features, rtol=1e-5, atol=1e-6)


def test_padded_batch_with_garbage_under_the_mask():
    """sequence_features: NaN hidden states at masked positions are fine (check_values=True)."""
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(3, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    targets, mask = torch.randint(0, 50, (3, 7), generator=g), torch.rand(3, 7, generator=g) > 0.3
    mask[:, 0] = True
    mask[1, 2] = True
    clean = g2rl_kernels.sequence_features(hidden, weight, targets, mask)
    hidden = hidden.clone()
    hidden[~mask] = math.nan
    out = g2rl_kernels.sequence_features(hidden, weight, targets, mask)
    torch.testing.assert_close(out.seq_features, clean.seq_features)
    torch.testing.assert_close(out.logprobs, clean.logprobs)
    hidden[1, 2, 3] = math.inf
    with pytest.raises(ValueError, match=r"hidden\[9\] \(token 9, sequence 1, .*\+inf at column 3"
                                         r"(.|\n)*position \[i // T, i % T\].*T = 7"):
        g2rl_kernels.sequence_features(hidden, weight, targets, mask)


def test_check_values_reads_no_n_by_d_or_v_by_d_temporary():
    """The finiteness scans use row-wise / global min-max: no (N, d) or (V, d) bool tensor."""
    n, v, d = 2000, 3000, 64
    g = torch.Generator().manual_seed(13)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    from g2rl_kernels.ops.sensitivity_checks import check_values_of

    peak = largest_allocation(lambda: check_values_of(h, w, y, -100, None, None, None, None))
    assert peak < n * d // 4, peak


# --- 2. 16-bit inputs: no float32 copy of W ---


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_weight_is_never_copied_whole(dtype):
    """No allocation as large as a float32 copy of W (the outputs are given): W is upcast one
    vocabulary chunk at a time (default chunk and a small one)."""
    n, v, d = 64, 32768, 1024
    g = torch.Generator().manual_seed(14)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(seq_index=torch.arange(n) // 8, num_seqs=8, return_token_features=True,
              bias=torch.randn(v, generator=g))
    out = g2rl_kernels.sensitivity(h, w, y, **kw)
    copy = v * d * 4  # 128 MiB
    peak = largest_allocation(lambda: g2rl_kernels.sensitivity(h, w, y, **kw, _out=out))
    assert 0 < peak <= max(CHUNK_BYTES, VOCAB_CHUNK_BYTES) < copy, (peak, copy)
    peak = largest_allocation(lambda: g2rl_kernels.sensitivity(
        h, w, y, **kw, _out=out, _options={"chunk_size": 16, "vocab_chunk": 1000}))
    assert 0 < peak <= max(16 * v * 4, 1000 * d * 4), peak
    ref = reference.sensitivity(h.double(), w.double(), y, **kw)
    for f in FIELDS:
        torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("vocab_chunk", [1, 7, 64, 1000])
def test_vocab_chunk_does_not_matter(vocab_chunk):
    case = replace(Case(n=70, v=1000, d=40, dtype="bfloat16", seed=15, bias=True, weights=True,
                        temperature=0.8))
    run_and_check(with_options(case, vocab_chunk=vocab_chunk, chunk_size=32), backend="torch")


# --- 3. confident models: exp off the denormal range, still float64-accurate ---


def test_exp_arguments_stay_above_the_denormal_range():
    """Logits of std ~30: most exp arguments would be below -87 (float32 denormal results,
    torch.exp's slow path on the CPU). Every argument torch.exp gets is >= EXP_FLOOR."""
    g = torch.Generator().manual_seed(16)
    n, v, d = 64, 4000, 32
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (30 / math.sqrt(d))
    y = torch.randint(0, v, (n,), generator=g)
    spy = ExpArguments()
    with spy:
        g2rl_kernels.sensitivity(h, w, y, seq_index=torch.arange(n) // 8, num_seqs=8,
                                 return_token_features=True)
    assert spy.smallest, "torch.exp was not called"
    assert min(spy.smallest) >= EXP_FLOOR > math.log(torch.finfo(torch.float32).tiny)
    shifted = (h @ w.T).sub((h @ w.T).amax(1, keepdim=True))
    assert float((shifted < -87.3).float().mean()) > 0.5  # most would be denormal or 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale, temperature", [(30.0, 1.0), (3.0, 0.1), (100.0, 0.7)])
def test_sharp_logits_match_float64(dtype, scale, temperature):
    case = Case(n=120, v=3001, d=48, dtype=dtype, seed=17, temperature=temperature, bias=True,
                weights=True, logit_std=scale)
    run_and_check(with_options(case, chunk_size=50), backend="torch")


# --- 4. scalars, token_weights without seq_index, bias dtype ---

N, V, D = 6, 11, 8
H, W = torch.randn(N, D), torch.randn(V, D)
Y = torch.tensor([0, 3, -100, 10, 5, 2])
SEQ = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("num_seqs", [3, np.int64(3), np.int32(3), torch.tensor(3),
                                      torch.tensor(3, dtype=torch.int32)],
                         ids=["int", "np.int64", "np.int32", "tensor", "tensor-int32"])
@pytest.mark.parametrize("temperature", [0.8, np.float32(0.8), np.float64(0.8), torch.tensor(0.8),
                                         np.int64(1)],
                         ids=["float", "np.float32", "np.float64", "tensor", "np.int64"])
def test_numpy_and_tensor_scalars_are_accepted(num_seqs, temperature):
    out = g2rl_kernels.sensitivity(H, W, Y, seq_index=SEQ, num_seqs=num_seqs,
                                   temperature=temperature, ignore_index=np.int64(-100))
    ref = reference.sensitivity(H.double(), W.double(), Y, seq_index=SEQ, num_seqs=3,
                                temperature=float(temperature))
    assert out.seq_features.shape == (3, D)
    for f in FIELDS:
        if getattr(ref, f) is not None:
            torch.testing.assert_close(getattr(out, f).double(), getattr(ref, f), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("impl", [g2rl_kernels.sensitivity, reference.sensitivity],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_seqs=True), ValueError, r"num_seqs must be an int >= 0, got True"),
    (dict(num_seqs=torch.tensor([3])), ValueError, r"num_seqs must be an int"),
    (dict(num_seqs=torch.tensor(3.0)), ValueError, r"num_seqs must be an int"),
    (dict(num_seqs=np.float32(3)), ValueError, r"num_seqs must be an int"),
    (dict(num_seqs=np.int64(-2)), ValueError, r"num_seqs must be an int >= 0, got .*-2"),
    (dict(temperature=True), TypeError, r"temperature must be a number"),
    (dict(temperature=np.bool_(True)), TypeError, r"temperature must be a number"),
    (dict(temperature=torch.tensor([0.8])), TypeError, r"temperature must be a number"),
    (dict(temperature=np.float32("nan")), ValueError, r"temperature must be a finite number"),
    (dict(ignore_index=np.float64(-100)), TypeError, r"ignore_index must be an int"),
    (dict(ignore_index=np.int64(3)), ValueError, r"ignore_index must not be a valid"),
])
def test_bad_scalars(impl, kwargs, exc, match):
    kw = dict(seq_index=SEQ, num_seqs=3)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        impl(H, W, Y, **kw)


@pytest.mark.parametrize("impl", [g2rl_kernels.sensitivity, reference.sensitivity],
                         ids=["kernel", "reference"])
def test_token_weights_without_seq_index_are_refused(impl):
    with pytest.raises(ValueError, match=r"token_weights were given without seq_index"):
        impl(H, W, Y, token_weights=torch.ones(N))


@pytest.mark.parametrize("impl", [g2rl_kernels.sensitivity, reference.sensitivity],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("dtype, bias_dtype, ok", [
    (torch.float32, torch.float32, True),
    (torch.float32, torch.float64, False),
    (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.bfloat16, torch.float32, True),
    (torch.bfloat16, torch.float16, False),
    (torch.bfloat16, torch.float64, False),
    (torch.float16, torch.float16, True),
    (torch.float16, torch.float32, True),
    (torch.float16, torch.bfloat16, False),
])
def test_bias_dtype_rule(impl, dtype, bias_dtype, ok):
    """bias: the dtype of weight or float32, on every backend (checked before dispatch)."""
    bias = torch.randn(V).to(bias_dtype)
    args = (H.to(dtype), W.to(dtype), Y)
    if ok:
        out = impl(*args, bias=bias)
        ref = reference.sensitivity(H.to(dtype).double(), W.to(dtype).double(), Y,
                                    bias=bias.double())
        tol = 1e-5 if impl is g2rl_kernels.sensitivity or dtype == torch.float32 else 0.1
        torch.testing.assert_close(out.lse.double(), ref.lse, rtol=tol, atol=tol)
    else:
        with pytest.raises(TypeError, match=rf"bias must have a float dtype: the dtype of weight "
                                            rf"\({dtype}\) or torch.float32, got .*{bias_dtype}"):
            impl(*args, bias=bias)


def test_reference_accepts_float64_bias_with_float64_weight():
    out = reference.sensitivity(H.double(), W.double(), Y, bias=torch.randn(V).double())
    assert out.lse.dtype == torch.float64
