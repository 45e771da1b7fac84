"""Evaluation metrics (method, section 6): pass@1, unbiased pass@k and maj@k."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["pass_at_k", "maj_at_k", "mean", "mean_pass_at_k", "normalize_answer"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n - c, k) / C(n, k)``: the probability that ``k`` samples drawn without replacement
    from the ``n`` contain at least one correct one. Computed as the stable product
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (no huge binomials).
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def normalize_answer(answer: str | None) -> str | None:
    """Voting key of an answer: whitespace removed; empty or ``None`` -> ``None``."""
    if answer is None:
        return None
    key = "".join(answer.split())
    return key or None


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    rng: random.Random | None = None,
) -> float:
    """Majority-vote accuracy over the first ``k`` samples of one prompt.

    Answers are compared after :func:`normalize_answer` (whitespace ignored). Samples without
    an answer (``None``) do not vote; if none of the ``k`` has an answer the vote fails (0.0).
    The winner is the most frequent answer; a tie is broken uniformly at random with ``rng``,
    or, with ``rng=None``, the expectation over that random choice is returned (the share of
    correct answers among the tied ones). An answer counts as correct if the first sample
    that gave it was correct (correctness is a function of the final answer for rule-based
    verifiers).

    Args:
        answers: ``n >= k`` extracted final answers (or ``None``).
        correct: ``n`` correctness flags of the same samples.
        k: number of samples that vote.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    votes: Counter[str] = Counter()
    answer_correct: dict[str, bool] = {}
    for ans, ok in zip(answers[:k], correct[:k], strict=True):
        key = normalize_answer(ans)
        if key is None:
            continue
        votes[key] += 1
        answer_correct.setdefault(key, bool(ok))
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]  # in order of first appearance
    if rng is None:
        return sum(answer_correct[a] for a in tied) / len(tied)
    return float(answer_correct[rng.choice(tied)])


def mean(xs: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for an empty input."""
    total, count = 0.0, 0
    for x in xs:
        total += float(x)
        count += 1
    return total / count if count else 0.0


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean over prompts of :func:`pass_at_k` given ``(n, c)`` per prompt."""
    return mean(pass_at_k(n, c, k) for n, c in counts)
