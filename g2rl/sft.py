"""The short supervised warm-start on a built-in task (cross-entropy on response tokens).

Each step draws ``batch_size`` training problems and one correct completion of each from the
task's ``sft_solution``: for subset-sum uniformly among all correct completions
(:func:`g2rl.tasks.subset_sum.sample_solution`), so the warm-started policy spreads its mass over
the many correct answers; for Countdown the one trace chosen for that problem, which shows
``/`` rarely (:func:`g2rl.tasks.countdown.sft_pick`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from g2rl.data import Example, encode_prompt
from g2rl.tasks import subset_sum

#: ``(answer, rng, seed) -> completion``: the SFT trace of a problem
SolutionFn = Callable[[str, random.Random, int], str]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite."""


def _subset_sum_solution(answer: str, rng: random.Random, seed: int) -> str:
    return subset_sum.sample_solution(answer, rng)


def sft_batch(
    tokenizer: Any, examples: Sequence[Example], rng: random.Random, system_prompt: str | None,
    device: torch.device, solution_fn: SolutionFn = _subset_sum_solution, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` (B, L), ``attention_mask`` (B, L) and ``labels`` (B, L)
    (-100 outside the response; HF shifts them). ``solution_fn(answer, rng, seed)`` gives the
    completion shown for a problem (default: subset-sum's, uniform over its solutions)."""
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt, system_prompt)
        answer = solution_fn(ex.answer, rng, seed)
        resp = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(prompt + resp)
        labels.append([-100] * len(prompt) + resp)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device), lab.to(device)


def run_sft(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    system_prompt: str | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    solution_fn: SolutionFn = _subset_sum_solution,
) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` AdamW steps (cosine decay, 10% warm-up).

    Returns the per-step losses. Raises :class:`NonFiniteLossError` on a NaN/inf loss and
    ``KeyboardInterrupt`` when ``should_stop()`` turns true.
    """
    if steps <= 0:
        return []
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    rng = random.Random(f"g2rl-sft:{seed}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 10)

    def schedule(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))) * 0.9 + 0.1

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    pos = 0
    bar = tqdm(range(steps), desc="sft", disable=not progress, dynamic_ncols=True)
    for i in bar:
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt
        if pos + batch_size > len(order):
            rng.shuffle(order)
            pos = 0
        batch = [examples[j] for j in order[pos : pos + batch_size]]
        pos += batch_size
        ids, mask, labels = sft_batch(tokenizer, batch, rng, system_prompt, device,
                                      solution_fn=solution_fn, seed=seed)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"SFT step {i + 1}: loss is {float(loss)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses
