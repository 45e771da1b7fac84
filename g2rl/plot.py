"""PNG plots (matplotlib, Agg backend): reward and accuracy per RL step of a run, and pass@k
against k for a study (:func:`plot_passk`).

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
    return _save(fig, out, dpi=100)


def _save(fig: Any, out: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_passk(out: str | Path, panels: dict[str, dict[str, dict[int, float]]], title: str,
               dashed: tuple[str, ...] = ()) -> Path:
    """pass@k against k (log2 axis): one subplot per panel (``{panel title: {curve label:
    {k: pass@k}}}``), one line per curve; the curves named in ``dashed`` dashed and grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=True):
        for label, curve in curves.items():
            ks = sorted(curve)
            style = dict(ls="--", color="grey") if label in dashed else {}
            ax.plot(ks, [curve[k] for k in ks], marker="o", ms=3, label=label, **style)
        ax.set_xscale("log", base=2)
        ticks = sorted({k for curve in curves.values() for k in curve})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    return _save(fig, out, dpi=90)


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
