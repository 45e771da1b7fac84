"""Triton kernels of the ``impl="fused"`` sensitivity path (CUDA; also runs under
TRITON_INTERPRET=1): no logits buffer at all, for memory-bound users. The default CUDA path is
``impl="chunked"`` (``sensitivity_chunked_triton.py``), which shares :func:`seq_matmul`,
:func:`sequence_order` and :func:`_segment_reduce` with this one.

Three passes, none of which materialises an (N, V) or (N, d) intermediate:

1. ``_lse_kernel``, grid (token blocks, V splits): recompute (BLOCK_N, BLOCK_V) logits tiles
   with ``tl.dot`` over d tiles and keep online accumulators per token: running max m,
   s = sum exp(z - m), u = sum exp(z - m) (z - m) and the target logit. Partials of the V
   splits are merged by :func:`_merge_splits` (a few (splits, N) float32 vectors):
   lse = m + log s, logprob = z_y - lse, entropy = log s - u / s. Logits of -inf (a bias that
   masks vocabulary entries) are guarded in both places (no exp(-inf + inf), no 0 * -inf).
2. ``_pool_kernel``, grid (token blocks x V tiles), tokens taken sorted by sequence: recompute
   a logits tile, form a~_t (e(y_t) - p_t) and reduce it over the tokens of each sequence
   present in the block into r (num_seqs, V) float32 with relaxed atomics; then
   ``_seq_matmul_kernel`` gives Phi = r @ W in float32 (V split, partials summed). About
   4 N V d flops in all.
3. ``_token_kernel`` (only when token features are asked for), grid (token blocks,): phi_t =
   (e(y_t) - p_t) @ W with the coefficient vector formed in float32 (so 1 - p_y is exact when
   p_y -> 1) and then rounded to W's dtype for a 16-bit dot, V tile by V tile, accumulated in
   the (N, d) float32 output itself.

Every dot has all dimensions >= 16. Under the interpreter ``tl.dot`` on bf16/fp16 is wrong, so
the tiles are upcast to float32 there (``UPCAST``; products of 16-bit values are exact in
float32, so this computes what the tensor cores compute) and float32 dots are IEEE; on a GPU
float32 inputs use 3xTF32 dots (float32-accurate, not plain TF32) and 16-bit inputs accumulate
in float32. N is not specialised on (``do_not_specialize``): token counts vary between RL steps
without recompiling.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_device_ok(t: torch.Tensor) -> bool:
    """True when Triton kernels may be launched on t's device (CUDA). The compile test
    (tests/test_sensitivity_triton_compile.py) patches this to accept CPU tensors."""
    return t.is_cuda


def _sm_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (the compile test patches it with the target's)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) float32 tile of (W h + b) / T; vocabulary tail columns are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d0 = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    col_ok = offs_v < V
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_ok = offs_d < D
        h = tl.load(
            h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        w = tl.load(  # (BLOCK_D, BLOCK_V): W^T tile
            w_ptr + offs_v[None, :] * stride_wv + offs_d[:, None] * stride_wd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit(do_not_specialize=["N"])
def _lse_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, tiles_per_split,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online (m, s, u, z_y, s_o) of one token block over one V split -> part (5, splits, N);
    s_o = sum of exp(z - m) over the columns other than the target: 1 - p_y = s_o / s without
    the cancellation of 1 - exp(z_y - lse) when p_y -> 1."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    y = tl.load(y_ptr + offs_n, mask=offs_n < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    so = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd,
            stride_wv, stride_wd, inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        m_new = tl.maximum(m, tl.max(z, axis=1))  # -inf while every logit so far is -inf
        # a bias may mask vocabulary entries with -inf: a whole tile (or split) of -inf logits
        # must not give exp(-inf + inf) or 0 * -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)  # 0 while m = -inf (then s = u = 0 anyway)
        shift = tl.where(s > 0, m - m_new, 0.0)  # s > 0: m and m_new finite
        zs = z - m_safe[:, None]
        e = tl.exp(zs)  # 0 on -inf logits and the -inf tail
        ezs = tl.where(zs == float("-inf"), 0.0, e * zs)  # NaN stays NaN
        u = alpha * (u + s * shift) + tl.sum(ezs, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        is_y = offs_v[None, :] == y[:, None]
        so = alpha * so + tl.sum(tl.where(is_y, 0.0, e), axis=1)
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
    row_ok = offs_n < N
    stride_part = num_splits * N
    base = part_ptr + pid_s * N + offs_n
    tl.store(base, m, mask=row_ok)
    tl.store(base + stride_part, s, mask=row_ok)
    tl.store(base + 2 * stride_part, u, mask=row_ok)
    tl.store(base + 3 * stride_part, zy, mask=row_ok)
    tl.store(base + 4 * stride_part, so, mask=row_ok)


@triton.jit
def _segment_reduce(
    val, r_ptr, seq, valid, offs_v, V,
):
    """r[seq_t, offs_v] += val[t, :] summed over the rows t of each sequence in the block.

    Visits only the sequence ids present among the valid rows, in increasing order (one or two
    when the rows are sorted by sequence, as the wrappers arrange; at most BLOCK_N otherwise),
    with one vector atomic add (relaxed: only the sums matter) per id.
    """
    none: tl.constexpr = 2147483647
    b = tl.min(tl.where(valid, seq, none), axis=0)
    col_ok = offs_v < V
    while b != none:
        part = tl.sum(tl.where(((seq == b) & valid)[:, None], val, 0.0), axis=0)
        tl.atomic_add(r_ptr + b.to(tl.int64) * V + offs_v, part, mask=col_ok, sem="relaxed")
        b = tl.min(tl.where(valid & (seq > b), seq, none), axis=0)


@triton.jit(do_not_specialize=["N"])
def _pool_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, gy_ptr, a_ptr, seq_ptr, order_ptr, r_ptr, N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_temp, num_n_blocks, num_v_tiles,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
):
    """r[seq_t] += a~_t (e(y_t) - p_t) for one (token block, V tile); the target's entry is
    gy_t = 1 - p_y from the lse pass.

    Token blocks are taken in ``order`` (the tokens sorted by sequence), so that a block holds
    one or two sequences whatever the layout of seq_index.
    """
    pid = tl.program_id(0)
    # grouped order: GROUP token blocks sweep the V tiles together (L2 reuse of h and W)
    per_group = GROUP * num_v_tiles
    first_n = (pid // per_group) * GROUP
    group_size = tl.minimum(num_n_blocks - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # token index of each row of the block; N (out of range) past the end
    offs_n = tl.load(order_ptr + pos, mask=pos < N, other=N).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = offs_n < N
    a = tl.load(a_ptr + offs_n, mask=row_ok, other=0.0)  # 0 for ignored tokens
    # a token counts in its sequence iff a~ != 0 (as on the CPU path): a non-finite p row or
    # a~ (bad input with check_values=False) then makes that sequence's feature NaN, and only it
    valid = row_ok & (a != 0)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
        seq = tl.load(seq_ptr + offs_n, mask=row_ok, other=0)
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd,
            stride_wv, stride_wd, inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        gy = tl.load(gy_ptr + offs_n, mask=row_ok, other=0.0)
        p = tl.exp(z - lse[:, None])  # 0 on -inf logits and the -inf tail
        g = tl.where(offs_v[None, :] == y[:, None], gy[:, None], -p)
        val = tl.where(valid[:, None], a[:, None] * g, 0.0)  # no 0 * inf
        _segment_reduce(val, r_ptr, seq, valid, offs_v, V)


@triton.jit
def _seq_matmul_kernel(
    r_ptr, w_ptr, out_ptr, S, V, D, stride_wv, stride_wd, tiles_per_split,
    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[split] = r[:, split's V range] @ W[split's V range] in float32 (3xTF32 or IEEE)."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    v_begin = pid_k * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = offs_v < V
        r = tl.load(
            r_ptr + offs_s[:, None] * V + offs_v[None, :],
            mask=(offs_s[:, None] < S) & col_ok[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0,
        ).to(tl.float32)
        acc = tl.dot(r, w, acc, input_precision=PRECISION)
    out = out_ptr + pid_k * S * D + offs_s[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=(offs_s[:, None] < S) & (offs_d[None, :] < D))


@triton.jit
def _round_bf16_rne(x):
    """float32 -> the nearest bfloat16 value (ties to even), kept in float32: what the GPU's
    cvt.rn.bf16.f32 gives. The interpreter's own float32 -> bfloat16 cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["N"])
def _token_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, gy_ptr, gscale_ptr, out_ptr, N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUND_G: tl.constexpr,
    SCALE_G: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """out[t] += g_t @ W with g_t = e(y_t) - p_t (0 for ignored tokens), out (N, D) zeroed.

    g is formed in float32 with its target entry gy_t = 1 - p_y from the lse pass (no
    cancellation when p_y -> 1); with 16-bit W (``ROUND_G``) g is then rounded to nearest in
    W's dtype for the tensor-core dot (relative error 2^-8 (bf16) or 2^-11 (fp16) per entry of
    g, not of W[y]). float16 (``SCALE_G``): each row of g is first multiplied by the power of
    two gscale_t that brings its largest entry to [1, 2), so that the probability tail is not
    flushed to zero (float16 has no exponent range below 6e-8), and the product divided by it.
    Under the interpreter ``UPCAST`` computes the same rounded products in float32
    (``EMULATE_RNE``: bf16 rounding by bit operations).
    """
    pid_n = tl.program_id(0)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=row_ok, other=-1)
    counted = row_ok & (y >= 0)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    gy = tl.load(gy_ptr + offs_n, mask=row_ok, other=0.0)
    if SCALE_G:
        gscale = tl.load(gscale_ptr + offs_n, mask=row_ok, other=1.0)
    offs_d0 = tl.arange(0, BLOCK_D)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = offs_v < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd,
            stride_wv, stride_wd, inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )
        g = tl.where(offs_v[None, :] == y[:, None], gy[:, None], -tl.exp(z - lse[:, None]))
        g = tl.where(counted[:, None], g, 0.0)
        if SCALE_G:
            g = g * gscale[:, None]
        gd = g
        if ROUND_G:  # 16-bit W: the tensor cores multiply g rounded to nearest in W's dtype
            if EMULATE_RNE:
                gd = _round_bf16_rne(g)
            else:
                gd = g.to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
                if UPCAST:
                    gd = gd.to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = (d0 + offs_d0).to(tl.int64)
            d_ok = offs_d < D
            w = tl.load(
                w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            pw = tl.dot(gd, w, input_precision=PRECISION)
            if SCALE_G:
                pw = pw / gscale[:, None]  # a power of two: exact
            o_ptrs = out_ptr + offs_n[:, None] * D + offs_d[None, :]
            o_mask = row_ok[:, None] & d_ok[None, :]
            tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + pw, mask=o_mask)
            # the rows are read back at the next V tile, possibly by other threads of the
            # program: make the stores visible (a CTA barrier orders global memory too)
            tl.debug_barrier()


def _pow2(x: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, triton.next_power_of_2(max(int(x), 1)))))


# GPU tile shapes per kernel and input width: (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages).
# Chosen so that each compiles for sm_80 and sm_90 without register spills when d is a multiple
# of 16 (tests/test_sensitivity_triton_compile.py compiles them through the real launch
# specialisation); not timed on a GPU. float32 inputs use 3xTF32 dots (more registers).
GPU_CONFIGS = {
    ("lse", False): (64, 128, 64, 8, 3),
    ("pool", False): (64, 128, 64, 4, 3),
    ("token", False): (64, 128, 64, 8, 1),
    ("lse", True): (64, 64, 32, 8, 2),
    ("pool", True): (64, 64, 32, 8, 2),
    ("token", True): (64, 32, 32, 8, 1),
}


def _config(kernel: str, n: int, v: int, d: int, fp32: bool, interp: bool,
            blocks: tuple[int, int, int] | None) -> tuple[dict, dict]:
    """(constexpr block sizes, launch options); powers of two, every dot dimension >= 16."""
    if interp:  # few, large blocks: the interpreter's cost is per block operation
        bn, bv, bd, warps, stages = 128, 1024, 128, 4, 1
    else:
        bn, bv, bd, warps, stages = GPU_CONFIGS[(kernel, fp32)]
    if blocks is not None:
        bn, bv, bd = blocks
    sizes = dict(BLOCK_N=_pow2(n, 16, bn), BLOCK_V=_pow2(v, 16, bv), BLOCK_D=_pow2(d, 16, bd))
    return sizes, dict(num_warps=warps, num_stages=stages)


def row_scale(g_max: torch.Tensor) -> torch.Tensor:
    """2^-floor(log2 g_max) where 0 < g_max < inf, at most 2^100 (finite in float32 and
    enough to lift any g_max above 2^-100), else 1 (NaN stays NaN).

    With g_max = gy = 1 - p_y = max_v |g_tv| (every other entry is -p_v, and p_v <= the sum
    of them, which is gy): scaling a row of g by it before rounding to float16 brings its
    largest entry to [1, 2) and keeps its small probabilities above float16's underflow."""
    ok = (g_max > 0) & (g_max < math.inf)
    exponent = torch.clamp(-torch.floor(torch.log2(g_max)), max=100.0)
    return torch.where(ok, torch.exp2(exponent), torch.where(torch.isnan(g_max), g_max, 1.0))


def _merge_splits(part: torch.Tensor, counted: torch.Tensor, logprobs, entropy, lse,
                  gy: torch.Tensor) -> None:
    """Merge the per-split online accumulators part (5, splits, N) into the outputs and gy
    (N,) = 1 - p_y = s_o / s (0 for ignored tokens)."""
    m, s, u, zy, so = part.unbind(0)  # (splits, N) each
    mm = m.amax(dim=0)  # (N,); -inf only if a row's logits are all -inf (refused by the checks)
    scale = torch.exp(m - mm)  # 0 for a split whose logits are all -inf (m = -inf, s = 0)
    s_tot = (s * scale).sum(dim=0)
    # s * (m - mm) would be 0 * -inf for such a split
    u_tot = (scale * (u + torch.where(s > 0, s * (m - mm), 0.0))).sum(dim=0)
    log_s = s_tot.log()
    gy.copy_(torch.where(counted, (so * scale).sum(dim=0) / s_tot, 0.0))
    lse.copy_(mm + log_s)
    logprobs.copy_(torch.where(counted, zy.sum(dim=0) - lse, 0.0))
    entropy.copy_(torch.where(counted, log_s - u_tot / s_tot, 0.0))


def sensitivity_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    seq_index: torch.Tensor | None,
    a_norm: torch.Tensor | None,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    seq_features: torch.Tensor | None = None,
    token_features: torch.Tensor | None = None,
    num_splits: int | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> None:
    """Write the outputs into the given float32 buffers; same contract as the torch path.

    Shapes: hidden (N, d), weight (V, d) (any strides), targets/seq_index/a_norm (N,),
    bias (V,); outputs logprobs/entropy/lse (N,), seq_features (num_seqs, d), token_features
    (N, d) contiguous. ``num_splits`` overrides the number of V splits of the lse pass and
    ``blocks`` the (BLOCK_N, BLOCK_V, BLOCK_D) tile shape (testing hooks). No host
    synchronisation.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    interp = interpreted()
    counted, y, b_arg = launch_inputs(hidden, targets, ignore_index, bias)
    fp32 = hidden.dtype == torch.float32
    upcast = interp and not fp32
    # float32 dots: IEEE in the interpreter, 3xTF32 (float32-accurate) on a GPU; 16-bit inputs
    # use the tensor cores' native 16-bit products with float32 accumulation (the precision
    # argument does not apply to them: "ieee" is the neutral value)
    fp32_precision = "ieee" if interp else "tf32x3"
    precision = fp32_precision if fp32 else "ieee"
    args = (n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature)
    flags = dict(HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision)

    def config(kernel):
        return _config(kernel, n, v, d, fp32, interp, blocks)

    if n == 0:
        if seq_features is not None:
            seq_features.zero_()
        return
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        sizes, launch = config("lse")
        n_blocks = triton.cdiv(n, sizes["BLOCK_N"])
        v_tiles = triton.cdiv(v, sizes["BLOCK_V"])
        if num_splits is None:
            num_splits = 1
            if not interp:  # enough programs to fill the GPU
                num_splits = triton.cdiv(4 * _sm_count(hidden.device), n_blocks)
        num_splits = max(1, min(int(num_splits), v_tiles))
        tiles_per_split = triton.cdiv(v_tiles, num_splits)
        num_splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
        part = torch.empty(5, num_splits, n, dtype=torch.float32, device=hidden.device)
        _lse_kernel[(n_blocks, num_splits)](
            hidden, weight, b_arg, y, part, *args, tiles_per_split, **flags, **sizes, **launch,
        )
        gy = torch.empty(n, dtype=torch.float32, device=hidden.device)  # 1 - p_y
        _merge_splits(part, counted, logprobs, entropy, lse, gy)
        if token_features is not None:
            sizes, launch = config("token")
            token_features.zero_()
            fp16 = weight.dtype == torch.float16
            gscale = row_scale(gy) if fp16 else gy  # (a dummy pointer if unused)
            _token_kernel[(triton.cdiv(n, sizes["BLOCK_N"]),)](
                hidden, weight, b_arg, y, lse, gy, gscale, token_features, *args,
                **flags, ROUND_G=not fp32, SCALE_G=fp16,
                EMULATE_RNE=upcast and weight.dtype == torch.bfloat16, **sizes, **launch,
            )
        if seq_features is not None:
            num_seqs = seq_features.shape[0]
            r, a, seq, order = pool_inputs(seq_index, a_norm, counted, num_seqs, v)
            sizes, launch = config("pool")
            n_blocks = triton.cdiv(n, sizes["BLOCK_N"])
            v_tiles = triton.cdiv(v, sizes["BLOCK_V"])
            if num_seqs > 0:
                _pool_kernel[(n_blocks * v_tiles,)](
                    hidden, weight, b_arg, y, lse, gy, a, seq, order, r, *args, n_blocks, v_tiles,
                    **flags, GROUP=8, **sizes, **launch,
                )
            seq_matmul(r, weight, seq_features, interp, fp32_precision)


def launch_inputs(hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What both Triton paths launch with, after checking that they may launch on this device:
    counted (N,) bool, y (N,) int64 targets with -1 for ignored tokens (never a column), and
    the bias as the kernels read it (unit stride; a dummy pointer when there is none)."""
    if not interpreted() and not _launch_device_ok(hidden):
        raise RuntimeError("the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    counted = targets != ignore_index
    y = torch.where(counted, targets, -1).to(torch.int64)
    return counted, y, bias.contiguous() if bias is not None else hidden


def pool_inputs(seq_index: torch.Tensor, a_norm: torch.Tensor, counted: torch.Tensor,
                num_seqs: int, v: int) -> tuple[torch.Tensor, ...]:
    """Buffers of the per-sequence reduction of both Triton paths: r (num_seqs, V) float32
    zeros, a~ (N,) float32 (0 for ignored tokens), seq (N,) int32 and the tokens sorted by
    sequence (N,) int32."""
    r = torch.zeros(num_seqs, v, dtype=torch.float32, device=seq_index.device)
    a = torch.where(counted, a_norm.float(), 0.0).contiguous()
    seq = seq_index.to(torch.int32).contiguous()
    return r, a, seq, sequence_order(seq_index)


def sequence_order(seq_index: torch.Tensor) -> torch.Tensor:
    """(N,) int32 token indices sorted by sequence (stable): a block of consecutive entries
    then spans one or two sequences, whatever the layout (shuffled, interleaved) of seq_index.
    One device sort, no host synchronisation."""
    return torch.sort(seq_index, stable=True).indices.to(torch.int32)


def seq_matmul(r: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, interp: bool,
                precision: str) -> None:
    """out (S, d) = r (S, V) @ weight (V, d) in float32, split over V (partials summed)."""
    num_seqs, v = r.shape
    d = weight.shape[1]
    if num_seqs == 0:
        return
    # W is read once per block of BLOCK_S sequences: 64 of them per block when there are many
    bs = _pow2(num_seqs, 16, 64)
    bd = _pow2(d, 16, 128 if interp else 64)
    bv = 512 if interp else 32
    v_tiles = triton.cdiv(v, bv)
    grid_sd = triton.cdiv(num_seqs, bs) * triton.cdiv(d, bd)
    splits = 1 if interp else max(1, min(v_tiles, triton.cdiv(1024, grid_sd)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    part = torch.empty(splits, num_seqs, d, dtype=torch.float32, device=r.device)
    _seq_matmul_kernel[(triton.cdiv(num_seqs, bs), triton.cdiv(d, bd), splits)](
        r, weight, part, num_seqs, v, d, weight.stride(0), weight.stride(1), tiles_per_split,
        BLOCK_S=bs, BLOCK_V=bv, BLOCK_D=bd, PRECISION=precision, num_warps=4,
    )
    torch.sum(part, dim=0, out=out)
