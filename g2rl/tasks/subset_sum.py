"""Subset-sum (the default task): pick some of the given digits that add up to the target.

A problem lists ``NUM_DIGITS`` digits (1-9, repeats allowed) and a target, e.g. the prompt
``"3 5 8 1 7>12"``. A completion is a sum of some of those digits, e.g. ``"8+1+3"``, ``"5+7"``
or ``"7+5"``: every digit used at most as often as it is listed, at least two terms, and the
sum equal to the target. Nearly every problem has several correct completions (every subset
in several orders) and about a third have several distinct correct subsets, so there are many
distinct correct answers; a rule checks them exactly.

The gold ``answer`` of an :class:`~g2rl.data.Example` is the problem itself, ``"35817:12"``
(digits, colon, target): the verifier needs the digits and the target, not one solution.
The train and test splits are disjoint (a problem's split is a hash of its digits and target).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from itertools import combinations

from g2rl.data import Example

NUM_DIGITS = 5
MIN_TERMS, MAX_TERMS = 2, 3
SPLITS = ("train", "test")

_COMPLETION = re.compile(r"^\s*([1-9](?:\s*\+\s*[1-9])*)\s*$")


def _split_of(digits: tuple[int, ...], target: int) -> str:
    h = hashlib.sha256(f"{''.join(map(str, digits))}:{target}".encode()).digest()
    return "test" if h[0] < 52 else "train"  # about 20% of problems are held out


def _prompt(digits: tuple[int, ...], target: int) -> str:
    return " ".join(map(str, digits)) + f">{target}"


def make_examples(split: str, n: int, seed: int) -> list[Example]:
    """``n`` distinct problems of ``split`` ("train" or "test"), a function of ``seed`` only.

    Each target is the sum of a random subset of ``MIN_TERMS``..``MAX_TERMS`` of the digits, so
    every problem has at least one solution.
    """
    if split not in SPLITS:
        raise ValueError(f"built-in task: split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"built-in task: n must be >= 0, got {n}")
    rng = random.Random(f"g2rl-task:{split}:{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"built-in task: cannot draw {n} distinct {split} problems")
        digits = tuple(rng.randint(1, 9) for _ in range(NUM_DIGITS))
        k = rng.randint(MIN_TERMS, MAX_TERMS)
        target = sum(rng.sample(digits, k))
        key = "".join(map(str, digits)) + f":{target}"
        if key in seen or _split_of(digits, target) != split:
            continue
        seen.add(key)
        out.append(Example(prompt=_prompt(digits, target), answer=key))
    return out


def _parse_answer(answer: str) -> tuple[list[int], int]:
    digits, _, target = answer.partition(":")
    if not digits.isdigit() or not target.isdigit():
        raise ValueError(f"built-in task: malformed answer {answer!r} (expected 'DIGITS:TARGET')")
    return [int(c) for c in digits], int(target)


def extract_answer(completion: str) -> str | None:
    """The canonical form of a well-formed completion (terms sorted: ``"1+3+8"``), else None.

    Two completions with the same multiset of terms are the same answer (for maj@k).
    """
    m = _COMPLETION.match(completion)
    if m is None:
        return None
    terms = sorted(int(t) for t in re.findall(r"[1-9]", m.group(1)))
    return "+".join(map(str, terms))


def reward(completion: str, answer: str) -> float:
    """+1.0 if ``completion`` solves the problem ``answer`` ("DIGITS:TARGET"), else -1.0."""
    digits, target = _parse_answer(answer)
    canon = extract_answer(completion)
    if canon is None:
        return -1.0
    terms = [int(t) for t in canon.split("+")]
    if len(terms) < MIN_TERMS or sum(terms) != target:
        return -1.0
    if Counter(terms) - Counter(digits):  # uses a digit more often than it is listed
        return -1.0
    return 1.0


def solutions(answer: str) -> list[str]:
    """Every correct completion (each subset in each order) of the problem ``answer``."""
    digits, target = _parse_answer(answer)
    found: set[tuple[int, ...]] = set()
    for k in range(MIN_TERMS, MAX_TERMS + 1):
        for idx in combinations(range(len(digits)), k):
            terms = [digits[i] for i in idx]
            if sum(terms) == target:
                found.update(_orders(terms))
    return sorted("+".join(map(str, t)) for t in found)


def _orders(terms: list[int]) -> set[tuple[int, ...]]:
    from itertools import permutations

    return set(permutations(terms))


def sample_solution(answer: str, rng: random.Random) -> str:
    """One correct completion, drawn uniformly from :func:`solutions` (for the SFT warm-start)."""
    sols = solutions(answer)
    if not sols:
        raise ValueError(f"built-in task: problem {answer!r} has no solution")
    return rng.choice(sols)
