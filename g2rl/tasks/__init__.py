"""The built-in tasks behind one small interface (:class:`Task`): a third task is one new file.

- ``subset-sum`` (:mod:`g2rl.tasks.subset_sum`, the default): pick digits that add up to the
  target; many correct answers, every one reachable from the warm start.
- ``countdown`` / ``countdown5`` (:mod:`g2rl.tasks.countdown`): reach the target from four
  (five) numbers with ``+ - * /`` step by step; the warm start under-samples the solutions
  that need ``/`` (the exploration study, ``docs/countdown_study.md``).

A task gives: problems (:attr:`Task.make_examples`), an exact verifier (:attr:`Task.reward`),
the canonical solution of a completion (:attr:`Task.extract_answer`: equal strings are the
same solution), the SFT problems and the one trace shown for each, and optionally a strategy
class per problem and a tag per solution (for the per-class reports).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from g2rl.data import Example


@dataclass(frozen=True)
class Task:
    """One built-in task.

    Attributes:
        name: the ``--task`` value.
        make_examples: ``(split, n, seed) -> list[Example]``, ``split`` "train" or "test";
            the splits are disjoint.
        reward: ``(completion, answer) -> +1.0 / -1.0``.
        extract_answer: ``completion -> canonical solution text or None``.
        sft_solution: ``(answer, rng, seed) -> completion text`` shown to the SFT warm start.
        sft_filter: ``(examples, seed) -> the examples the SFT warm start sees``.
        problem_class: ``answer -> class label`` (None: the task has no classes).
        rare_strategy: ``canonical solution -> bool``: uses the under-sampled strategy
            (None: no such strategy).
        rare_name: what :attr:`rare_strategy` tests, for reports (e.g. "/").
        max_new_tokens: the default response length in tokens.
        classes: the class labels in report order.
        sft_steps: the default length of the SFT warm start (``--sft-steps``), calibrated
            for the tiny model (README, "Tasks").
    """

    name: str
    make_examples: Callable[[str, int, int], list[Example]]
    reward: Callable[[str, str], float]
    extract_answer: Callable[[str], str | None]
    sft_solution: Callable[[str, random.Random, int], str]
    sft_filter: Callable[[Sequence[Example], int], list[Example]]
    problem_class: Callable[[str], str] | None = None
    rare_strategy: Callable[[str], bool] | None = None
    rare_name: str = ""
    max_new_tokens: int = 12
    classes: tuple[str, ...] = ()
    sft_steps: int = 250


def _subset_sum() -> Task:
    from g2rl.tasks import subset_sum as ss

    return Task(
        name="subset-sum", make_examples=ss.make_examples, reward=ss.reward,
        extract_answer=ss.extract_answer,
        sft_solution=lambda answer, rng, seed: ss.sample_solution(answer, rng),
        sft_filter=lambda examples, seed: list(examples), max_new_tokens=12,
    )


def _countdown(setting: str, *, division_weight: float | None = None,
               keep_b_only: float | None = None) -> Task:
    from functools import partial

    from g2rl.tasks import countdown as cd

    weight = cd.SFT_DIVISION_WEIGHT if division_weight is None else division_weight
    keep = cd.SFT_KEEP_B_ONLY if keep_b_only is None else keep_b_only

    def sft_solution(answer: str, rng: random.Random, seed: int) -> str:
        return cd.render_steps(cd.sft_pick(answer, seed, division_weight=weight))

    def sft_filter(examples: Sequence[Example], seed: int) -> list[Example]:
        return [ex for ex in examples if cd.sft_keep(ex.answer, seed, keep_b_only=keep)]

    return Task(
        name=setting, make_examples=partial(cd.make_examples, setting=setting),
        reward=cd.reward, extract_answer=cd.extract_answer, sft_solution=sft_solution,
        sft_filter=sft_filter, problem_class=cd.problem_class,
        rare_strategy=lambda canon: "/" in canon, rare_name="/",
        max_new_tokens=cd.max_new_tokens(setting), classes=("A", "B", "both"),
        sft_steps=cd.SFT_STEPS[setting],
    )


#: ``--task`` name -> a function that builds the task (imported lazily)
_BUILDERS: dict[str, Callable[..., Task]] = {
    "subset-sum": lambda **_: _subset_sum(),
    "countdown": lambda **kw: _countdown("countdown", **kw),
    "countdown5": lambda **kw: _countdown("countdown5", **kw),
}
TASK_NAMES = tuple(_BUILDERS)


def get_task(name: str, *, division_weight: float | None = None,
             keep_b_only: float | None = None) -> Task:
    """The built-in task ``name`` (one of :data:`TASK_NAMES`); ValueError otherwise.

    ``division_weight`` and ``keep_b_only`` set Countdown's SFT traces (see
    :func:`g2rl.tasks.countdown.sft_pick` and :func:`~g2rl.tasks.countdown.sft_keep`); other
    tasks ignore them.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return _BUILDERS[name](division_weight=division_weight, keep_b_only=keep_b_only)
