"""Rule-based math rewards: the last ``\\boxed{...}`` answer checked with ``math-verify``.

Rewards are binary and mapped to {-1, +1} (method, section 3).
"""

from __future__ import annotations

import logging
import threading

__all__ = ["MATH_SYSTEM_PROMPT", "extract_boxed", "math_reward", "math_equal"]

MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

#: Seconds math-verify may spend parsing or comparing one answer (main thread only, see below).
VERIFY_TIMEOUT_S = 5

_BOXED_MARKERS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or ``None``.

    Braces nest: ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. An unclosed last box is
    ignored in favour of the previous complete one. ``\\boxed 5`` (no braces) gives ``5``.
    """
    best: str | None = None
    pos = 0
    while True:
        hits = [(text.find(m, pos), m) for m in _BOXED_MARKERS]
        hits = [(i, m) for i, m in hits if i >= 0]
        if not hits:
            return best
        start, marker = min(hits)
        j = start + len(marker)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        best = text[j + 1 : k].strip()
                        break
        elif j > start + len(marker) and j < len(text):  # "\boxed 5": one token up to space/$
            end = j
            while end < len(text) and text[end] not in " $\n":
                end += 1
            best = text[j:end].strip() or best
        pos = start + len(marker)


def _timeouts() -> int | None:
    # math-verify implements its timeouts with signal.alarm, which only works in the main
    # thread; elsewhere we disable them (the caller then owns the time limit).
    if threading.current_thread() is threading.main_thread():
        return VERIFY_TIMEOUT_S
    return None


def math_equal(prediction: str, gold: str) -> bool:
    """Whether the LaTeX answer ``prediction`` equals ``gold`` according to math-verify.

    Both are bare answers (e.g. ``"\\frac{1}{2}"``, ``"0.5"``); any error or timeout is False.
    """
    from math_verify import parse, verify

    timeout = _timeouts()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold_parsed = parse(_as_boxed(gold), parsing_timeout=timeout)
        pred_parsed = parse(_as_boxed(prediction), parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        # Gold first: math-verify's comparison is not symmetric.
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except BaseException as exc:  # noqa: BLE001 - TimeoutException is not an Exception subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def _as_boxed(answer: str) -> str:
    answer = answer.strip()
    if any(m in answer for m in _BOXED_MARKERS) or "$" in answer:
        return answer
    return "\\boxed{" + answer + "}"


def math_reward(completion: str, gold: str) -> float:
    """+1.0 if the last boxed answer of ``completion`` matches ``gold``, else -1.0.

    A completion without a ``\\boxed{}`` answer scores -1.0; so does any verifier error or
    timeout.
    """
    pred = extract_boxed(completion)
    if pred is None or not pred:
        return -1.0
    return 1.0 if math_equal(pred, gold) else -1.0
