"""float32 products that stay float32 (g2rl_kernels/ops/matmul_precision.py), under torch's
newer precision API: once a program sets ``torch.backends.cuda.matmul.fp32_precision`` (what
torch >= 2.9 recommends), the legacy getter ``torch.get_float32_matmul_precision()`` raises, so
nothing of ours may call it. Each check runs in a fresh process: the setting is process-wide and
cannot be mixed with the legacy API afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
    reason=f"torch {torch.__version__} has no fp32_precision API",
)


def _run(code: str, **env) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ieee_context_under_the_new_api():
    _run("""
        import torch
        from g2rl_kernels.ops.matmul_precision import float32_products, ieee_float32_matmul
        matmul = torch.backends.cuda.matmul
        matmul.fp32_precision = "tf32"
        with ieee_float32_matmul(True):
            assert matmul.fp32_precision == "ieee", matmul.fp32_precision
        assert matmul.fp32_precision == "tf32"
        with float32_products("cuda", exact_fp32=True):
            assert matmul.fp32_precision == "ieee"
            assert not torch.is_autocast_enabled("cuda")
        assert matmul.fp32_precision == "tf32"
    """)


def test_chunked_path_and_novelty_fallback_under_the_new_api():
    """The chunked path used to read the legacy getter on every call (a RuntimeError here)."""
    _run("""
        import torch
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.fp32_precision = "tf32"
        import g2rl_kernels
        from g2rl_kernels import reference
        from g2rl_kernels.ops import group_novelty_op as op
        h, w = torch.randn(40, 32), torch.randn(300, 32) * 0.3
        y = torch.randint(0, 300, (40,))
        kw = dict(seq_index=torch.arange(40) // 10, num_seqs=4)
        out = g2rl_kernels.sensitivity(h, w, y, _backend="triton", impl="chunked", **kw)
        ref = reference.sensitivity(h.double(), w.double(), y, **kw)
        torch.testing.assert_close(out.seq_features.double(), ref.seq_features, rtol=1e-5,
                                   atol=1e-6)
        feats, rewards = torch.randn(2, 4, 16), torch.randn(2, 4)
        op.group_novelty_torch(feats, rewards, 0.5, 3.0, 0, 1e-6, True, 0.01, 0.05, True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    """, TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1")
