"""pass@k against brute-force enumeration, maj@k against hand-computed votes."""

import random
from itertools import combinations
from math import comb

import pytest

from g2rl.metrics import maj_at_k, mean, mean_pass_at_k, normalize_answer, pass_at_k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_large_n_is_stable():
    n, c, k = 1000, 7, 100
    exact = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_maj_at_k_clear_majority():
    answers = ["2", "3", "2", "2", "3"]
    correct = [True, False, True, True, False]
    assert maj_at_k(answers, correct, 5) == 1.0
    assert maj_at_k(answers, correct, 2, random.Random(0)) in (0.0, 1.0)
    # only the first k samples vote: first 2 are a tie "2" vs "3" -> expectation 0.5
    assert maj_at_k(answers, correct, 2) == 0.5
    assert maj_at_k(["5", "5", "2"], [False, False, True], 3) == 0.0


def test_maj_at_k_none_does_not_vote():
    answers = [None, None, None, "7"]
    correct = [False, False, False, True]
    assert maj_at_k(answers, correct, 4) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    assert maj_at_k(["", " "], [False, False], 2) == 0.0


def test_maj_at_k_whitespace_insensitive():
    assert normalize_answer(" 1 + 2 ") == "1+2"
    assert maj_at_k(["1 + 2", "1+2", "3"], [True, True, False], 3) == 1.0


def test_maj_at_k_random_tie_break_is_uniform():
    answers, correct = ["a", "b", "c"], [True, False, False]
    rng = random.Random(123)
    draws = [maj_at_k(answers, correct, 3, rng) for _ in range(3000)]
    assert mean(draws) == pytest.approx(1 / 3, abs=0.04)
    assert maj_at_k(answers, correct, 3) == pytest.approx(1 / 3)


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)


def test_mean_helpers():
    assert mean([]) == 0.0
    assert mean([1, 2, 3]) == 2.0
    assert mean_pass_at_k([(4, 1), (4, 0)], 2) == pytest.approx(0.25)
