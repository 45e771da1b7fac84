"""group_novelty (compiled extension) vs the plain PyTorch reference composition, CPU, float32.

Run: pytest benchmarks/test_bench_group_novelty.py --benchmark-only
Each shape is one benchmark group, so the two implementations are timed in the same run and
pytest-benchmark prints them side by side; the ratio is reference time / extension time.
"""

from __future__ import annotations

import pytest
import torch

import g2rl_kernels
from g2rl_kernels import reference

SHAPES = [(64, 16, 128), (64, 16, 2048), (512, 8, 4096)]
IMPLS = {"extension": g2rl_kernels.group_novelty, "reference": reference.group_novelty}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-G{}-d{}".format(*s))
def test_group_novelty_cpu(benchmark, shape, impl):
    B, G, d = shape
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(B, G, d, generator=gen)
    rewards = torch.randint(0, 2, (B, G), generator=gen).float() * 2 - 1
    fn = IMPLS[impl]
    benchmark.group = f"group_novelty cpu float32 B={B} G={G} d={d}"
    benchmark.extra_info.update(B=B, G=G, d=d, impl=impl, threads=torch.get_num_threads())
    for _ in range(3):  # warm-up outside the timing
        fn(feats, rewards)
    out = benchmark(fn, feats, rewards)
    assert out.advantages.shape == (B, G)
