"""Answers for the math-reward tests and timing: a few hundred real-looking (completion, gold)
pairs (fractions, radicals, intervals, matrices, units, ...) and 64 distinct pathological
answers of the kinds that stall math-verify."""

from __future__ import annotations

import math
import random
from fractions import Fraction

_LEADS = (
    "",
    "Let me work through this.\n\nFirst, we simplify the expression. ",
    "We have $x = 3$ and $y = \\frac{1}{2}$, so substituting gives the result. ",
    "Step 1: set up the equation $2x + 3 = 7$.\nStep 2: solve for $x$.\nTherefore ",
    "Using the formula $A = \\pi r^2$ with $r = 2$ (in cm) and checking {cases}, ",
)
_TAILS = ("", ".", " is the final answer.", "$.\n\nAnswer verified.")


def _wrap(rng: random.Random, answer: str) -> str:
    lead, tail = rng.choice(_LEADS), rng.choice(_TAILS)
    form = rng.choice(("The answer is $\\boxed{%s}", "so $\\boxed{%s}", "\\boxed{%s}",
                       "Thus the answer is \\boxed{%s}"))
    return lead + form % answer + tail


def _frac(f: Fraction, style: str = "frac") -> str:
    sign = "-" if f < 0 else ""
    a, b = abs(f.numerator), f.denominator
    if b == 1:
        return f"{sign}{a}"
    return f"{sign}\\{style}{{{a}}}{{{b}}}" if style != "slash" else f"{sign}{a}/{b}"


def real_answers(seed: int = 0) -> list[tuple[str, str, str]]:
    """(completion, gold, family) triples: mostly correct answers in another form than the
    gold, some wrong ones. Deterministic for a seed."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []

    def add(pred: str, gold: str, family: str) -> None:
        out.append((_wrap(rng, pred), gold, family))

    for _ in range(40):  # fractions
        f = Fraction(rng.randint(-40, 40) or 1, rng.randint(2, 30))
        k = rng.randint(2, 5)
        gold = _frac(f)
        style = rng.choice(("frac", "dfrac", "tfrac", "slash", "scaled", "decimal", "wrong"))
        if style == "scaled":
            add(f"{'-' if f < 0 else ''}\\frac{{{abs(f.numerator) * k}}}{{{f.denominator * k}}}",
                gold, "fraction")
        elif style == "decimal":
            den = f.denominator
            while den % 2 == 0:
                den //= 2
            while den % 5 == 0:
                den //= 5
            add(str(float(f)) if den == 1 else _frac(f, "dfrac"), gold, "fraction")
        elif style == "wrong":
            add(_frac(f + Fraction(1, f.denominator)), gold, "fraction")
        else:
            add(_frac(f, style), gold, "fraction")
    for _ in range(35):  # radicals
        k, m = rng.randint(2, 9), rng.choice((2, 3, 5, 6, 7, 10, 11, 13))
        gold = f"{k}\\sqrt{{{m}}}"
        form = rng.choice(("same", "inside", "rationalised", "cbrt", "wrong"))
        if form == "inside":
            add(f"\\sqrt{{{k * k * m}}}", gold, "radical")
        elif form == "rationalised":
            add(f"\\frac{{{k * m}}}{{\\sqrt{{{m}}}}}", gold, "radical")
        elif form == "cbrt":
            add(f"\\sqrt[3]{{{k ** 3}}}", str(k), "radical")
        elif form == "wrong":
            add(f"{k + 1}\\sqrt{{{m}}}", gold, "radical")
        else:
            add(f"{k}\\sqrt{{{m}}}", gold, "radical")
    for _ in range(35):  # intervals
        a, b = sorted(rng.sample(range(-20, 21), 2))
        lo, hi = rng.choice("(["), rng.choice(")]")
        gold = f"{lo}{a}, {b}{hi}"
        form = rng.choice(("same", "left-right", "union", "infinity", "wrong"))
        if form == "left-right":
            add(f"\\left{lo}{a}, {b}\\right{hi}", gold, "interval")
        elif form == "union":
            c = b + rng.randint(1, 5)
            gold = f"(-\\infty, {a}) \\cup ({c}, \\infty)"
            add(f"\\left(-\\infty, {a}\\right) \\cup \\left({c}, \\infty\\right)", gold,
                "interval")
        elif form == "infinity":
            gold = f"[{a}, \\infty)"
            add(f"[{a},\\infty)", gold, "interval")
        elif form == "wrong":
            add(f"{lo}{a}, {b + 1}{hi}", gold, "interval")
        else:
            add(gold, gold, "interval")
    for _ in range(35):  # matrices and vectors
        n = rng.choice((2, 2, 3))
        vals = [[Fraction(rng.randint(-9, 9), rng.choice((1, 1, 2, 3))) for _ in range(n)]
                for _ in range(n)]
        env = rng.choice(("pmatrix", "bmatrix"))

        def mat(style: str, env: str = env, vals: list = vals) -> str:
            rows = " \\\\ ".join(" & ".join(_frac(v, style) for v in row) for row in vals)
            return f"\\begin{{{env}}} {rows} \\end{{{env}}}"

        form = rng.choice(("same", "dfrac", "vector", "wrong"))
        if form == "vector":
            vec = [rng.randint(-9, 9) for _ in range(n)]
            gold = "\\begin{pmatrix} " + " \\\\ ".join(map(str, vec)) + " \\end{pmatrix}"
            add(gold.replace("pmatrix", "bmatrix"), gold, "matrix")
        elif form == "wrong":
            vals2 = [row[:] for row in vals]
            vals2[0][0] += 1
            add(mat("frac", vals=vals2), mat("frac"), "matrix")
        else:
            add(mat("dfrac" if form == "dfrac" else "frac"), mat("frac"), "matrix")
    units = (("\\text{ cm}", "cm"), ("\\text{ meters}", "m"), ("\\,\\mathrm{m/s}", "m/s"),
             ("\\text{ hours}", "h"), ("^\\circ", "deg"), ("\\%", "%"), ("\\text{ dollars}", "$"),
             ("\\mbox{ inches}", "in"), ("\\text{ sq units}", "u2"))
    for _ in range(40):  # units
        v = rng.choice((rng.randint(1, 500), round(rng.uniform(0.5, 99.5), 2)))
        unit, _name = rng.choice(units)
        form = rng.choice(("unit", "dollar", "plain", "wrong"))
        if form == "dollar":
            add(f"\\${v:.2f}", f"{v:.2f}", "units")
        elif form == "wrong":
            add(f"{v + 1}{unit}", str(v), "units")
        elif form == "plain":
            add(str(v), f"{v}{unit}", "units")
        else:
            add(f"{v}{unit}", str(v), "units")
    for _ in range(40):  # numbers in other notation
        form = rng.choice(("power", "factorial", "binom", "commas", "sci", "log", "pi", "big"))
        if form == "power":
            b, e = rng.randint(2, 9), rng.randint(2, 12)
            add(f"{b}^{{{e}}}", str(b ** e), "number")
        elif form == "factorial":
            n = rng.randint(3, 30)
            add(f"{n}!", str(math.factorial(n)), "number")
        elif form == "binom":
            n = rng.randint(5, 40)
            k = rng.randint(1, n - 1)
            add(f"\\binom{{{n}}}{{{k}}}", str(math.comb(n, k)), "number")
        elif form == "commas":
            v = rng.randint(1000, 9_999_999)
            add(f"{v:,}".replace(",", "{,}"), str(v), "number")
        elif form == "sci":
            m, e = rng.randint(11, 99), rng.randint(3, 9)
            add(f"{m / 10} \\times 10^{{{e}}}", str(m * 10 ** (e - 1)), "number")
        elif form == "log":
            b, e = rng.choice((2, 3, 10)), rng.randint(2, 6)
            add(f"\\log_{{{b}}} {b ** e}", str(e), "number")
        elif form == "pi":
            k = rng.randint(2, 12)
            add(f"\\frac{{{2 * k}\\pi}}{{2}}", f"{k}\\pi", "number")
        else:
            e = rng.randint(30, 400)
            add(f"2^{{{e}}}", str(2 ** e) if e < 1000 else f"2^{{{e}}}", "number")
    for _ in range(45):  # expressions, tuples, sets, equations, complex numbers
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(-9, 9)
        form = rng.choice(("square", "poly", "tuple", "set", "equation", "complex", "exp",
                           "trig", "nested"))
        if form == "square":
            add(f"(x+{a})^2", f"x^2 + {2 * a}x + {a * a}", "expression")
        elif form == "poly":
            add(f"{a}x^2 + {b}x {'+' if c >= 0 else '-'} {abs(c)}",
                f"{b}x + {a}x^2 {'+' if c >= 0 else '-'} {abs(c)}", "expression")
        elif form == "tuple":
            add(f"\\left( {a}, {c} \\right)", f"({a},{c})", "tuple")
        elif form == "set":
            items = rng.sample(range(-9, 10), 3)
            add("\\{" + ", ".join(map(str, items)) + "\\}",
                "\\{" + ", ".join(map(str, sorted(items))) + "\\}", "set")
        elif form == "equation":
            add(f"y = {a}x + {b}", f"{a}x + {b}", "equation")
        elif form == "complex":
            add(f"{a} + {b}i", f"{a}+{b}i", "complex")
        elif form == "exp":
            add(f"e^{{{a}x}} \\cdot e^{{{b}x}}", f"e^{{{a + b}x}}", "expression")
        elif form == "trig":
            add("\\frac{\\sqrt{3}}{2}", "\\sin 60^\\circ", "expression")
        else:
            add(f"\\frac{{1}}{{1+\\frac{{1}}{{{a}}}}}", _frac(Fraction(a, a + 1)), "expression")
    return out


def builtin_answers(count: int = 100, seed: int = 0) -> list[tuple[str, str, str]]:
    """Answers of the built-in task written as math answers: the sum of digits (``5+7``) as the
    boxed answer, the target as the gold."""
    from g2rl import task

    rng = random.Random(seed)
    out = []
    for ex in task.make_examples("train", count, seed=seed):
        target = ex.answer.split(":")[1] if ":" in ex.answer else ex.answer
        sols = task.solutions(ex.answer)
        pred = rng.choice(sols) if sols and rng.random() < 0.8 else "1+2"
        out.append((f"\\boxed{{{pred}}}", target, "builtin"))
    return out


def pathological_answers() -> list[str]:
    """64 distinct answers of the kinds that stall math-verify: power towers, thousands of
    nested brackets, factorials and binomials of huge numbers, integrals of towers, sums of
    tens of thousands of terms, huge sums and products, deeply nested brackets."""
    out: list[str] = []
    for digits in ((9, 9, 9, 9, 9), (8, 8, 8, 8), (7, 7, 7), (9, 9, 9), (3, 3, 3, 3),
                   (5, 6, 7), (4, 4, 4, 4), (6, 6, 7), (9, 8, 7, 6), (2, 3, 4, 5)):
        out.append("^{".join(map(str, digits)) + "}" * (len(digits) - 1))
    out += ["10^{10^{7}}", "2^{3^{20}}"]
    for n, (o, c) in zip((3000, 2000, 2500, 4000, 1500, 3500, 1000, 5000, 2200, 1200),
                         ("()", "[]", "{}", "()", "()", "[]", "()", "{}", "()", "[]"),
                         strict=True):
        out.append(o * n + "1" + c * n)
    for k in (10, 12, 15, 20):
        out.append(f"10^{{10^{{{k}}}}}!")
    for k in (6, 7, 8, 9):
        out.append(f"(10^{{{k}}})!")
    for k in (9, 10, 12):
        out.append(f"\\binom{{10^{{{k}}}}}{{10^{{{k - 4}}}}}")
    for lo, hi, coef in ((0, 1, ""), (0, 2, "2"), (1, 3, ""), (0, 1, "3"), (0, 5, ""),
                         (1, 2, "\\pi"), (0, 10, ""), (2, 4, "5")):
        out.append(f"{coef}\\int_{{{lo}}}^{{{hi}}} e^{{-x^{{x^x}}}}\\,dx")
    for n, term in ((20001, "1"), (15000, "1"), (30000, "1"), (20001, "2"), (12000, "x"),
                    (25000, "1"), (18000, "3"), (10000, "(1)")):
        out.append("+".join([term] * n))
    for k in (10, 12, 15):
        out.append(f"\\sum_{{k=1}}^{{10^{{{k}}}}} k^k")
    for k in (8, 10):
        out.append(f"\\prod_{{k=1}}^{{10^{{{k}}}}} k^{{k}}")
    out += ["\\sqrt{10^{10^{9}}}", "(10^{10})!!", "\\Gamma(10^{10})",
            "\\left(\\frac{1}{2}\\right)^{10^{9}}", "2^{-10^{9}}", "x^{x^{x^{x}}}"]
    for depth in (22, 26, 30, 40):  # just past the nesting limit (1.5-3 s each unguarded)
        out.append("(" * depth + "7" + ")" * depth)
    assert len(out) == len(set(out)) == 64, len(out)
    return out
