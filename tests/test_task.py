"""The built-in task: problems, the verifier, canonical answers, splits."""

import random

import pytest

from g2rl import task


def test_reward_accepts_every_correct_form():
    ans = "35817:12"  # digits 3 5 8 1 7, target 12
    for completion in ("5+7", "7+5", "3+8+1", "1+8+3", " 8 + 1 + 3 ", "3+1+8"):
        assert task.reward(completion, ans) == 1.0, completion


@pytest.mark.parametrize("completion", [
    "5+8",        # wrong sum
    "12",         # a single term (not a digit of the list either)
    "6+6",        # 6 is not listed
    "3+3+3+3",    # 3 listed once
    "5+7=12",     # trailing text
    "",           # empty
    "5+",         # malformed
    "abc",
])
def test_reward_rejects(completion):
    assert task.reward(completion, "35817:12") == -1.0


def test_repeated_digits_can_be_used_as_often_as_listed():
    assert task.reward("4+4", "44123:8") == 1.0
    assert task.reward("4+4", "41123:8") == -1.0


def test_extract_answer_is_order_free():
    assert task.extract_answer("8+1+3") == task.extract_answer("3+1+8") == "1+3+8"
    assert task.extract_answer("5+7 ") == "5+7"
    assert task.extract_answer("5 plus 7") is None


def test_malformed_answer_is_an_error():
    with pytest.raises(ValueError, match="malformed answer"):
        task.reward("1+2", "12")


def test_examples_are_deterministic_solvable_and_split():
    a = task.make_examples("train", 300, seed=0)
    assert a == task.make_examples("train", 300, seed=0)
    assert a != task.make_examples("train", 300, seed=1)
    test = task.make_examples("test", 300, seed=0)
    assert not {e.answer for e in a} & {e.answer for e in test}
    assert len({e.answer for e in a}) == 300
    rng = random.Random(0)
    multi = several = 0
    for ex in a + test:
        sols = task.solutions(ex.answer)
        assert sols, ex
        assert task.reward(task.sample_solution(ex.answer, rng), ex.answer) == 1.0
        assert all(task.reward(s, ex.answer) == 1.0 for s in sols)
        digits, target = ex.answer.split(":")
        assert ex.prompt == " ".join(digits) + f">{target}"
        multi += len({task.extract_answer(s) for s in sols}) > 1
        several += len(sols) > 1
    # nearly every problem has several correct completions, a third several distinct subsets
    assert several > 0.9 * len(a + test)
    assert multi > 0.3 * len(a + test)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        task.make_examples("validation", 3, seed=0)
