"""The ``impl="chunked"`` sensitivity path (CUDA; also runs under TRITON_INTERPRET=1).

Per chunk of C tokens (taken sorted by sequence when features are pooled):

1. logits X = h_chunk @ W^T as ONE cuBLAS GEMM with float32 output (16-bit inputs: 16-bit
   products, float32 accumulation and output, ``torch.mm(..., out_dtype=torch.float32)``;
   float32 inputs: a full float32 GEMM, never TF32, also inside a caller's autocast region).
   C is chosen so the (C, V) float32 buffer stays under :data:`LOGITS_BUDGET_BYTES`; one such
   buffer is live at a time.
2. ``_chunk_stats_kernel``, one program per BLOCK_M rows sweeping V: z = (X + b) / T, online
   max / exp-sum / entropy sum, target logit -> lse, logprob, entropy of each token, and
   1 - p_y as the exp-sum over the other columns over the total (no cancellation when
   p_y -> 1).
3. ``_chunk_grad_kernel``, grid (row blocks, V tiles): g = e(y) - p in float32; with pooling,
   a~ g is reduced over the rows of each sequence of the block into r (num_seqs, V) float32
   (relaxed atomics, shared ``_segment_reduce``); with token features g is written over X in
   place and phi = g @ W is one more GEMM (g rounded to W's dtype for 16-bit W, rows scaled by
   powers of two for float16, float32 out).

Then Phi = r @ W once (``seq_matmul``, float32). About 2 N V d flops at cuBLAS rate for the
logits (4 N V d with token features) plus 2 S V d, against 4 N V d in Triton dots for
``impl="fused"``; the price is the (C, V) buffer (plus a (C, V) 16-bit copy of g for 16-bit
token features).

On CPU tensors (the interpreter) the GEMMs run as float32 products of the (exactly upcast)
16-bit values: what the GPU's 16-bit GEMM with float32 accumulation computes, up to the order
of the sums.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from g2rl_kernels.ops.matmul_precision import float32_products
from g2rl_kernels.ops.sensitivity_triton import (
    _segment_reduce,
    interpreted,
    launch_inputs,
    pool_inputs,
    row_scale,
    seq_matmul,
)

LOGITS_BUDGET_BYTES = 1 << 30  # one (C, V) float32 logits buffer (plus C x V 16-bit for g)
MIN_CHUNK, MAX_CHUNK = 16, 16384


@triton.jit(do_not_specialize=["C"])
def _chunk_stats_kernel(
    x_ptr, b_ptr, y_ptr, rows_ptr, lse_ptr, logprob_ptr, entropy_ptr, chunk_ptr,
    C, V, stride_x, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """lse, logprob, entropy of BLOCK_M rows of the chunk's logits X (C, V), written at the
    rows' token indices ``rows``; and into ``chunk`` (2, C) for the next steps: lse and
    gy = 1 - p_y (as s_o / s, s_o the exp-sum over the other columns: no cancellation when
    p_y -> 1; 0 for ignored tokens), which is also max_v |g_v|."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < C
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=m_ok, other=-1)
    x_row = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    so = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        x = tl.load(x_row + offs_v[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_BIAS:
            x += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], x * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # -inf while every logit so far is -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(s > 0, m - m_new, 0.0)
        zs = z - m_safe[:, None]
        e = tl.exp(zs)
        u = alpha * (u + s * shift) + tl.sum(tl.where(zs == float("-inf"), 0.0, e * zs), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        is_y = offs_v[None, :] == y[:, None]
        so = alpha * so + tl.sum(tl.where(is_y, 0.0, e), axis=1)
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
    log_s = tl.log(s)
    lse = m + log_s
    counted = y >= 0
    gy = tl.where(counted, so / s, 0.0)
    tl.store(chunk_ptr + offs_m, lse, mask=m_ok)
    tl.store(chunk_ptr + C + offs_m, gy, mask=m_ok)
    tl.store(lse_ptr + rows, lse, mask=m_ok)
    tl.store(logprob_ptr + rows, tl.where(counted, zy - lse, 0.0), mask=m_ok)
    tl.store(entropy_ptr + rows, tl.where(counted, log_s - u / s, 0.0), mask=m_ok)


@triton.jit(do_not_specialize=["C"])
def _chunk_grad_kernel(
    x_ptr, b_ptr, y_ptr, rows_ptr, chunk_ptr, a_ptr, seq_ptr, r_ptr,
    C, V, stride_x, inv_temp,
    HAS_BIAS: tl.constexpr, POOL: tl.constexpr, WRITE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """g = e(y) - p (0 for ignored tokens) on one (row block, V tile) of X: pooled into
    r[seq] with weights a~ (POOL) and/or written over X (WRITE_G)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_ok = offs_m < C
    col_ok = offs_v < V
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=m_ok, other=-1)
    lse = tl.load(chunk_ptr + offs_m, mask=m_ok, other=0.0)
    gy = tl.load(chunk_ptr + C + offs_m, mask=m_ok, other=0.0)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_v[None, :]
    tile_ok = m_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptrs, mask=tile_ok, other=0.0)
    if HAS_BIAS:
        x += tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    p = tl.exp(x * inv_temp - lse[:, None])  # 0 where the bias is -inf
    g = tl.where(offs_v[None, :] == y[:, None], gy[:, None], -p)
    g = tl.where((y >= 0)[:, None] & tile_ok, g, 0.0)
    if POOL:
        a = tl.load(a_ptr + rows, mask=m_ok, other=0.0)  # a~, 0 for ignored tokens
        valid = m_ok & (a != 0)
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            seq = tl.load(seq_ptr + rows, mask=m_ok, other=0)
            val = tl.where(valid[:, None], a[:, None] * g, 0.0)  # no 0 * inf
            _segment_reduce(val, r_ptr, seq, valid, offs_v, V)
    if WRITE_G:
        tl.store(x_ptrs, g, mask=tile_ok)


# (BLOCK_M, BLOCK_V, num_warps) per kernel on a GPU; no tl.dot, so no tile-shape constraint
# (spill-free for sm_80 and sm_90 in the compile test)
GPU_CONFIGS = {"stats": (4, 1024, 4), "grad": (64, 64, 8)}
INTERPRETER_CONFIGS = {"stats": (128, 1024, 4), "grad": (128, 1024, 4)}


_OUT_DTYPE_GEMM: dict = {}  # (device, dtype) -> whether torch.mm(..., out_dtype=) runs there


def out_dtype_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on
    ``device`` (torch >= 2.8 on CUDA; some builds have the overload but refuse it, e.g. ROCm or
    TunableOp). Tried once per (device, dtype) on a 16 x 16 product (no host synchronisation:
    a refusal is raised when the call is dispatched); without it ``impl="auto"`` is "fused"."""
    key = (str(device), dtype)
    if key not in _OUT_DTYPE_GEMM:
        ok = hasattr(torch.ops.aten.mm, "dtype")
        if ok:
            try:
                a = torch.zeros(16, 16, dtype=dtype, device=device)
                torch.mm(a, a, out_dtype=torch.float32)
            except (RuntimeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_GEMM[key] = ok
    return _OUT_DTYPE_GEMM[key]


def gemm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(m, k) @ (k, n) -> float32 (m, n) (written into ``out`` if given), a and b of one dtype:
    16-bit products accumulated and returned in float32 (one cuBLAS call on CUDA; exact upcasts
    elsewhere)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _token_features(g: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                    g16: torch.Tensor | None) -> torch.Tensor:
    """(c, d) float32 phi = g @ W for g (c, V) float32 (overwritten when W is 16-bit): g is
    rounded to nearest in W's dtype (into the buffer ``g16``) for a 16-bit GEMM; for float16
    each row is first multiplied by the power of two ``scale`` (so its small entries stay above
    float16's underflow) and the product divided by it (exact)."""
    if weight.dtype == torch.float32:
        return gemm_f32(g, weight)
    if scale is not None:
        g.mul_(scale[:, None])
    phi = gemm_f32(g16.copy_(g), weight)
    return phi.div_(scale[:, None]) if scale is not None else phi


def default_chunk_size(n: int, v: int, budget: int = LOGITS_BUDGET_BYTES) -> int:
    rows = max(MIN_CHUNK, min(MAX_CHUNK, budget // (4 * max(v, 1))))
    if rows >= 128:
        rows -= rows % 64  # whole GEMM tiles
    return int(min(rows, max(n, 1)))


def sensitivity_chunked_triton(
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
    chunk_size: int | None = None,
    blocks: dict | None = None,
) -> None:
    """Write the outputs into the given float32 buffers; same contract as the other paths.

    Shapes: hidden (N, d), weight (V, d) (any strides), targets/seq_index/a_norm (N,),
    bias (V,); outputs logprobs/entropy/lse (N,), seq_features (num_seqs, d), token_features
    (N, d) contiguous. ``chunk_size`` (tokens per chunk) and ``blocks`` ({"stats": (BLOCK_M,
    BLOCK_V), "grad": ...}) are testing hooks. No host synchronisation.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    interp = interpreted()
    counted, y, b_arg = launch_inputs(hidden, targets, ignore_index, bias)
    if (hidden.dtype != torch.float32 and hidden.is_cuda
            and not out_dtype_gemm_works(hidden.device, hidden.dtype)):
        raise RuntimeError(
            f"impl='chunked' with {hidden.dtype} needs torch.mm(..., out_dtype=torch.float32), "
            f"which this torch ({torch.__version__}) does not run on {hidden.device}; use "
            f"impl='fused' (impl='auto' picks it there)"
        )
    if n == 0:
        if seq_features is not None:
            seq_features.zero_()
        return
    configs = INTERPRETER_CONFIGS if interp else GPU_CONFIGS
    sizes = {k: dict(blocks or {}).get(k, configs[k][:2]) for k in configs}
    pool = seq_features is not None
    # chunks of tokens sorted by sequence: a row block of the grad kernel holds 1-2 sequences
    if pool:
        r, a, seq, order = pool_inputs(seq_index, a_norm, counted, seq_features.shape[0], v)
    else:
        r = a = seq = lse  # unused pointers
        order = None
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(n, v)
    if weight.stride(0) != 1 and weight.stride(1) != 1:
        weight = weight.contiguous()  # once, not a copy inside every GEMM
    w_t = weight.t()
    fp16 = weight.dtype == torch.float16
    # one (C, V) float32 logits buffer for every chunk (and a 16-bit one for g @ W)
    rows_max = min(chunk, n)
    x_buf = torch.empty(rows_max, v, dtype=torch.float32, device=hidden.device)
    g16_buf = None
    if token_features is not None and weight.dtype != torch.float32:
        g16_buf = torch.empty(rows_max, v, dtype=weight.dtype, device=hidden.device)
    ctx = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
    # float32 GEMMs stay float32 (no TF32, no 16-bit autocast of a caller's region)
    with ctx, float32_products(hidden.device.type, exact_fp32=hidden.dtype == torch.float32):
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            c = c1 - c0
            if order is not None:
                rows = order[c0:c1]
                h = hidden.index_select(0, rows)
            else:
                rows = torch.arange(c0, c1, dtype=torch.int32, device=hidden.device)
                h = hidden[c0:c1]
            x = gemm_f32(h, w_t, out=x_buf[:c])  # (c, V) float32
            stats = torch.empty(2, c, dtype=torch.float32, device=hidden.device)
            bm, bv = sizes["stats"]
            _chunk_stats_kernel[(triton.cdiv(c, bm),)](
                x, b_arg, y, rows, lse, logprobs, entropy, stats, c, v, x.stride(0),
                1.0 / temperature, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_V=bv,
                num_warps=configs["stats"][2],
            )
            bm, bv = sizes["grad"]
            _chunk_grad_kernel[(triton.cdiv(c, bm), triton.cdiv(v, bv))](
                x, b_arg, y, rows, stats, a, seq, r, c, v, x.stride(0), 1.0 / temperature,
                HAS_BIAS=bias is not None, POOL=pool, WRITE_G=token_features is not None,
                BLOCK_M=bm, BLOCK_V=bv, num_warps=configs["grad"][2],
            )
            if token_features is not None:  # x holds g now
                phi = _token_features(x, weight, row_scale(stats[1]) if fp16 else None,
                                      None if g16_buf is None else g16_buf[:c])
                if order is not None:
                    token_features.index_copy_(0, rows.long(), phi)
                else:
                    token_features[c0:c1] = phi
        if pool:
            seq_matmul(r, weight, seq_features, interp, "ieee" if interp else "tf32x3")
