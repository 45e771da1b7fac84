"""float32 products that stay float32: shared by the CUDA paths that call torch matmuls (the
chunked sensitivity path and the group-novelty fallback).

torch may lower a float32 CUDA matmul to TF32 (a user's ``allow_tf32`` or ``fp32_precision``
setting) and an autocast region runs matmuls in 16 bits; both would cost about three decimal
digits. :func:`ieee_float32_matmul` switches TF32 off for its duration through whichever API
this torch has (``torch.backends.cuda.matmul.fp32_precision`` on torch >= 2.9, whose getters
refuse to be mixed with the legacy ones, else ``allow_tf32``) and restores it. The setting is
process-wide: another thread's float32 CUDA matmuls also run without TF32 meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def ieee_float32_matmul(active: bool) -> Iterator[None]:
    """Full float32 CUDA matmuls inside (no TF32) when ``active``; otherwise nothing."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    if not active:
        yield
        return
    old = getattr(matmul, name)
    setattr(matmul, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        setattr(matmul, name, old)


@contextlib.contextmanager
def float32_products(device_type: str, exact_fp32: bool) -> Iterator[None]:
    """No autocast on ``device_type`` inside, and (``exact_fp32`` on CUDA) no TF32."""
    with torch.autocast(device_type, enabled=False), \
            ieee_float32_matmul(exact_fp32 and device_type == "cuda"):
        yield
