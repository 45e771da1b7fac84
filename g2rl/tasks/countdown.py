"""Countdown, step by step: combine the given numbers with ``+ - * /`` to reach the target.

A problem lists four numbers from 2-9 (five for ``countdown5``, repeats allowed, sorted) and a
target, e.g. the prompt ``"2 5 6 8>25"``. A completion is a comma-separated list of steps
``a<op>b=c``, e.g. ``"6*2=12,12+5=17,17+8=25"``:

- every given number is used exactly once, and every intermediate result at most once after
  the step that makes it (a step's operands are taken from the pool of unused values);
- every result is an integer in 1-50: subtraction takes the larger minus the smaller (the
  result is >= 1), division only when exact;
- the last result is the target and nothing else is left in the pool.

The reward is binary and exact (+1 / -1, no partial credit).

**Solution identity.** Two answers are the same solution when their expression trees are equal
up to the order of the operands of ``+`` and ``*`` and the regrouping of chains of ``+`` and of
``*``: ``6*2=12,12+5=17,17+8=25`` and ``8+5=13,2*6=12,13+12=25`` are both ``(2*6)+5+8``.
:func:`extract_answer` gives that canonical form (where an operand value exists twice in the
pool, e.g. a given 6 and a made 6, the step takes the most recently made one).

**Strategy classes.** A problem is ``"A"`` when every solution avoids ``/``, ``"B"`` when every
solution uses it, ``"both"`` otherwise (:func:`problem_class`). The gold ``answer`` of an
:class:`~g2rl.data.Example` is the problem, ``"2568:25"`` (numbers, colon, target).

Every problem is reachable by construction: its target is drawn among the values the numbers
can make. The problems are all (multiset, target) pairs with at least one solution; a hash of
the pair puts about 20% of them in the test split.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from functools import lru_cache
from itertools import combinations_with_replacement, permutations

from g2rl.data import Example

SPLITS = ("train", "test")
LOW, HIGH = 2, 9  # the given numbers
MAX_VALUE = 50  # every intermediate result is in 1..MAX_VALUE
OPS = "+-*/"

#: problem sizes: name -> (count of numbers, lowest target, highest target)
SETTINGS = {"countdown": (4, 10, 40), "countdown5": (5, 10, 50)}

_NUM = r"([1-9][0-9]{0,2})"  # ASCII digits, no leading zero
_STEP = re.compile(rf"^\s*{_NUM}\s*([-+*/])\s*{_NUM}\s*=\s*{_NUM}\s*$", re.ASCII)

# A canonical expression: an int leaf, or (op, children) with op in "+*" (children a sorted
# tuple, no child of the same op: chains flattened) or in "-/" (exactly two children, ordered).
Expr = int | tuple


def render(e: Expr) -> str:
    """The canonical text of an expression, e.g. ``"((2*6)+5+8)"``; a leaf is its number."""
    if isinstance(e, int):
        return str(e)
    op, kids = e
    return "(" + op.join(render(k) for k in kids) + ")"


def combine(op: str, a: Expr, b: Expr) -> Expr:
    """The canonical expression of ``a op b`` (flattening chains of ``+`` and of ``*``)."""
    if op in "+*":
        kids: list[Expr] = []
        for x in (a, b):
            if isinstance(x, tuple) and x[0] == op:
                kids.extend(x[1])
            else:
                kids.append(x)
        return (op, tuple(sorted(kids, key=render)))
    return (op, (a, b))


def apply(op: str, a: int, b: int) -> int | None:
    """``a op b`` under the task's rules (None when the step is not allowed)."""
    if op == "+":
        c = a + b
    elif op == "*":
        c = a * b
    elif op == "-":
        c = a - b  # larger minus smaller: a result >= 1 is required below
    elif op == "/":
        if b == 0 or a % b:
            return None
        c = a // b
    else:
        return None
    return c if 1 <= c <= MAX_VALUE else None


def uses_division(e: Expr) -> bool:
    if isinstance(e, int):
        return False
    return e[0] == "/" or any(uses_division(k) for k in e[1])


@lru_cache(maxsize=65536)
def _exprs(numbers: tuple[int, ...]) -> dict[int, frozenset]:
    """value -> canonical expressions over exactly the multiset ``numbers`` (sorted)."""
    if len(numbers) == 1:
        return {numbers[0]: frozenset([numbers[0]])}
    out: dict[int, set] = {}
    n = len(numbers)
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for mask in range(1, (1 << n) - 1):
        left = tuple(numbers[i] for i in range(n) if mask >> i & 1)
        right = tuple(numbers[i] for i in range(n) if not mask >> i & 1)
        if (left, right) in seen:
            continue
        seen.add((left, right))
        for va, ea in _exprs(left).items():
            for vb, eb in _exprs(right).items():
                for op in OPS:
                    c = apply(op, va, vb)
                    if c is None:
                        continue
                    bucket = out.setdefault(c, set())
                    for x in ea:
                        for y in eb:
                            bucket.add(combine(op, x, y))
    return {v: frozenset(es) for v, es in out.items()}


def parse_problem(answer: str) -> tuple[tuple[int, ...], int]:
    """``"2568:25"`` -> ((2, 5, 6, 8), 25). Raises ValueError on a malformed answer."""
    digits, _, target = answer.partition(":")
    if not digits.isdigit() or not target.isdigit() or not 4 <= len(digits) <= 5:
        raise ValueError(f"countdown: malformed answer {answer!r} (expected 'NUMBERS:TARGET', "
                         "e.g. '2568:25')")
    return tuple(sorted(int(c) for c in digits)), int(target)


def solution_exprs(answer: str) -> list[Expr]:
    """Every distinct solution (canonical expression) of the problem ``answer``, sorted."""
    numbers, target = parse_problem(answer)
    return sorted(_exprs(numbers).get(target, frozenset()), key=render)


def solutions(answer: str) -> list[str]:
    """The canonical texts of every distinct solution of ``answer``."""
    return [render(e) for e in solution_exprs(answer)]


def problem_class(answer: str) -> str:
    """``"A"`` (no solution uses ``/``), ``"B"`` (every one does) or ``"both"``."""
    div = [uses_division(e) for e in solution_exprs(answer)]
    if not div:
        raise ValueError(f"countdown: problem {answer!r} has no solution")
    return "B" if all(div) else ("both" if any(div) else "A")


def _split_of(numbers: tuple[int, ...], target: int) -> str:
    h = hashlib.sha256(f"countdown:{''.join(map(str, numbers))}:{target}".encode()).digest()
    return "test" if h[0] < 52 else "train"  # about 20% of problems are held out


@lru_cache(maxsize=4)
def all_problems(size: int, lo: int, hi: int) -> tuple[str, ...]:
    """Every solvable problem ``"NUMBERS:TARGET"`` of the setting, in a fixed order."""
    out = []
    for numbers in combinations_with_replacement(range(LOW, HIGH + 1), size):
        for target in sorted(_exprs(numbers)):
            if lo <= target <= hi:
                out.append("".join(map(str, numbers)) + f":{target}")
    return tuple(out)


def prompt_of(answer: str) -> str:
    numbers, target = parse_problem(answer)
    return " ".join(map(str, numbers)) + f">{target}"


def make_examples(split: str, n: int, seed: int, *, setting: str = "countdown") -> list[Example]:
    """Up to ``n`` distinct problems of ``split`` ("train" or "test") in an order that is a
    function of ``seed``: all of them when the split has fewer than ``n``."""
    if split not in SPLITS:
        raise ValueError(f"countdown: split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"countdown: n must be >= 0, got {n}")
    size, lo, hi = SETTINGS[setting]
    pool = [a for a in all_problems(size, lo, hi) if _split_of(*parse_problem(a)) == split]
    random.Random(f"g2rl-{setting}:{split}:{seed}").shuffle(pool)
    return [Example(prompt=prompt_of(a), answer=a) for a in pool[:n]]


def _pool_take(pool: list[tuple[int, Expr]], value: int) -> Expr | None:
    for i in range(len(pool) - 1, -1, -1):  # the most recently added entry of that value
        if pool[i][0] == value:
            return pool.pop(i)[1]
    return None


def _read(text: str, pool: list[tuple[int, Expr]], *, strict: bool
          ) -> list[tuple[int, Expr]] | None:
    """Apply the steps of ``text`` to ``pool`` ((value, expression) entries, in place); None
    on a malformed step or wrong arithmetic. ``strict``: every operand must be in the pool;
    otherwise an operand not in it is read as a given number."""
    text = text.strip()
    for step in text.split(",") if text else []:
        m = _STEP.match(step)
        if m is None:
            return None
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if apply(op, a, b) != c:
            return None
        ea, eb = _pool_take(pool, a), _pool_take(pool, b)
        if strict and (ea is None or eb is None):
            return None
        pool.append((c, combine(op, a if ea is None else ea, b if eb is None else eb)))
    return pool


def check(completion: str, answer: str) -> Expr | None:
    """The canonical expression of ``completion`` if it solves ``answer``, else None."""
    numbers, target = parse_problem(answer)
    pool = _read(completion, [(x, x) for x in numbers], strict=True)
    if pool is None or len(pool) != 1 or pool[0][0] != target or isinstance(pool[0][1], int):
        return None
    return pool[0][1]


def reward(completion: str, answer: str) -> float:
    """+1.0 if ``completion`` solves the problem ``answer`` ("NUMBERS:TARGET"), else -1.0."""
    return 1.0 if check(completion, answer) is not None else -1.0


def extract_answer(completion: str) -> str | None:
    """The canonical solution of a well-formed, arithmetically correct completion (whatever
    the problem), else None: equal strings are the same solution (for maj@k and the distinct
    solution counts)."""
    pool = _read(completion, [], strict=False)
    if pool is None or len(pool) != 1:
        return None
    return render(pool[0][1])


def _value(x: Expr) -> int:
    if isinstance(x, int):
        return x
    op, kids = x
    if op in "+*":
        acc = _value(kids[0])
        for k in kids[1:]:
            acc = acc + _value(k) if op == "+" else acc * _value(k)
        return acc
    a, b = (_value(k) for k in kids)
    return a - b if op == "-" else a // b


def _emissions(x: Expr) -> Iterator[tuple[list[str], int]]:
    """Every step-by-step rendering of ``x`` as (steps, value), the preferred one first:
    operands of ``+`` and ``*`` combined larger first, subterms before leaves."""
    if isinstance(x, int):
        yield [], x
        return
    op, kids = x
    if op in "-/":
        for first in (0, 1):  # which operand's steps come first
            for sa, va in _emissions(kids[first]):
                for sb, vb in _emissions(kids[1 - first]):
                    a, b = (va, vb) if first == 0 else (vb, va)
                    steps = sa + sb
                    yield steps + [f"{a}{op}{b}={apply(op, a, b)}"], _value(x)
        return
    base = sorted(kids, key=lambda k: (isinstance(k, int), -_value(k)))
    for order in permutations(base):
        for s0, v0 in _emissions(order[0]):
            yield from _chain(op, order, 1, s0, v0)


def _chain(op: str, order: tuple, i: int, steps: list[str],
           acc: int) -> Iterator[tuple[list[str], int]]:
    """The renderings of combining ``order[i:]`` into ``acc`` with ``op``, one at a time."""
    if i == len(order):
        yield steps, acc
        return
    for sk, vk in _emissions(order[i]):
        a, b = max(acc, vk), min(acc, vk)
        c = apply(op, a, b)
        yield from _chain(op, order, i + 1, steps + sk + [f"{a}{op}{b}={c}"], c)


def steps_of(e: Expr, *, tries: int = 200) -> list[str]:
    """A step-by-step completion of the canonical expression ``e`` whose canonical reading
    (:func:`extract_answer`) is ``e`` again, e.g. ``["6*2=12", "12+5=17", "17+8=25"]``.

    A value that exists twice in the pool (a given 6 and a made 6) makes a text ambiguous; the
    reading takes the most recently made one, so among the renderings (operands of ``+`` and
    ``*`` larger first, subterms before leaves, preferred) the first that reads back as ``e``
    is returned (the preferred one when none of the first ``tries`` does).
    """
    want = render(e)
    first: list[str] | None = None
    for i, (steps, _) in enumerate(_emissions(e)):
        if first is None:
            first = steps
        if extract_answer(",".join(steps)) == want:
            return steps
        if i + 1 >= tries:
            break
    return first or []


def render_steps(e: Expr) -> str:
    return ",".join(steps_of(e))


#: default SFT warm-start steps of each setting (calibrated on the tiny model: README)
SFT_STEPS = {"countdown": 1000, "countdown5": 1000}

#: SFT: relative weight of a solution that uses ``/`` and share of B-only problems kept
SFT_DIVISION_WEIGHT = 0.05
SFT_KEEP_B_ONLY = 0.2


def sft_pick(answer: str, seed: int, *, division_weight: float = SFT_DIVISION_WEIGHT) -> Expr:
    """The one solution of ``answer`` that the SFT traces of this problem show: drawn with
    weight 1 for solutions without ``/`` and ``division_weight`` for those with it (a function
    of the problem and ``seed``)."""
    sols = solution_exprs(answer)
    if not sols:
        raise ValueError(f"countdown: problem {answer!r} has no solution")
    weights = [division_weight if uses_division(e) else 1.0 for e in sols]
    if not any(weights):  # B-only with division_weight 0: its own solutions, equally
        weights = [1.0] * len(sols)
    rng = random.Random(f"g2rl-countdown-sft:{answer}:{seed}")
    return rng.choices(sols, weights=weights)[0]


def sft_keep(answer: str, seed: int, *, keep_b_only: float = SFT_KEEP_B_ONLY) -> bool:
    """Whether ``answer`` is one of the SFT problems: every A and "both" problem, and a share
    ``keep_b_only`` of the B-only ones (a function of the problem and ``seed``)."""
    if problem_class(answer) != "B":
        return True
    h = hashlib.sha256(f"g2rl-countdown-keep:{answer}:{seed}".encode()).digest()
    return int.from_bytes(h[:4], "big") < keep_b_only * 2**32


def max_new_tokens(setting: str) -> int:
    """A response budget in tokens (characters) for the setting: ``n - 1`` steps of at most 8
    characters (``"45+5=50"`` is 7) with their commas, plus 2 (EOS and a margin)."""
    size = SETTINGS[setting][0]
    return (size - 1) * 9 + 2
