"""Chunked PyTorch implementation of the sensitivity outputs (the CPU path).

Tokens are processed ``chunk_size`` at a time: one (chunk, V) float32 logits block is computed,
turned into log-sum-exp, target log-prob and entropy, and (for the sequence features) its
probabilities, scaled by a~_t, are added into q (num_seqs, V) by a (k, c) @ (c, V) product
over the k sequences present in the chunk. Memory is bounded by two (chunk, V) float32
buffers plus q, whatever N is. 16-bit weights are never copied whole to float32: every product
with W runs over vocabulary chunks of ``vocab_chunk`` rows, each upcast into one reused
(vocab_chunk, d) float32 buffer (32 MiB by default).

On the CPU one logits block serves both "passes" of the GPU kernels, so the pooled path costs
one (N, d) @ (d, V) product plus the small (num_seqs, V) @ (V, d) product; per-token features
(only when asked for) add one (chunk, V) @ (V, d) product per chunk.

exp(z - max) is taken of arguments clamped at ``EXP_FLOOR`` (-64): below about -87 the results
are float32 denormals or zero and ``torch.exp`` (and every product with its result) takes a slow
path on the CPU, which made confident models (sharp logits, low temperatures) twice as slow.
A clamped entry contributes e^-64 (1.6e-28) to s >= 1 where its true share is smaller still,
and e^-64 * 64 to the entropy sum: for V up to 10^8 the change is below 2e-20 relative, far
under float32 resolution (the tests hold it to the float64 reference).

Non-finite rows (a NaN/inf hidden state, or logits that overflow float32) are contained: every
per-token output is row-wise, and a row whose exp-sum is not finite is left out of the q
product (which would otherwise spread 0 x NaN to every sequence of the chunk) and marks its
sequence's feature NaN instead, if the token counts in it (a~ != 0).
"""

from __future__ import annotations

import math

import torch

# Bytes of one (chunk, V) float32 buffer; two are live. 32 MiB (256 rows at V = 32768) keeps
# the logits product at full rate while memory stays far below the (N, V) logits (benchmarks/).
CHUNK_BYTES = 32 << 20
MIN_CHUNK, MAX_CHUNK = 64, 4096
# Bytes of the float32 upcast of one vocabulary chunk of a 16-bit W. Smaller chunks stay in
# cache (a little faster with one thread on an idle machine); fewer, larger ones cost fewer
# parallel regions (two per chunk and token chunk), which matters on an oversubscribed machine.
VOCAB_CHUNK_BYTES = 32 << 20
MIN_VOCAB_CHUNK = 64
EXP_FLOOR = -64.0  # exp(-64) = 1.6e-28: a normal float32, far above the denormal range


def default_chunk_size(vocab: int) -> int:
    rows = CHUNK_BYTES // (4 * max(vocab, 1))
    return int(min(MAX_CHUNK, max(MIN_CHUNK, rows)))


def default_vocab_chunk(d: int) -> int:
    return int(max(MIN_VOCAB_CHUNK, VOCAB_CHUNK_BYTES // (4 * max(d, 1))))


class _Weight:
    """W (V, d) for float32 products: W itself if float32, else vocabulary chunks upcast one at
    a time into a reused (vocab_chunk, d) float32 buffer."""

    def __init__(self, weight: torch.Tensor, vocab_chunk: int | None):
        self.weight = weight
        self.v, self.d = weight.shape
        self.wide = weight.dtype == torch.float32
        rows = min(self.v, vocab_chunk or default_vocab_chunk(self.d))
        self.rows = self.v if self.wide else rows
        self.buf = None if self.wide else torch.empty(
            rows, self.d, dtype=torch.float32, device=weight.device)

    def chunks(self):
        """Yield (v0, v1, W[v0:v1] as float32)."""
        if self.wide:
            yield 0, self.v, self.weight
            return
        for v0 in range(0, self.v, self.rows):
            v1 = min(self.v, v0 + self.rows)
            yield v0, v1, self.buf[: v1 - v0].copy_(self.weight[v0:v1])

    def logits(self, h: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
        """out (c, V) = h (c, d) @ W^T + b, written chunk by chunk into column blocks of out."""
        for v0, v1, w in self.chunks():
            o = out if self.wide else out[:, v0:v1]
            if b is None:
                torch.mm(h, w.t(), out=o)
            else:
                torch.addmm(b[v0:v1], h, w.t(), out=o)

    def right_mm(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (r, d) = x (r, V) @ W in float32."""
        if self.wide:
            return torch.mm(x, self.weight, out=out)
        out.zero_()
        for v0, v1, w in self.chunks():
            out.addmm_(x[:, v0:v1], w)
        return out

    def rows_of(self, y: torch.Tensor) -> torch.Tensor:
        """W[y] (c, d) as float32 (a new tensor)."""
        return self.weight[y].float()


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
    vocab_chunk: int | None = None,
) -> None:
    """Write the outputs into the given float32 buffers (every element is written).

    Shapes: hidden (N, d), weight (V, d), targets (N,), seq_index (N,), a_norm (N,) the
    normalised token weights a~ (0 for ignored tokens), bias (V,); outputs logprobs, entropy,
    lse (N,), seq_features (num_seqs, d) (with seq_index and a_norm), token_features (N, d).
    ``chunk_size`` tokens and (16-bit W) ``vocab_chunk`` vocabulary rows at a time.
    Arguments are assumed valid (see ``sensitivity_checks``).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    w = _Weight(weight, vocab_chunk)
    inv_t = 1.0 / temperature
    b = None if bias is None else bias.float() * inv_t  # (V,)
    counted = targets != ignore_index
    y = torch.where(counted, targets.long(), 0)
    pool = seq_features is not None
    if pool:
        seq = seq_index.long()
        a_norm = torch.where(counted, a_norm.float(), 0)
        q = torch.zeros(seq_features.shape[0], v, dtype=torch.float32, device=hidden.device)
        poisoned = torch.zeros(seq_features.shape[0], dtype=torch.bool, device=hidden.device)
    chunk = chunk_size or default_chunk_size(v)
    z_buf = torch.empty(min(chunk, n), v, dtype=torch.float32, device=hidden.device)
    e_buf = torch.empty_like(z_buf)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        rows = slice(s0, s1)
        h = hidden[rows].float()
        if inv_t != 1.0:
            h = h * inv_t
        z = z_buf[: s1 - s0]
        w.logits(h, b, z)  # (c, V) = (W h + b) / T
        m = z.amax(dim=1)  # (c,)
        z.sub_(m[:, None])
        zy = z.gather(1, y[rows, None]).squeeze(1)  # z_y - m
        z.clamp_(min=EXP_FLOOR)  # keeps torch.exp off its denormal slow path (NaN stays NaN)
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
            # phi = (1 - p_y) W[y] - sum_{v != y} p_v W[v] = (s_o W[y] - e_o @ W) / s with e_o
            # = e without the target column and s_o its sum: W[y] - p @ W would cancel in
            # float32 when p_y -> 1 (12% error at 1 - p_y = 1e-6)
            yr = y[rows, None]
            ey = e.gather(1, yr)
            e.scatter_(1, yr, 0.0)
            s_o = e.sum(dim=1)
            other_w = w.right_mm(e, out=torch.empty(s1 - s0, d, dtype=torch.float32,
                                                    device=hidden.device))
            e.scatter_(1, yr, ey)  # e is used again below
            phi = w.rows_of(y[rows]).mul_(s_o[:, None]).sub_(other_w).mul_(inv_s[:, None])
            token_features[rows] = torch.where(cnt[:, None], phi, 0.0)
        if pool:
            coef = a_norm[rows] * inv_s
            bad = ~torch.isfinite(s)  # a non-finite logits row (s >= 1 otherwise)
            if bool(bad.any()):
                e[bad] = 0.0
                coef = torch.where(bad, 0.0, coef)
                poisoned[seq[rows][bad & (a_norm[rows] != 0)]] = True
            _accumulate_q(q, e, seq[rows], coef)
    if pool:
        # Phi_b = sum_t a~_t W[y_t] - q_b^T W = (sum_t a~_t e(y_t) - q_b)^T W
        q.neg_()
        q.index_put_((seq, y), a_norm, accumulate=True)
        w.right_mm(q, out=seq_features)
        seq_features[poisoned] = math.nan


def _accumulate_q(q: torch.Tensor, e: torch.Tensor, seq: torch.Tensor, coef: torch.Tensor) -> None:
    """q[seq_t] += coef_t e_t for the rows t of one chunk, as one small matmul.

    Shapes: q (S, V), e (c, V), seq (c,), coef (c,). The k distinct sequences of the chunk
    (usually one or two) get a (k, c) matrix of coefficients: (k, c) @ (c, V) reads e once,
    where scaling e and ``index_add_`` would read and write it twice. More than 32 sequences
    in a chunk fall back to that (e is overwritten). e must be finite (a non-finite row would
    reach every sequence of the chunk through the zero coefficients).
    """
    ids, inverse = torch.unique(seq, return_inverse=True)
    if len(ids) > 32:  # many short or shuffled sequences: the matmul would cost too much
        q.index_add_(0, seq, e.mul_(coef[:, None]))
        return
    coefs = torch.zeros(len(ids), len(seq), dtype=e.dtype, device=e.device)
    coefs[inverse, torch.arange(len(seq), device=e.device)] = coef
    for row, b in zip(coefs @ e, ids.tolist(), strict=True):  # index_add_ is slow here
        q[b] += row
