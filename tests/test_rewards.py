"""The math verifier: boxed-answer extraction and math-verify equivalence, rewards in {-1, +1}."""

import threading

import pytest

from g2rl.rewards import MATH_SYSTEM_PROMPT, extract_boxed, math_equal, math_reward


def test_system_prompt_is_the_papers():
    assert MATH_SYSTEM_PROMPT == (
        "Please reason step by step, and put your final answer within \\boxed{}."
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("nested \\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed{1} then unclosed \\boxed{2", "1"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 is it", "5"),
        ("no box here", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("The answer is \\boxed{0.5}", "\\frac{1}{2}"),
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
        ("thus \\boxed{x^2 + 1}", "1 + x^2"),
        ("\\boxed{42}", "42"),
        ("\\boxed{\\sqrt{4}}", "2"),
        ("work... \\boxed{7} wait, no: \\boxed{12}", "12"),
    ],
)
def test_correct_answers_score_plus_one(completion, gold):
    assert math_reward(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("The answer is \\boxed{0.6}", "\\frac{1}{2}"),
        ("\\boxed{43}", "42"),
        ("The answer is 42", "42"),  # no boxed answer
        ("\\boxed{}", "42"),
        ("\\boxed{12} wait, no: \\boxed{7}", "12"),  # the last box counts
        ("\\boxed{\\frac{1}{", "1"),  # malformed
    ],
)
def test_wrong_or_missing_answers_score_minus_one(completion, gold):
    assert math_reward(completion, gold) == -1.0


def test_garbage_gold_never_raises():
    assert math_reward("\\boxed{1}", "\\frac{{{") in (-1.0, 1.0)
    assert math_equal("1", "") is False


def test_works_outside_the_main_thread():
    # math-verify's timeouts use signal.alarm, which fails outside the main thread.
    results = []

    def work():
        results.append(math_reward("\\boxed{0.5}", "\\frac{1}{2}"))
        results.append(math_reward("\\boxed{3}", "4"))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert results == [1.0, -1.0]
