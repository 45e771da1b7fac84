"""PNG plot of reward and accuracy per RL step (matplotlib, Agg backend).

``python -m g2rl.plot RUN_DIR`` redraws ``RUN_DIR/training.png`` from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank or torn last lines skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(metrics: list[dict[str, Any]], out: str | Path,
             evals: dict[str, Any] | None = None, title: str | None = None) -> Path:
    """Draw reward mean, accuracy and the mean pairwise feature cosine within groups per step,
    raw and smoothed; the held-out pass@1 of the evaluations in ``evals`` (``{"start": {...},
    "end": {...}}``) as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    window = max(1, len(steps) // 15)
    for ax, key, label in ((axes[0], "reward_mean", "reward (mean)"),
                           (axes[1], "accuracy", "accuracy (train samples)"),
                           (axes[2], "feature_cos_mean", "feature cosine within groups")):
        vals = [float(m.get(key, float("nan"))) for m in metrics]
        ax.plot(steps, vals, color="tab:blue", alpha=0.3, lw=1, label="per step")
        if steps:
            ax.plot(steps, _smooth(vals, window), color="tab:blue", lw=2,
                    label=f"moving mean ({window})")
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if evals:
        last = steps[-1] if steps else 0
        for name, x, color in (("start", 0, "tab:orange"), ("end", last, "tab:green")):
            res = evals.get(name)
            if res and "pass@1" in res:
                axes[1].scatter([x], [res["pass@1"]], color=color, zorder=3, marker="D",
                                label=f"held-out pass@1 ({name}): {res['pass@1']:.3f}")
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[2].legend(loc="upper left", fontsize=8)
    axes[1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m g2rl.plot RUN_DIR")
    run = Path(args[0])
    evals = None
    if (run / "eval_summary.json").is_file():
        evals = json.loads((run / "eval_summary.json").read_text())
    path = plot_run(read_metrics(run / "metrics.jsonl"), run / "training.png", evals, run.name)
    print(path)


if __name__ == "__main__":
    main()
