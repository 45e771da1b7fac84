"""The Countdown task (:mod:`g2rl.tasks.countdown`) and the task interface (:mod:`g2rl.tasks`).

The expected values come from hand-worked cases and from a brute force written here: an
enumerator over every step sequence (its own arithmetic rules, its own canonical form), never
the module's own enumerator.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from itertools import combinations_with_replacement, permutations

import pytest

from g2rl.tasks import TASK_NAMES, Task, get_task
from g2rl.tasks import countdown as cd

PROBLEM = "2568:25"  # the example: 2 5 6 8 > 25
SOL_ADD = "((2*6)+5+8)"
SOL_DIV = "((8-(6/2))*5)"


# ---------------------------------------------------------------------------------------------
# an independent brute force over step sequences
# ---------------------------------------------------------------------------------------------

def _step_value(op: str, a: int, b: int) -> int | None:
    """``a op b`` under the task's rules, written from the issue (None: not allowed)."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    else:
        if a % b:
            return None
        c = a // b
    return c if 1 <= c <= 50 else None


def _canon(tree) -> str:
    """Canonical text of a raw binary tree (int or (op, left, right)): chains of + and of *
    flattened, their operands sorted by text; - and / keep their operand order."""
    if isinstance(tree, int):
        return str(tree)
    op, a, b = tree
    if op in "+*":
        flat: list[str] = []
        stack = [a, b]
        while stack:
            x = stack.pop()
            if not isinstance(x, int) and x[0] == op:
                stack.extend(x[1:])
            else:
                flat.append(_canon(x))
        return "(" + op.join(sorted(flat)) + ")"
    return "(" + _canon(a) + op + _canon(b) + ")"


_ENUM_CACHE: dict[tuple[int, ...], dict[int, list[tuple[str, object]]]] = {}


def _enumerate(numbers: tuple[int, ...]) -> dict[int, list[tuple[str, object]]]:
    """final value -> [(completion text, raw tree)] for every step sequence that uses all of
    ``numbers`` (every ordered pair of pool entries, every operation, every order of steps)."""
    key = tuple(sorted(numbers))
    if key in _ENUM_CACHE:
        return _ENUM_CACHE[key]
    out: dict[int, list[tuple[str, object]]] = defaultdict(list)

    def rec(pool: list[tuple[int, object]], steps: list[str]) -> None:
        if len(pool) == 1:
            out[pool[0][0]].append((",".join(steps), pool[0][1]))
            return
        for i, j in permutations(range(len(pool)), 2):
            (a, ta), (b, tb) = pool[i], pool[j]
            rest = [p for k, p in enumerate(pool) if k != i and k != j]
            for op in "+-*/":
                c = _step_value(op, a, b)
                if c is not None:
                    rec(rest + [(c, (op, ta, tb))], steps + [f"{a}{op}{b}={c}"])

    rec([(x, x) for x in key], [])
    _ENUM_CACHE[key] = dict(out)
    return _ENUM_CACHE[key]


def _brute(answer: str) -> tuple[set[str], set[str], list[str]]:
    """(canonical forms of the true trees, extract_answer of every text, the texts) of every
    step sequence that solves ``answer``."""
    digits, target = answer.split(":")
    seqs = _enumerate(tuple(int(c) for c in digits)).get(int(target), [])
    texts = [t for t, _ in seqs]
    return {_canon(tree) for _, tree in seqs}, {cd.extract_answer(t) for t in texts}, texts


def _valid_by_values(completion: str, numbers: tuple[int, ...], target: int) -> bool:
    """An independent verdict: a multiset of values, steps parsed loosely by hand."""
    text = completion.strip()
    if not text:
        return False
    pool = Counter(numbers)
    for step in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*", step)
        if m is None:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if _step_value(op, a, b) != c:
            return False
        pool[a] -= 1
        if pool[a] < 0:
            return False
        pool[b] -= 1
        if pool[b] < 0:
            return False
        pool[c] += 1
    return +pool == Counter([target])


def _random_problems(n: int, seed: int) -> list[str]:
    """``n`` random solvable 4-number problems (targets 10-40), found by the brute force."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        numbers = tuple(sorted(rng.randint(2, 9) for _ in range(4)))
        targets = sorted(v for v in _enumerate(numbers) if 10 <= v <= 40)
        if targets:
            out.append("".join(map(str, numbers)) + f":{rng.choice(targets)}")
    return out


def _pool_has_duplicate_operand(completion: str, numbers: tuple[int, ...]) -> bool:
    """Whether some step takes an operand whose value is in the pool twice at that point."""
    pool = Counter(numbers)
    for step in completion.split(","):
        a, op, rest = re.match(r"(\d+)([-+*/])(.*)", step).groups()
        b, c = (int(x) for x in rest.split("="))
        if pool[int(a)] > 1 or pool[b] > 1:
            return True
        pool[int(a)] -= 1
        pool[b] -= 1
        pool[c] += 1
    return False


# ---------------------------------------------------------------------------------------------
# the verifier: accepts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, canon", [
    ("6*2=12,12+5=17,17+8=25", SOL_ADD),            # the example (*, +)
    ("2*6=12,12+5=17,17+8=25", SOL_ADD),            # smaller operand first
    ("8+5=13,2*6=12,13+12=25", SOL_ADD),            # intermediates used in another order
    ("5+8=13,6*2=12,12+13=25", SOL_ADD),
    ("2*6=12,12+8=20,20+5=25", SOL_ADD),
    ("6*2=12,5+12=17,8+17=25", SOL_ADD),
    ("6/2=3,8-3=5,5*5=25", SOL_DIV),                # /, -, * (a made 5 and the given 5)
    (" 6 / 2 = 3 , 8 - 3 = 5 , 5 * 5 = 25 ", SOL_DIV),  # spaces around every token
    ("6 *2= 12,  12+ 5=17 ,17 + 8 =25", SOL_ADD),
    ("\n6*2=12,12+5=17,17+8=25\n", SOL_ADD),
])
def test_check_accepts_correct_answers(completion, canon):
    assert cd.reward(completion, PROBLEM) == 1.0
    got = cd.check(completion, PROBLEM)
    assert got is not None and cd.render(got) == canon
    assert cd.extract_answer(completion) == canon


@pytest.mark.parametrize("completion, answer, canon", [
    ("2/2=1,1+2=3,3*5=15", "2225:15", "(((2/2)+2)*5)"),   # three equal given numbers
    ("2/2=1,2+1=3,5*3=15", "2225:15", "(((2/2)+2)*5)"),
    ("9-5=4,4-2=2,2*7=14", "2579:14", "(((9-5)-2)*7)"),   # a chain of - is not regrouped
    ("5+2=7,9-7=2,7*2=14", "2579:14", "((9-(2+5))*7)"),
    ("2+2=4,2+2=4,4*4=16", "2222:16", "((2+2)*(2+2))"),
    ("2*2=4,2*2=4,4*4=16", "2222:16", "(2*2*2*2)"),
    ("9*4=36,36/6=6,6+3=9", "3469:9", "(((4*9)/6)+3)"),     # a made 6 and a given 6
])
def test_check_accepts_more_hand_cases(completion, answer, canon):
    assert cd.reward(completion, answer) == 1.0
    assert cd.render(cd.check(completion, answer)) == canon == cd.extract_answer(completion)


# ---------------------------------------------------------------------------------------------
# the verifier: rejects
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, answer", [
    ("6*2=12,12+5=16,16+8=24", "2568:24"),      # wrong arithmetic (12+5 is 17), rest consistent
    ("6*2=13,13+5=18,18+8=26", "2568:26"),      # wrong arithmetic in the first step
    ("6*2=12,12+5=17,17+5=22", "2568:22"),      # the given 5 used twice (8 never)
    ("2/2=1,2+2=4,4*5=20", "2225:20"),          # a 2 used more often than given
    ("2*6=12,12+12=24,24+5=29,29-8=21", "2568:21"),  # an intermediate (12) used twice
    ("6/2=3,3+3=6,6+8=14,14+5=19", "2568:19"),  # an intermediate (3) used twice
    ("6*2=12,12+5=17", "2568:17"),              # 8 unused (too few steps)
    ("6*2=12,12+8=20", "2568:20"),
    ("7*2=14,14+5=19,19+6=25", "2568:25"),      # 7 is not given
    ("6*2=12,12+5=17,17+8=25", "2578:25"),      # 6 is not given in this problem
    ("6/2=3,3-8=5,5*5=25", "2568:25"),          # smaller minus larger (claimed as 5)
    ("6/2=3,3-8=-5,5*5=25", "2568:25"),         # smaller minus larger (negative)
    ("2-2=0,0+2=2,2*5=10", "2225:10"),          # equal minus equal
    ("8/5=1,1+6=7,7*2=14", "2568:14"),          # division with a remainder
    ("8/6=1,2*5=10,10+1=11", "2568:11"),
    ("5/2=2,2*6=12,12+8=20", "2568:20"),
    ("5/2=2.5,2.5*6=15,15+8=23", "2568:23"),    # a non-integer result
    ("2/6=0,0+5=5,5*8=40", "2568:40"),          # a result below 1
    ("2/8=4,4+6=10,10*5=50", "2568:50"),        # the division written backwards
    ("9*8=72,72/2=36,36+3=39", "2389:39"),      # 72 > 50
    ("9*6=54,54-5=49,49-2=47", "2569:47"),      # 54 > 50
    ("6*2=12,12+5=17,17+8=25", "2568:24"),      # final value is not the target
    ("6*2=12,12+5=17,17+8=25", "2568:17"),      # extra steps after the target is reached
    ("6*2=12,12+5=17,17+8=25,25+1=26", "2568:26"),
    ("6*2=12,12+5=17,17+8=25,6*2=12", "2568:12"),
    ("", "2568:25"),
    ("   ", "2568:25"),
    ("25", "2568:25"),
    ("the answer is 25", "2568:25"),
    ("(2*6)+5+8", "2568:25"),
    ("6*2=12,12+5=17,17+8=25,", "2568:25"),     # trailing comma
    (",6*2=12,12+5=17,17+8=25", "2568:25"),
    ("6*2=12,,12+5=17,17+8=25", "2568:25"),
    ("6*2=12;12+5=17;17+8=25", "2568:25"),
    ("6x2=12,12+5=17,17+8=25", "2568:25"),
    ("6*2=12,12+5=17,17+8", "2568:25"),
    ("12+5=17,6*2=12,17+8=25", "2568:25"),      # 12 used before it is made
    ("17+8=25,6*2=12,12+5=17", "2568:25"),
])
def test_check_rejects(completion, answer):
    assert cd.check(completion, answer) is None
    assert cd.reward(completion, answer) == -1.0


@pytest.mark.parametrize("completion", [
    "6*2=12,12+5=16,16+8=24", "6/2=3,3-8=5,5*5=25", "2-2=0", "8/5=1", "9*8=72", "",
    "garbage", "6*2=12,", "6*2=12,5+8=13",  # two values left: not one solution
])
def test_extract_answer_rejects_malformed_or_wrong(completion):
    assert cd.extract_answer(completion) is None


def test_extract_answer_ignores_the_target():
    assert cd.extract_answer("6*2=12,12+5=17,17+8=25") == SOL_ADD  # whatever the problem
    assert cd.reward("6*2=12,12+5=17,17+8=25", "2568:24") == -1.0


def test_check_agrees_with_an_independent_verdict_on_random_texts():
    """Random step texts (mostly almost right) against a value-multiset verifier."""
    rng = random.Random(7)
    accepted = 0
    for problem in _random_problems(40, seed=11):
        digits, target = problem.split(":")
        numbers = tuple(int(c) for c in digits)
        texts = _brute(problem)[2]
        for _ in range(40):
            steps = rng.choice(texts).split(",")
            kind = rng.randrange(6)
            i = rng.randrange(len(steps))
            a, op, b, c = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", steps[i]).groups()
            if kind == 1:    # another result
                c = str(int(c) + rng.choice([-1, 1]))
            elif kind == 2:  # another operation
                op = rng.choice("+-*/")
            elif kind == 3:  # another operand
                a = str(rng.randint(1, 12))
            elif kind == 4:  # swap the operands
                a, b = b, a
            elif kind == 5:  # drop or repeat a step
                steps = steps[:i] + steps[i + 1:] if rng.random() < 0.5 else steps + [steps[i]]
            if kind != 5:
                steps[i] = f"{a}{op}{b}={c}"
            text = ",".join(steps)
            want = _valid_by_values(text, numbers, int(target))
            assert (cd.check(text, problem) is not None) == want, (problem, text)
            assert cd.reward(text, problem) == (1.0 if want else -1.0)
            accepted += want
    assert 100 < accepted < 1500  # both verdicts are exercised


# ---------------------------------------------------------------------------------------------
# canonical solution identity
# ---------------------------------------------------------------------------------------------

def test_same_solution_in_any_step_order_operand_order_or_grouping():
    same = ["6*2=12,12+5=17,17+8=25", "8+5=13,2*6=12,13+12=25", "2*6=12,12+8=20,20+5=25",
            "5+8=13,6*2=12,12+13=25", "6*2=12,5+12=17,8+17=25", " 8 + 5=13 , 6*2 = 12,12+13=25"]
    got = {cd.extract_answer(s) for s in same}
    assert got == {SOL_ADD}
    assert cd.extract_answer("2+2=4,2+2=4,4*4=16") == "((2+2)*(2+2))"
    # every grouping of a chain of * is one solution
    products = ["2*2=4,2*2=4,4*4=16", "2*2=4,4*2=8,8*2=16", "2*2=4,2*4=8,2*8=16"]
    assert {cd.extract_answer(s) for s in products} == {"(2*2*2*2)"}
    # (2+2)*2*2 regrouped: the made (2*2) and (2+2) multiplied flatten into one chain
    regroup = ["2+2=4,4*2=8,8*2=16", "2+2=4,2*2=4,4*4=16", "2*2=4,2+2=4,4*4=16",
               "2+2=4,2*4=8,2*8=16"]
    assert {cd.extract_answer(s) for s in regroup} == {"((2+2)*2*2)"}
    # chains of + regrouped
    sums = ["2+3=5,5+4=9,9+7=16", "7+4=11,3+2=5,11+5=16", "4+7=11,11+2=13,13+3=16"]
    assert {cd.extract_answer(s) for s in sums} == {"(2+3+4+7)"}


@pytest.mark.parametrize("left, right", [
    ("6*2=12,12+5=17,17+8=25", "6/2=3,8-3=5,5*5=25"),
    ("2+2=4", "2*2=4"),
    ("9-5=4,4-2=2", "5+2=7,9-7=2"),          # - is not regrouped
    ("8/2=4,4/2=2", "2*2=4,8/4=2"),          # / is not regrouped
    ("2+3=5,5*4=20", "2*4=8,3*4=12,8+12=20"),  # no distributivity
    ("2+2=4,2+2=4,4*4=16", "2*2=4,2*2=4,4*4=16"),
    ("2+2=4,2+2=4,4*4=16", "2+2=4,4*2=8,8*2=16"),
    ("6-2=4,4*3=12", "3*6=18,18-6=12"),
])
def test_genuinely_different_trees_differ(left, right):
    a, b = cd.extract_answer(left), cd.extract_answer(right)
    assert a is not None and b is not None and a != b


def test_check_renders_as_extract_answer_for_every_correct_sequence():
    for problem in ["2568:25", "2222:16", "2225:15", "3469:9", "2579:14"]:
        for text in _brute(problem)[2]:
            got = cd.check(text, problem)
            assert got is not None, (problem, text)
            assert cd.render(got) == cd.extract_answer(text), (problem, text)


# ---------------------------------------------------------------------------------------------
# solutions / solution_exprs against the brute force
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem, expected", [
    ("2568:25", [SOL_ADD, SOL_DIV]),
    ("2222:16", ["((2+2)*(2+2))", "((2+2)*2*2)", "(2*2*2*2)"]),
    ("2225:15", ["(((2/2)+2)*5)"]),
    ("2222:37", []),
])
def test_solutions_hand_cases(problem, expected):
    assert cd.solutions(problem) == expected
    assert [cd.render(e) for e in cd.solution_exprs(problem)] == expected
    trees, texts, _ = _brute(problem)
    assert trees == texts == set(expected)


def test_solutions_match_the_brute_force_on_random_problems():
    problems = _random_problems(30, seed=2024)
    assert len(set(problems)) >= 25
    for problem in problems:
        sols = cd.solutions(problem)
        trees, texts, seqs = _brute(problem)
        assert seqs, problem
        assert sols == sorted(set(sols)), problem  # distinct and sorted
        assert set(sols) == trees, problem
        assert set(sols) == texts, problem
        for text in seqs[::7]:
            assert cd.reward(text, problem) == 1.0, (problem, text)


def test_solutions_of_every_target_of_one_multiset():
    reachable = set(_enumerate((2, 5, 6, 8)))
    for target in range(1, 60):
        problem = f"2568:{target}"
        assert set(cd.solutions(problem)) == _brute(problem)[0], problem
        assert bool(cd.solutions(problem)) == (target in reachable), problem


def test_parse_problem_rejects_malformed_answers():
    assert cd.parse_problem("8562:25") == ((2, 5, 6, 8), 25)
    for bad in ["2568", "2568:", ":25", "256:25", "256789:25", "25a8:25", "2568:x"]:
        with pytest.raises(ValueError):
            cd.parse_problem(bad)


# ---------------------------------------------------------------------------------------------
# render_steps round trips
# ---------------------------------------------------------------------------------------------

def test_render_steps_round_trips():
    rng = random.Random(5)
    problems = rng.sample(cd.all_problems(4, 10, 40), 1500)
    total = not_back = 0
    for problem in problems:
        numbers = cd.parse_problem(problem)[0]
        for e in cd.solution_exprs(problem):
            text = cd.render_steps(e)
            assert text == ",".join(cd.steps_of(e))
            assert len(text.split(",")) == 3, (problem, text)
            got = cd.check(text, problem)
            assert got is not None, (problem, text)  # always a correct solution
            assert cd.reward(text, problem) == 1.0
            total += 1
            if cd.render(got) != cd.render(e):
                not_back += 1
                # only where a value is in the pool twice when a step takes it
                assert _pool_has_duplicate_operand(text, numbers), (problem, text)
    assert total > 5000
    assert not_back / total < 0.01


def test_render_steps_hand_cases():
    assert cd.render_steps(cd.solution_exprs(PROBLEM)[0]) == "6*2=12,12+8=20,20+5=25"
    div = cd.solution_exprs(PROBLEM)[1]
    assert cd.render(cd.check(cd.render_steps(div), PROBLEM)) == SOL_DIV


# ---------------------------------------------------------------------------------------------
# problem_class
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem, label", [
    ("2222:16", "A"), ("2225:15", "B"), ("2568:25", "both"), ("2226:11", "B"),
])
def test_problem_class_hand_cases(problem, label):
    trees = _brute(problem)[0]
    div = [("/" in t) for t in trees]
    assert trees
    assert label == ("B" if all(div) else "both" if any(div) else "A")  # the brute force agrees
    assert cd.problem_class(problem) == label


def test_problem_class_matches_the_brute_force():
    seen = Counter()
    for problem in _random_problems(60, seed=99):
        div = [("/" in t) for t in _brute(problem)[0]]
        label = "B" if all(div) else "both" if any(div) else "A"
        assert cd.problem_class(problem) == label, problem
        seen[label] += 1
    assert set(seen) == {"A", "B", "both"}


def test_problem_class_of_an_unsolvable_problem_raises():
    with pytest.raises(ValueError):
        cd.problem_class("2222:37")


# ---------------------------------------------------------------------------------------------
# make_examples
# ---------------------------------------------------------------------------------------------

PROMPT = re.compile(r"^([2-9]) ([2-9]) ([2-9]) ([2-9])>(\d+)$")


def test_make_examples_deterministic_and_seeded():
    a = cd.make_examples("train", 50, 3)
    assert a == cd.make_examples("train", 50, 3)
    assert a != cd.make_examples("train", 50, 4)
    assert len({ex.answer for ex in a}) == 50
    assert cd.make_examples("train", 0, 3) == []
    with pytest.raises(ValueError):
        cd.make_examples("valid", 5, 0)
    with pytest.raises(ValueError):
        cd.make_examples("train", -1, 0)


def test_make_examples_splits_cover_every_solvable_problem_once():
    train = cd.make_examples("train", 10**6, 0)
    test = cd.make_examples("test", 10**6, 0)
    tr, te = {ex.answer for ex in train}, {ex.answer for ex in test}
    assert len(tr) == len(train) and len(te) == len(test)  # no repeats
    assert not tr & te
    assert 0.15 < len(te) / (len(tr) + len(te)) < 0.25
    # n larger than the split: the whole split, the same set for any seed
    assert {ex.answer for ex in cd.make_examples("train", 10**6, 9)} == tr
    assert len(cd.make_examples("test", len(test) + 1, 1)) == len(test)
    every = tr | te
    # exactly the solvable (numbers, target) pairs, by the brute force on sampled multisets
    rng = random.Random(1)
    multisets = rng.sample(list(combinations_with_replacement(range(2, 10), 4)), 25)
    for numbers in multisets:
        digits = "".join(map(str, numbers))
        want = {f"{digits}:{v}" for v in _enumerate(numbers) if 10 <= v <= 40}
        assert {a for a in every if a.startswith(digits + ":")} == want, digits
    for ex in train + test:
        m = PROMPT.match(ex.prompt)
        assert m, ex.prompt
        numbers = [int(x) for x in m.groups()[:4]]
        assert numbers == sorted(numbers)
        assert 10 <= int(m[5]) <= 40
        assert ex.answer == "".join(m.groups()[:4]) + ":" + m[5]
    for ex in rng.sample(train, 300) + rng.sample(test, 100):  # every problem is solvable
        assert cd.solutions(ex.answer)
        assert cd.reward(cd.render_steps(cd.solution_exprs(ex.answer)[0]), ex.answer) == 1.0


# ---------------------------------------------------------------------------------------------
# sft_pick / sft_keep
# ---------------------------------------------------------------------------------------------

def _train_answers() -> list[str]:
    return sorted(ex.answer for ex in cd.make_examples("train", 10**6, 0))


def test_sft_pick_is_deterministic_and_a_solution():
    answers = _train_answers()[::20]
    changed = 0
    for a in answers:
        pick = cd.sft_pick(a, 1)
        assert pick == cd.sft_pick(a, 1)
        assert pick in cd.solution_exprs(a)
        changed += cd.render(cd.sft_pick(a, 2)) != cd.render(pick)
    assert changed > 0  # a function of the seed too


def test_sft_pick_without_division_weight_avoids_division():
    both = [a for a in _train_answers() if cd.problem_class(a) == "both"]
    assert len(both) > 1000
    for a in both:
        for seed in (0, 1):
            assert not cd.uses_division(cd.sft_pick(a, seed, division_weight=0.0)), a
    # with weight 1 every solution is equally likely: some picks use /
    assert any(cd.uses_division(cd.sft_pick(a, 0, division_weight=1.0)) for a in both)


def test_sft_pick_division_share_matches_the_weight():
    both = [a for a in _train_answers() if cd.problem_class(a) == "both"]
    w = cd.SFT_DIVISION_WEIGHT
    expected = var = 0.0
    picked = 0
    for a in both:
        div = sum(cd.uses_division(e) for e in cd.solution_exprs(a))
        plain = len(cd.solution_exprs(a)) - div
        p = w * div / (w * div + plain)
        expected += p
        var += p * (1 - p)
        picked += cd.uses_division(cd.sft_pick(a, 0))
    assert abs(picked - expected) < 4 * math.sqrt(var) + 1


def test_sft_pick_zero_division_weight_on_b_only_problem():
    # the config allows sft_division_weight=0 (>= 0) and keeps a share of B problems
    assert cd.problem_class("2225:15") == "B"
    assert cd.render(cd.sft_pick("2225:15", 0, division_weight=0.0)) == "(((2/2)+2)*5)"


def test_sft_keep():
    answers = _train_answers()
    classes = {a: cd.problem_class(a) for a in answers}
    b_only = [a for a in answers if classes[a] == "B"]
    assert len(b_only) > 500
    for a in answers:
        if classes[a] != "B":
            assert cd.sft_keep(a, 0, keep_b_only=0.0)
    assert not any(cd.sft_keep(a, 0, keep_b_only=0.0) for a in b_only)
    assert all(cd.sft_keep(a, 0, keep_b_only=1.0) for a in b_only)
    n = len(b_only)
    for keep in (cd.SFT_KEEP_B_ONLY, 0.5):
        kept = [a for a in b_only if cd.sft_keep(a, 0, keep_b_only=keep)]
        assert kept == [a for a in b_only if cd.sft_keep(a, 0, keep_b_only=keep)]
        assert abs(len(kept) / n - keep) < 4 * math.sqrt(keep * (1 - keep) / n)
    assert [cd.sft_keep(a, 0) for a in b_only] != [cd.sft_keep(a, 1) for a in b_only]
    low = {a for a in b_only if cd.sft_keep(a, 3, keep_b_only=0.2)}
    high = {a for a in b_only if cd.sft_keep(a, 3, keep_b_only=0.5)}
    assert low <= high


# ---------------------------------------------------------------------------------------------
# the task interface
# ---------------------------------------------------------------------------------------------

def test_task_names_and_unknown_name():
    assert set(TASK_NAMES) >= {"subset-sum", "countdown", "countdown5"}
    for name in TASK_NAMES:
        t = get_task(name)
        assert isinstance(t, Task) and t.name == name
    with pytest.raises(ValueError) as err:
        get_task("countdown6")
    for name in TASK_NAMES:
        assert name in str(err.value)


def test_subset_sum_task():
    t = get_task("subset-sum", division_weight=0.0, keep_b_only=0.0)  # ignored
    assert t.reward("5+7", "35817:12") == 1.0
    assert t.reward("5+8", "35817:12") == -1.0
    examples = t.make_examples("train", 10, 0)
    assert t.sft_filter(examples, 0) == examples
    sol = t.sft_solution(examples[0].answer, random.Random(0), 0)
    assert t.reward(sol, examples[0].answer) == 1.0
    assert t.problem_class is None and t.rare_strategy is None


def test_countdown_task():
    t = get_task("countdown")
    assert t.classes == ("A", "B", "both") and t.rare_name == "/"
    assert t.problem_class("2568:25") == "both"
    assert t.rare_strategy(SOL_DIV) and not t.rare_strategy(SOL_ADD)
    assert t.reward("6*2=12,12+5=17,17+8=25", PROBLEM) == 1.0
    assert t.extract_answer("8+5=13,2*6=12,13+12=25") == SOL_ADD
    examples = t.make_examples("train", 400, 0)
    assert examples == cd.make_examples("train", 400, 0)
    rng = random.Random(0)
    for ex in examples:
        sol = t.sft_solution(ex.answer, rng, 0)
        assert t.reward(sol, ex.answer) == 1.0, (ex.answer, sol)
        assert t.max_new_tokens >= len(sol) + 1
        assert t.extract_answer(sol) is not None
    for ex in examples[:50]:
        for e in cd.solution_exprs(ex.answer):
            assert t.max_new_tokens >= len(cd.render_steps(e)) + 1
    # the longest possible completion fits too
    assert t.max_new_tokens >= len("50*50=50,50*50=50,50*50=50") + 1
    kept = {ex.answer for ex in t.sft_filter(examples, 0)}
    assert kept <= {ex.answer for ex in examples}
    assert {ex.answer for ex in examples if cd.problem_class(ex.answer) != "B"} <= kept
    assert len(kept) < len(examples)  # some B-only problems are dropped


def test_countdown_task_options():
    t = get_task("countdown", division_weight=0.0, keep_b_only=0.0)
    examples = t.make_examples("train", 300, 1)
    kept = t.sft_filter(examples, 0)
    assert kept and all(cd.problem_class(ex.answer) != "B" for ex in kept)
    rng = random.Random(0)
    for ex in kept:
        sol = t.sft_solution(ex.answer, rng, 0)
        assert "/" not in sol and t.reward(sol, ex.answer) == 1.0
    t1 = get_task("countdown", keep_b_only=1.0)
    assert t1.sft_filter(examples, 0) == examples


def test_countdown5():
    t = get_task("countdown5")
    assert t.name == "countdown5"
    examples = t.make_examples("train", 30, 0)
    assert examples == t.make_examples("train", 30, 0)
    test = {ex.answer for ex in t.make_examples("test", 10**6, 0)}
    assert not test & {ex.answer for ex in examples}
    rng = random.Random(0)
    for ex in examples:
        m = re.fullmatch(r"([2-9]) ([2-9]) ([2-9]) ([2-9]) ([2-9])>(\d+)", ex.prompt)
        assert m, ex.prompt
        assert list(m.groups()[:5]) == sorted(m.groups()[:5])
        assert 10 <= int(m[6]) <= 50
        sol = t.sft_solution(ex.answer, rng, 0)
        assert len(sol.split(",")) == 4
        assert t.reward(sol, ex.answer) == 1.0
        assert t.max_new_tokens >= len(sol) + 1
        for e in cd.solution_exprs(ex.answer)[:20]:
            assert t.max_new_tokens >= len(cd.render_steps(e)) + 1
    assert t.max_new_tokens >= len(",".join(["50*50=50"] * 4)) + 1
    assert t.reward("6*2=12,12+5=17,17+8=25", PROBLEM) == 1.0  # the verifier is shared


def test_old_module_name_still_imports_subset_sum():
    from g2rl import task as old
    from g2rl.tasks import subset_sum as ss

    for name in ("make_examples", "reward", "extract_answer", "solutions", "sample_solution",
                 "SPLITS", "NUM_DIGITS", "MIN_TERMS", "MAX_TERMS"):
        assert getattr(old, name) is getattr(ss, name)
    assert old.reward("5+7", "35817:12") == 1.0


@pytest.mark.parametrize("text", ["06*2=12,12+5=17,17+8=25", "\uff16*2=12,12+5=17,17+8=25",
                                  "6*2=012,12+5=17,17+8=25"])
def test_rejects_leading_zeros_and_non_ascii_digits(text):
    assert cd.check(text, "2568:25") is None
    assert cd.reward(text, "2568:25") == -1.0
    assert cd.extract_answer(text) is None
