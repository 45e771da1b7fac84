"""Chunked PyTorch implementation of the sensitivity outputs (the CPU path).

Tokens are processed ``chunk_size`` at a time: one (chunk, V) float32 logits block is computed,
turned into log-sum-exp, target log-prob and entropy, and (for the sequence features) its
probabilities, scaled by a~_t, are added into q (num_seqs, V) by a (k, c) @ (c, V) product
over the k sequences present in the chunk. Memory is bounded by two (chunk, V) float32
buffers plus q (and a float32 copy of W for 16-bit weights), whatever N is.

On the CPU one logits block serves both "passes" of the GPU kernels, so the pooled path costs
one (N, d) @ (d, V) product plus the small (num_seqs, V) @ (V, d) product; per-token features
(only when asked for) add one (chunk, V) @ (V, d) product per chunk.
"""

from __future__ import annotations

import torch

# Bytes of one (chunk, V) float32 buffer; two are live. 32 MiB (256 rows at V = 32768) keeps
# the logits product at full rate while memory stays far below the (N, V) logits (benchmarks/).
CHUNK_BYTES = 32 << 20
MIN_CHUNK, MAX_CHUNK = 64, 4096


def default_chunk_size(vocab: int) -> int:
    rows = CHUNK_BYTES // (4 * max(vocab, 1))
    return int(min(MAX_CHUNK, max(MIN_CHUNK, rows)))


@torch.no_grad()
def sensitivity_torch(
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
) -> None:
    """Write the outputs into the given float32 buffers (every element is written).

    Shapes: hidden (N, d), weight (V, d), targets (N,), seq_index (N,), a_norm (N,) the
    normalised token weights a~ (0 for ignored tokens), bias (V,); outputs logprobs, entropy,
    lse (N,), seq_features (num_seqs, d) (with seq_index and a_norm), token_features (N, d).
    Arguments are assumed valid (see ``sensitivity_checks``).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    w = weight if weight.dtype == torch.float32 else weight.float()  # (V, d)
    inv_t = 1.0 / temperature
    b = None if bias is None else bias.float() * inv_t  # (V,)
    counted = targets != ignore_index
    y = torch.where(counted, targets.long(), 0)
    pool = seq_features is not None
    if pool:
        seq = seq_index.long()
        a_norm = torch.where(counted, a_norm.float(), 0)
        q = torch.zeros(seq_features.shape[0], v, dtype=torch.float32, device=hidden.device)
    chunk = chunk_size or default_chunk_size(v)
    z_buf = torch.empty(min(chunk, n), v, dtype=torch.float32, device=hidden.device)
    e_buf = torch.empty_like(z_buf)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        rows = slice(s0, s1)
        h = hidden[rows].float()
        if inv_t != 1.0:
            h = h * inv_t
        if b is None:  # (c, V) = (W h + b) / T
            z = torch.mm(h, w.t(), out=z_buf[: s1 - s0])
        else:
            z = torch.addmm(b, h, w.t(), out=z_buf[: s1 - s0])
        m = z.amax(dim=1)  # (c,)
        z.sub_(m[:, None])
        zy = z.gather(1, y[rows, None]).squeeze(1)  # z_y - m
        e = torch.exp(z, out=e_buf[: s1 - s0])  # exp(z - m)
        s = e.sum(dim=1)
        log_s = s.log()
        u = z.mul_(e).sum(dim=1)  # sum exp(z - m) (z - m)
        cnt = counted[rows]
        lse[rows] = m + log_s
        logprobs[rows] = torch.where(cnt, zy - log_s, 0.0)
        entropy[rows] = torch.where(cnt, log_s - u / s, 0.0)
        inv_s = 1.0 / s
        if token_features is not None:
            mean_w = torch.mm(e, w).mul_(inv_s[:, None])  # (c, d) = p @ W
            phi = w[y[rows]].sub_(mean_w)
            token_features[rows] = torch.where(cnt[:, None], phi, 0.0)
        if pool:
            _accumulate_q(q, e, seq[rows], a_norm[rows] * inv_s)
    if pool:
        # Phi_b = sum_t a~_t W[y_t] - q_b^T W = (sum_t a~_t e(y_t) - q_b)^T W
        q.neg_()
        q.index_put_((seq, y), a_norm, accumulate=True)
        torch.mm(q, w, out=seq_features)


def _accumulate_q(q: torch.Tensor, e: torch.Tensor, seq: torch.Tensor, coef: torch.Tensor) -> None:
    """q[seq_t] += coef_t e_t for the rows t of one chunk, as one small matmul.

    Shapes: q (S, V), e (c, V), seq (c,), coef (c,). The k distinct sequences of the chunk
    (usually one or two) get a (k, c) matrix of coefficients: (k, c) @ (c, V) reads e once,
    where scaling e and ``index_add_`` would read and write it twice. More than 32 sequences
    in a chunk fall back to that (e is overwritten).
    """
    ids, inverse = torch.unique(seq, return_inverse=True)
    if len(ids) > 32:  # many short or shuffled sequences: the matmul would cost too much
        q.index_add_(0, seq, e.mul_(coef[:, None]))
        return
    coefs = torch.zeros(len(ids), len(seq), dtype=e.dtype, device=e.device)
    coefs[inverse, torch.arange(len(seq), device=e.device)] = coef
    for row, b in zip(coefs @ e, ids.tolist(), strict=True):  # index_add_ is slow here
        q[b] += row
