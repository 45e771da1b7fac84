"""Collapse warning: the responses inside groups stop differing while accuracy does not rise.

A policy that collapses onto one mode (spec section 4: ``uniform_groups="shape"`` with sparse
rewards drove the mean pairwise feature cosine from 0.006 to 0.90 and every held-out metric to 0)
samples the same response G times per prompt. Healthy runs on the built-in task keep the mean
feature cosine below about 0.2. The monitor looks at a window of recent steps and fires once
when, averaged over it,

- the mean pairwise feature cosine within groups is above ``cosine`` (default 0.5), or the mean
  number of distinct responses per group is at most ``distinct`` (default 2.0), and
- the training accuracy is not above the accuracy of the run's first window by more than
  ``min_gain`` (a policy that converged on the right answers is not collapsed).

It never stops a run: it prints one warning and sets ``collapse_warning`` in the step metrics.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: The warning's advice for ``python -m g2rl.train`` (its flags).
ADVICE = ("G2RL with uniform_groups='shape' collapses like this when rewards are sparse; "
          "consider --uniform-groups zero, a longer warm start or a smaller --novelty-lambda.")


@dataclass
class CollapseMonitor:
    """Feed it every step's metrics; ``update`` returns a warning message once, else None."""

    window: int = 20
    cosine: float = 0.5
    distinct: float = 2.0
    min_gain: float = 0.05
    fired_at: int | None = None
    _recent: deque = field(default_factory=deque, repr=False)
    _first: list = field(default_factory=list, repr=False)
    #: the message's advice sentence(s); None: :data:`ADVICE` (the built-in trainer's flags)
    advice: str | None = field(default=None, repr=False)

    def update(self, m: dict[str, Any]) -> str | None:
        """Record one step's metrics (``step``, ``accuracy``, ``feature_cos_mean``,
        ``distinct_per_group``); return the warning text the first time the rule holds."""
        row = (float(m["accuracy"]), float(m["feature_cos_mean"]),
               float(m["distinct_per_group"]))
        if len(self._first) < self.window:
            self._first.append(row)
        self._recent.append(row)
        while len(self._recent) > self.window:
            self._recent.popleft()
        if self.fired_at is not None or len(self._recent) < self.window:
            return None
        acc = sum(r[0] for r in self._recent) / self.window
        cos = sum(r[1] for r in self._recent) / self.window
        distinct = sum(r[2] for r in self._recent) / self.window
        acc0 = sum(r[0] for r in self._first) / len(self._first)
        same = cos > self.cosine or distinct <= self.distinct
        if same and acc <= acc0 + self.min_gain:
            self.fired_at = int(m["step"])
            return (f"warning: the policy looks collapsed at step {self.fired_at}: over the last "
                    f"{self.window} steps the responses within a group have mean feature cosine "
                    f"{cos:.3f} and {distinct:.2f} distinct responses per group, while training "
                    f"accuracy is {acc:.3f} (first {len(self._first)} steps: {acc0:.3f}). "
                    f"{ADVICE if self.advice is None else self.advice} The run continues.")
        return None

    @property
    def collapsed(self) -> bool:
        return self.fired_at is not None


@dataclass
class EntropyMonitor:
    """Divergence warning: the policy's token entropy approaches that of the uniform policy.

    The entropy-bonus baseline (``--method entropy``) diverged to the uniform policy under sparse
    rewards on every seed of the study (``docs/study.md``, scenario ``sparse``): the mean token
    entropy climbed to ln V and every held-out metric fell to 0. The monitor fires once when
    the mean of the step metric ``entropy`` over the last ``window`` steps is above
    ``fraction * ln(vocab_size)``; ``fraction`` 0 turns it off. It never stops a run.
    """

    vocab_size: int
    window: int = 20
    fraction: float = 0.8
    fired_at: int | None = None
    _recent: deque = field(default_factory=deque, repr=False)

    def update(self, m: dict[str, Any]) -> str | None:
        """Record one step's metrics (``step``, ``entropy``); return the warning text the
        first time the rule holds."""
        self._recent.append(float(m["entropy"]))
        while len(self._recent) > self.window:
            self._recent.popleft()
        if (self.fired_at is not None or self.fraction <= 0 or self.vocab_size < 2
                or len(self._recent) < self.window):
            return None
        ent = sum(self._recent) / self.window
        top = math.log(self.vocab_size)
        if ent > self.fraction * top:
            self.fired_at = int(m["step"])
            return (f"warning: the policy is diverging towards uniform at step {self.fired_at}: "
                    f"mean token entropy {ent:.3f} nats over the last {self.window} steps, "
                    f"{ent / top:.0%} of ln V = {top:.3f} (V = {self.vocab_size}). An entropy "
                    "bonus does this when rewards are sparse (most groups all wrong, so the "
                    "bonus is the only signal); lower --entropy-coef, use a longer warm start "
                    "or --method grpo. The run continues.")
        return None

    @property
    def diverged(self) -> bool:
        return self.fired_at is not None
