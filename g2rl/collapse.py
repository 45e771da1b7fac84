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

from collections import deque
from dataclasses import dataclass, field
from typing import Any


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
                    "G2RL with uniform_groups='shape' collapses like this when rewards are "
                    "sparse; consider --uniform-groups zero, a longer warm start or a smaller "
                    "--novelty-lambda. The run continues.")
        return None

    @property
    def collapsed(self) -> bool:
        return self.fired_at is not None
