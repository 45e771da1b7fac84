"""Rule-based math rewards: the last ``\\boxed{...}`` answer checked with ``math-verify``.

Rewards are binary and mapped to {-1, +1} (method, section 3).

Model outputs can be hostile to the verifier: a power tower, thousands of nested brackets or a
sum of twenty thousand ones each kept math-verify busy for its whole timeout (5 s), in the
trainer's process, one after another. Every answer therefore passes, in order:

1. text guards, before any parsing (microseconds): the answer's length and bracket nesting
   depth (the parser's time grows with both; ~0.1 s per nesting level), and towers of
   exponents with variables (``e^{-x^{x^x}}``, up to a second to parse, refused below anyway);
2. structure guards on the parsed, still unevaluated expression, before the comparison: no
   number of more than ``MAX_DIGITS`` decimal digits (power towers, factorials and binomials
   of huge numbers, which sympy evaluates exactly) and no symbolic power tower of height 3 or
   more (``e^{-x^{x^x}}``). Each limit is raised to what the gold answer itself needs, so an
   answer shaped like its gold is never refused;
3. time limits per answer: ``DEFAULT_TIMEOUT_S`` seconds of CPU time (so that a busy machine
   does not turn slow correct answers into timeouts), and a wall-clock limit of
   ``3 x timeout + 1 s``. :func:`math_rewards` verifies in worker processes
   (:mod:`g2rl.verifier_pool`); a worker past the wall-clock limit (stuck in C code that
   ignores signals) is killed and replaced, so no answer can stall the caller.

A guarded, timed-out or crashed answer scores -1 (wrong). :func:`score_math` also counts them.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MATH_SYSTEM_PROMPT", "DEFAULT_TIMEOUT_S", "BatchScores", "extract_boxed", "guard_text",
    "math_equal", "math_reward", "math_rewards", "score_batch", "score_math", "trl_math_reward",
]

MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

#: CPU seconds one answer may take (parse gold and answer, compare); normal answers take under
#: 0.1 s once the parser is warm (math-verify's own default was 5 s per parse and per compare).
#: In worker processes the wall-clock limit is ``WALL_FACTOR * timeout + 1 s``.
DEFAULT_TIMEOUT_S = 2.0
WALL_FACTOR = 3.0
#: Kept for compatibility: the old per-call math-verify timeout (seconds).
VERIFY_TIMEOUT_S = 5

#: Text guards: an answer longer than this (characters) or nested deeper than this (brackets
#: ``( [ {`` together) is not parsed, unless its gold answer is itself as long or as deep.
MAX_ANSWER_CHARS = 1000
MAX_NESTING = 20
#: Structure guards: no number of more decimal digits than this, no symbolic tower this high.
MAX_DIGITS = 100_000
MAX_TOWER = 3

_BOXED_MARKERS = ("\\boxed", "\\fbox")
_BRACE = re.compile(r"[{}]")


# ---------------------------------------------------------------------- answer extraction
def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or ``None``.

    Braces nest: ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. An unclosed last box is
    ignored in favour of the previous complete one. ``\\boxed 5`` (no braces) gives ``5``.
    The last box is the one that starts last (an inner box wins over the box around it).
    Linear in ``len(text)``, whatever the text.
    """
    starts = []
    for marker in _BOXED_MARKERS:
        i = text.find(marker)
        while i >= 0:
            starts.append((i, len(marker)))
            i = text.find(marker, i + 1)
    if not starts:
        return None
    close = _matching_braces(text)
    for start, size in sorted(starts, reverse=True):
        j = start + size
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = close.get(j)
            if end is not None:
                return text[j + 1 : end].strip()
        elif j > start + size and j < len(text):  # "\boxed 5": one token up to space/$
            end = j
            while end < len(text) and text[end] not in " $\n":
                end += 1
            found = text[j:end].strip()
            if found:
                return found
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each ``{`` -> position of its matching ``}`` (unmatched ones absent)."""
    out: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            out[stack.pop()] = m.start()
    return out


# ---------------------------------------------------------------------- guards
def nesting_depth(text: str) -> int:
    """Deepest nesting of the brackets ``( [ {`` (closers of any kind close any opener)."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in ")]}" and depth:
            depth -= 1
    return best


def power_tower(text: str) -> int:
    """Height of the highest tower of exponents that contain a variable, read from the LaTeX
    text (``x^{x^x}``: 2, ``e^{-x^{x^x}}``: 3, ``e^{x^2}``: 1, ``2^{2^{2}}``: 0). A variable is
    a Latin letter other than e and i outside a command. Braced exponents only: the
    structure guard sees the rest after parsing."""
    return _tower_text(text, 0, len(text))


def _tower_text(text: str, start: int, end: int) -> int:
    best, k = 0, start
    while k < end:
        if text[k] != "^":
            k += 1
            continue
        a = k + 1
        while a < end and text[a] == " ":
            a += 1
        if a < end and text[a] == "{":
            depth, b = 0, a
            while b < end:
                depth += {"{": 1, "}": -1}.get(text[b], 0)
                if depth == 0:
                    break
                b += 1
            inner = _tower_text(text, a + 1, b)
            lo, hi = a + 1, b
        else:
            inner, lo, hi = 0, a, min(a + 1, end)
            b = a
        best = max(best, inner + 1 if _has_variable(text, lo, hi) else inner)
        k = b + 1
    return best


def _has_variable(text: str, start: int, end: int) -> bool:
    k = start
    while k < end:
        ch = text[k]
        if ch == "\\":  # skip a command name
            k += 1
            while k < end and text[k].isalpha():
                k += 1
            continue
        if ch.isascii() and ch.isalpha() and ch not in "ei":
            return True
        k += 1
    return False


def guard_text(pred: str, gold: str) -> str | None:
    """Why ``pred`` must not be parsed (a short reason), or ``None``. Cheap: a few passes over
    at most ``MAX_ANSWER_CHARS`` characters (plus the gold's)."""
    limit = max(MAX_ANSWER_CHARS, 2 * len(gold))
    if len(pred) > limit:
        return f"answer of {len(pred)} characters (limit {limit})"
    depth, gold_depth = nesting_depth(pred), nesting_depth(gold)
    limit = max(MAX_NESTING, gold_depth + 10)
    if depth > limit:
        return f"brackets nested {depth} deep (limit {limit})"
    tower = power_tower(pred)
    if tower >= MAX_TOWER and tower > power_tower(gold):
        return f"a power tower of height {tower} (limit {max(MAX_TOWER - 1, power_tower(gold))})"
    return None


def guard_parsed(pred: Sequence[Any], gold: Sequence[Any]) -> str | None:
    """Why the parsed answer ``pred`` must not be compared (math-verify's parse results, still
    unevaluated), or ``None``: a number too large to evaluate exactly, or a symbolic power
    tower. Cheap: one walk over the expression tree, in floating point."""
    digits, tower = _measure(pred)
    gold_digits, gold_tower = _measure(gold)
    limit = max(MAX_DIGITS, 2 * gold_digits)
    if digits > limit:
        shown = f"{digits:.3g}" if math.isfinite(digits) else "astronomically many"
        return f"a number of {shown} digits (limit {limit:.3g})"
    if tower >= MAX_TOWER and tower > gold_tower:
        return f"a power tower of height {tower} (limit {max(MAX_TOWER - 1, gold_tower)})"
    return None


def _measure(parsed: Sequence[Any]) -> tuple[float, int]:
    """(most decimal digits of any exact number, highest symbolic power tower) over
    math-verify parse results (sympy expressions, matrices, strings)."""
    digits, tower = 0.0, 0
    for item in parsed:
        for expr in _expressions(item):
            largest = [0.0]
            _log10_size(expr, largest)
            digits = max(digits, largest[0])
            tower = max(tower, _tower(expr))
    return digits, tower


def _expressions(item: Any) -> Iterator[Any]:
    from sympy import Basic, MatrixBase

    if isinstance(item, MatrixBase):
        for x in item:
            yield from _expressions(x)
    elif isinstance(item, Basic):
        yield item


def _log10_size(expr: Any, largest: list[float]) -> float | None:
    """An upper estimate of log10 |value| of the exact number ``expr`` evaluates to (``inf``
    when astronomically large), ``None`` when it is not an exact number (symbols, floats,
    functions). The largest estimate of any sub-expression goes to ``largest[0]``."""
    from sympy import Float, Pow, Rational, binomial, factorial, factorial2, gamma, subfactorial

    sub = [_log10_size(a, largest) for a in expr.args]
    out: float | None = None
    if isinstance(expr, Rational):
        out = max(_log10_int(expr.p), _log10_int(expr.q))
    elif isinstance(expr, Pow):
        base, power = sub
        exponent = expr.args[1]
        if isinstance(exponent, Rational):  # a root or a literal power: its value counts
            power = math.log10(abs(exponent.p) / exponent.q) if exponent.p else -math.inf
        if base is not None and power is not None and not isinstance(expr.args[0], Float):
            # |base| in {0, 1}: size 0 (a rational base's size counts its denominator too)
            out = _antilog(power) * base if base > 0 else 0.0
    elif expr.func in (factorial, factorial2, subfactorial, gamma):
        if sub[0] is not None:
            n = _antilog(sub[0])
            out = n * math.log10(n) if n > 10 else 1.0
    elif expr.func == binomial:
        if sub[0] is not None:
            out = _antilog(sub[0]) * math.log10(2)
    elif (expr.is_Add or expr.is_Mul) and sub and all(x is not None for x in sub):
        out = sum(sub) if expr.is_Mul else max(sub) + math.log10(len(sub))
    if out is not None and out > largest[0]:
        largest[0] = out
    return out


def _log10_int(n: int) -> float:
    return math.log10(abs(n)) if n else 0.0


def _antilog(size: float) -> float:
    """The value whose log10 is ``size`` (``inf`` beyond floats)."""
    return 10.0 ** size if size < 300 else math.inf


def _tower(expr: Any) -> int:
    """Height of the highest power tower whose exponents contain symbols (``x^{x^x}``: 2,
    ``e^{-x^{x^x}}``: 3, ``e^{x^2}``: 1, numbers only: 0)."""
    from sympy import Pow, exp

    if not expr.args:
        return 0
    if isinstance(expr, (Pow, exp)):
        power = expr.args[-1]
        base_h = _tower(expr.args[0]) if isinstance(expr, Pow) else 0
        power_h = _tower(power)
        return max(base_h, power_h + 1 if power.free_symbols else power_h)
    return max(_tower(a) for a in expr.args)


# ---------------------------------------------------------------------- one answer
class AnswerTimeout(BaseException):
    """An answer ran past its time limit (a BaseException, so that math-verify's and sympy's
    ``except Exception`` clauses do not swallow it)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`AnswerTimeout` once this process has used ``seconds`` of CPU time
    (SIGPROF; main thread only, elsewhere no limit). It interrupts Python code, not a long
    call into C (the worker pool's wall-clock limit covers that)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise AnswerTimeout

    previous = signal.signal(signal.SIGPROF, handler)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def verify_answer(pred: str, gold: str, timeout_s: float | None) -> tuple[str, bool]:
    """``(status, correct)`` of one extracted answer, in this process.

    ``status``: ``"ok"`` (math-verify gave a verdict), ``"guarded"`` (a guard refused it),
    ``"timeout"`` or ``"error"``; ``correct`` is False unless the status is ``"ok"``. The time
    limit applies in the main thread only (see :func:`time_limit`).
    """
    if guard_text(pred, gold) is not None:
        return "guarded", False
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        with time_limit(timeout_s):
            gold_parsed = parse(_as_boxed(gold), parsing_timeout=None)
            pred_parsed = parse(_as_boxed(pred), parsing_timeout=None)
            if not gold_parsed or not pred_parsed:
                return "ok", False
            if guard_parsed(pred_parsed, gold_parsed) is not None:
                return "guarded", False
            # Gold first: math-verify's comparison is not symmetric.
            return "ok", bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except AnswerTimeout:
        return "timeout", False
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - any verifier failure scores as wrong
        return "error", False


def _as_boxed(answer: str) -> str:
    answer = answer.strip()
    if any(m in answer for m in _BOXED_MARKERS) or "$" in answer:
        return answer
    return "\\boxed{" + answer + "}"


def math_equal(prediction: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S
               ) -> bool:
    """Whether the LaTeX answer ``prediction`` equals ``gold`` according to math-verify.

    Both are bare answers (e.g. ``"\\frac{1}{2}"``, ``"0.5"``); a guarded answer, an error or a
    timeout is False. Runs in this process (time limit in the main thread only).
    """
    return verify_answer(prediction, gold, timeout_s)[1]


def math_reward(completion: str, gold: str) -> float:
    """+1.0 if the last boxed answer of ``completion`` matches ``gold``, else -1.0.

    A completion without a ``\\boxed{}`` answer scores -1.0; so does any guarded answer,
    verifier error or timeout. One answer, in this process; for a batch use
    :func:`math_rewards` (worker processes, wall-clock limits).
    """
    pred = extract_boxed(completion)
    if not pred:
        return -1.0
    return 1.0 if math_equal(pred, gold) else -1.0


# ---------------------------------------------------------------------- batches
@dataclass
class BatchScores:
    """Rewards of a batch and what happened to its answers (counts are over answers)."""

    rewards: list[float]
    #: answers whose (answer, gold) pair was verified (identical pairs are verified once)
    unique: int = 0
    no_answer: int = 0
    guarded: int = 0
    timed_out: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def unverified(self) -> int:
        """Answers scored -1 without a verdict: guarded, timed out or failed."""
        return self.guarded + self.timed_out + self.failed


def score_math(completions: Sequence[str], golds: Sequence[str], *,
               timeout_s: float | None = None, workers: int | None = None) -> BatchScores:
    """Math rewards of a batch with counts of guarded and timed-out answers.

    Args:
        completions: model outputs; the last ``\\boxed{}`` of each is its answer.
        golds: the gold answers, one per completion.
        timeout_s: CPU seconds per answer (default ``DEFAULT_TIMEOUT_S``); a worker that has
            not answered after ``WALL_FACTOR * timeout_s + 1`` seconds is killed.
        workers: verifier processes; ``None`` picks ``min(4, CPUs)``, 0 verifies in this
            process (the time limit then only holds in the main thread, for Python code).

    Returns:
        :class:`BatchScores`: one reward per completion (+1.0 / -1.0) and the counts.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    if not timeout > 0 or not math.isfinite(timeout):
        raise ValueError(f"the reward time limit must be a positive number of seconds, got "
                         f"{timeout_s!r} (--reward-timeout)")
    if workers is not None and workers < 0:
        raise ValueError(f"the number of reward workers must be >= 0, got {workers} "
                         "(--reward-workers)")
    t0 = time.perf_counter()
    out = BatchScores(rewards=[-1.0] * len(completions))
    keys: list[tuple[str, str] | None] = []
    todo: dict[tuple[str, str], tuple[str, bool]] = {}
    for text, gold in zip(completions, golds, strict=True):
        pred = extract_boxed(text)
        if not pred:
            keys.append(None)
            out.no_answer += 1
            continue
        key = (pred, str(gold))
        keys.append(key)
        if key not in todo:  # identical pairs are verified once
            todo[key] = ("guarded", False) if guard_text(*key) else ("", False)
    pending = [k for k, v in todo.items() if not v[0]]
    out.unique = len(todo)
    if pending:
        if workers == 0:
            results = [verify_answer(p, g, timeout) for p, g in pending]
        else:
            from g2rl.verifier_pool import shared_pool

            results = shared_pool(workers).verify(pending, timeout)
        todo.update(zip(pending, results, strict=True))
    for i, key in enumerate(keys):
        if key is None:
            continue
        status, ok = todo[key]
        out.rewards[i] = 1.0 if ok else -1.0
        if status == "guarded":
            out.guarded += 1
        elif status == "timeout":
            out.timed_out += 1
        elif status == "error":
            out.failed += 1
    out.seconds = time.perf_counter() - t0
    return out


def math_rewards(completions: Sequence[str], golds: Sequence[str], *,
                 timeout_s: float | None = None, workers: int | None = None) -> list[float]:
    """+1.0 / -1.0 for each completion (see :func:`math_reward`), verified in parallel worker
    processes with a wall-clock limit per answer; identical (answer, gold) pairs are verified
    once. :func:`score_math` returns the same rewards with counts of guarded and timed-out
    answers."""
    return score_math(completions, golds, timeout_s=timeout_s, workers=workers).rewards


def score_batch(reward_fn: Callable[[str, str], float], completions: Sequence[str],
                golds: Sequence[str], *, timeout_s: float | None = None,
                workers: int | None = None) -> BatchScores:
    """Rewards of a batch under ``reward_fn``: :func:`score_math` when ``reward_fn`` is
    :func:`math_reward` (or has a ``batch`` attribute of the same form), else one call per
    completion. A reward of ``None`` (the answer could not be scored) becomes NaN.
    ``timeout_s`` and ``workers`` only apply to the math reward."""
    batch = getattr(reward_fn, "batch", None)
    if batch is not None:
        return batch(completions, golds, timeout_s=timeout_s, workers=workers)
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    t0 = time.perf_counter()
    rewards = []
    for text, gold in zip(completions, golds, strict=True):
        r = reward_fn(text, gold)
        rewards.append(math.nan if r is None else float(r))
    return BatchScores(rewards=rewards, unique=len(rewards), seconds=time.perf_counter() - t0)


def trl_math_reward(prompts: Sequence[Any] | None = None,
                    completions: Sequence[Any] | None = None, **columns: Any) -> list[float]:
    """A TRL reward function (``GRPOTrainer(reward_funcs=[trl_math_reward])``, also with
    :class:`g2rl.integrations.trl.G2RLGRPOTrainer`): :func:`math_rewards` of the completions
    against the dataset's ``answer`` column (or ``solution``). Completions may be strings or
    conversations (lists of ``{"role", "content"}`` messages; the last one is scored)."""
    golds = columns.get("answer", columns.get("solution"))
    if completions is None or golds is None:
        raise ValueError("trl_math_reward needs the completions and an 'answer' (or "
                         "'solution') column in the dataset")
    texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
    return math_rewards(texts, [str(g) for g in golds])


math_reward.batch = score_math  # type: ignore[attr-defined]
