"""``python -m g2rl.study``: does G2RL beat GRPO on this task? Like-for-like runs over seeds.

A study is a grid of scenarios x variants x seeds:

- a *scenario* is a named set of trainer options for the start of RL (``dense``: the default
  warm start; ``sparse``: a short one, so most early groups are all wrong);
- a *variant* is a method with options (``--methods grpo,g2rl`` gives one variant per method;
  ``--variant g2rl-eq12:method=g2rl,novelty_mode=eq12`` adds a named one);
- for every (scenario, seed) the warm start is trained once (``python -m g2rl.train
  --warm-start-only``) and evaluated once; every variant of that seed starts from that very
  checkpoint (``--model``), so differences between methods are paired.

Every run is a ``python -m g2rl.train`` subprocess with one thread; at most ``--jobs`` run at
once (default: the number of cores). A finished run (its ``eval_summary.json`` has an ``end``
evaluation) is skipped and a killed one resumed (``--resume``), so rerunning the same command
continues a study. Ctrl-C or SIGTERM passes SIGTERM to the running trainers (each saves its
step) and stops.

Scenarios: ``dense`` and ``sparse`` (the built-in subset-sum task); ``countdown`` and
``countdown-sparse`` (``--task countdown`` with a long, resp. short SFT warm start:
:data:`COUNTDOWN_SFT_STEPS`, :data:`COUNTDOWN_SPARSE_SFT_STEPS`; evaluated with 128 samples on
128 problems, pass@k for k = 1, 2, 4, ..., 128), to ask whether G2RL explores: finds more
distinct solutions, and the rare strategy (``/``) that the warm start under-samples.

Any option the trainer takes (``--model``, ``--data``, ``--steps``, ...) can be given after the
study's own options and applies to every run; ``python -m g2rl.train --help`` lists them.
Precedence of the trainer options of a run (later wins, see :func:`scenario_argv`):

1. the study defaults :data:`STUDY_DEFAULTS` (``--eval-n 16 --eval-ks 1,4,16``);
2. the scenario's evaluation options (``eval_n``, ``eval_ks``, ``eval_problems``: the
   trainer's "evaluation" group);
3. the options given to the study (so ``--eval-n 4`` overrides both of the above);
4. the scenario's other options (``task``, ``sft_steps``: they define the scenario);
5. the variant's options, then what the study sets itself (``--seed``, ``--output-dir``, the
   warm-start checkpoint as ``--model`` with ``--sft-steps 0``).

Writes ``study.json`` (every run's numbers and the aggregates), ``study.md`` and the plots.
Per scenario ``study.md`` has: the end-of-RL pass@k and maj@k (at most three k: the smallest,
16 and the largest) per variant, mean and sd over seeds, with the paired difference to the
baseline and its 95% t-interval over seeds; where the task has problem classes (countdown: A,
B, both) the warm start's evaluation per class and SFT statistics, and the end-of-RL pass@k
per class with paired differences; an exploration table (distinct correct solutions, solution
entropy, rare-strategy share, B-only pass@k, training coverage, groups with several correct
answers, advantage moved relative to GRPO, the entropy warning); the geometry table. Plots:
``study.png`` (training accuracy and within-group feature cosine per step) and
``study_passk_<scenario>.png`` (pass@k against k per variant and for the warm start, on all
problems and on B-only problems).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from g2rl.collapse import CollapseMonitor
from g2rl.config import ConfigError, TrainConfig, flag, parse_config

#: SFT warm-start steps of the ``countdown`` scenario.
COUNTDOWN_SFT_STEPS = "1000"
#: SFT warm-start steps of the ``countdown-sparse`` scenario (a weaker start).
COUNTDOWN_SPARSE_SFT_STEPS = "250"
#: The evaluation of the countdown scenarios: 128 samples per problem, so pass@k up to 128.
COUNTDOWN_EVAL = {"eval_n": "128", "eval_ks": "1,2,4,8,16,32,64,128", "eval_problems": "128"}

#: Named scenarios: trainer options applied to the warm start and every run of the scenario.
SCENARIOS: dict[str, dict[str, str]] = {
    "dense": {},  # the default warm start (250 SFT steps on the built-in task)
    "sparse": {"sft_steps": "50"},  # a short warm start: most early groups are all wrong
    # exploration: does G2RL find the rare strategy ("/") the SFT traces under-sample?
    "countdown": {"task": "countdown", **COUNTDOWN_EVAL, "sft_steps": COUNTDOWN_SFT_STEPS},
    "countdown-sparse": {"task": "countdown", **COUNTDOWN_EVAL,
                         "sft_steps": COUNTDOWN_SPARSE_SFT_STEPS},
}
DEFAULT_METHODS = ("grpo", "entropy", "embedding", "g2rl")
#: Options every run of a study gets unless the user gives them (the paper's evaluation).
STUDY_DEFAULTS = {"eval_n": "16", "eval_ks": "1,4,16"}
#: Steps at the start and the end of training averaged for the geometry trend.
TREND_WINDOW = 20

# two-sided 95% quantiles of Student's t, df = 1..30
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class StudyError(ValueError):
    """A bad study option (message ready for the user)."""


@dataclass
class Variant:
    label: str
    options: dict[str, str]


@dataclass
class Job:
    """One trainer subprocess: a warm start (``variant`` None) or an RL run."""

    scenario: str
    seed: int
    run_dir: Path
    argv: list[str]
    steps: int
    variant: Variant | None = None
    depends: Job | None = None
    status: str = "pending"  # pending, done, running, failed, skipped
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        what = "warm start" if self.variant is None else self.variant.label
        return f"{self.scenario}/{what}/seed {self.seed}"

    def finished(self) -> bool:
        summary = _read_json(self.run_dir / "eval_summary.json")
        if self.variant is None:
            return ("warm_start" in summary
                    and (self.run_dir / "warm_start" / "config.json").is_file())
        return "final_checkpoint" in summary  # written last by every complete run

    def steps_done(self) -> int:
        if self.variant is None:
            return 0
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return 0
        with path.open("rb") as fh:
            return sum(1 for _ in fh)


# ---------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m g2rl.study", allow_abbrev=False,
        description="G2RL against baselines, like for like over seeds. Options not listed here "
                    "are trainer options (python -m g2rl.train --help) applied to every run.",
    )
    p.add_argument("--out", default="studies/default", help="study directory (default: "
                   "%(default)s); rerunning with the same directory resumes")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated methods, one variant each (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL[,KEY=VAL]",
                   help="a named variant: trainer options (field names, - or _), e.g. "
                        "g2rl-eq12:method=g2rl,novelty_mode=eq12; repeatable")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--scenarios", default="dense",
                   help=f"comma-separated scenarios from {sorted(SCENARIOS)} (default: "
                        "%(default)s)")
    p.add_argument("--baseline", default="grpo",
                   help="variant the paired differences are taken against (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs at once, one thread each (default: the number of cores, "
                        "%(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="only write the report from the runs already finished")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p


def parse_variant(text: str) -> Variant:
    """``NAME:key=val,key=val`` -> :class:`Variant` (keys checked against the trainer's)."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise StudyError(f"--variant {text!r}: expected NAME:KEY=VAL[,KEY=VAL]")
    options: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise StudyError(f"--variant {text!r}: {item!r} is not KEY=VAL")
        options[_field_name(key, f"--variant {text!r}")] = value.strip()
    if "method" not in options:
        raise StudyError(f"--variant {text!r}: give method=... (one of "
                         f"{', '.join(m for m in _choices('method'))})")
    return Variant(name.strip(), options)


def _field_name(key: str, where: str) -> str:
    name = key.strip().replace("-", "_")
    known = {f.name for f in fields(TrainConfig)}
    if name not in known:
        raise StudyError(f"{where}: unknown trainer option {key!r}")
    if name in ("output_dir", "resume", "seed", "warm_start_only"):
        raise StudyError(f"{where}: {key!r} is set by the study itself")
    return name


def _choices(name: str) -> tuple:
    return TrainConfig.__dataclass_fields__[name].metadata["choices"] or ()


def options_to_argv(options: dict[str, str]) -> list[str]:
    """Trainer flags for ``{field: value}`` (booleans as --x / --no-x)."""
    argv: list[str] = []
    for name, value in options.items():
        if TrainConfig.__dataclass_fields__[name].metadata["type"] is bool:
            on = str(value).strip().lower() in ("1", "true", "yes", "on")
            argv.append(flag(name) if on else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag(name), str(value)]
    return argv


def _int_list(text: str, option: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StudyError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise StudyError(f"{option} is empty")
    return out


def plan(ns: argparse.Namespace, passthrough: list[str]) -> list[Job]:
    """Every job of the study, warm starts first; raises :class:`StudyError` on bad options."""
    out = Path(ns.out).expanduser()
    seeds = _int_list(ns.seeds, "--seeds")
    scenarios = [s.strip() for s in ns.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            raise StudyError(f"--scenarios: unknown scenario {s!r} (known: {sorted(SCENARIOS)})")
    variants = [Variant(m.strip(), {"method": m.strip()})
                for m in ns.methods.split(",") if m.strip()]
    for v in variants:
        if v.label not in _choices("method"):
            raise StudyError(f"--methods: unknown method {v.label!r} (known: "
                             f"{', '.join(_choices('method'))})")
    variants += [parse_variant(t) for t in ns.variant]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise StudyError(f"variant names must be unique, got {labels}")
    if not variants:
        raise StudyError("no variants: give --methods or --variant")
    if ns.jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {ns.jobs}")
    given = set()
    for a in passthrough:
        if a.startswith("--"):
            given.add(a[2:].split("=")[0].replace("-", "_").removeprefix("no_"))
    for a in ("output_dir", "resume", "seed", "warm_start_only"):
        if a in given:
            raise StudyError(f"{flag(a)} is set by the study itself")
    jobs: list[Job] = []
    # seed-major order: an interrupted study has whole seeds of every scenario and variant
    for seed in seeds:
        for scenario in scenarios:
            base = scenario_argv(scenario, passthrough, given)
            ws_dir = out / scenario / f"warm_start_seed{seed}"
            warm = Job(scenario, seed, ws_dir, [*base, "--seed", str(seed),
                                               "--warm-start-only", "--no-eval-before-sft",
                                               "--output-dir", str(ws_dir)], steps=0)
            _check_options(warm.argv, warm.name)
            jobs.append(warm)
            for v in variants:
                run_dir = out / scenario / v.label / f"seed{seed}"
                argv = [*base, *options_to_argv(v.options), "--seed", str(seed)]
                cfg = _check_options(argv, f"{scenario}/{v.label}")
                argv += ["--model", str(ws_dir / "warm_start"), "--sft-steps", "0",
                         "--no-eval-start", "--output-dir", str(run_dir)]
                jobs.append(Job(scenario, seed, run_dir, argv, steps=cfg.steps, variant=v,
                                depends=warm))
    return jobs


def scenario_argv(scenario: str, passthrough: list[str], given: set[str]) -> list[str]:
    """Trainer flags shared by every run of ``scenario`` (argparse: the last flag given wins).

    Order: the study defaults and the scenario's evaluation options (those the user did not
    give), the user's own flags, then the scenario's other options (they define it)."""
    opts = SCENARIOS[scenario]
    evaluation = {k: v for k, v in opts.items() if _is_eval_option(k)}
    head = {k: v for k, v in {**STUDY_DEFAULTS, **evaluation}.items() if k not in given}
    tail = {k: v for k, v in opts.items() if k not in evaluation}
    return [*options_to_argv(head), *passthrough, "--threads", "1", "--no-progress",
            *options_to_argv(tail)]


def _is_eval_option(name: str) -> bool:
    return TrainConfig.__dataclass_fields__[name].metadata["group"] == "evaluation"


def _check_options(argv: list[str], where: str) -> TrainConfig:
    try:
        return parse_config(argv)
    except ConfigError as exc:
        raise StudyError(f"{where}: {exc}") from exc
    except SystemExit as exc:  # argparse: an unknown flag (its message is printed already)
        raise StudyError(f"{where}: bad trainer options {argv}") from exc


# ---------------------------------------------------------------------- running
class _Stop:
    """SIGINT/SIGTERM: stop launching, pass SIGTERM to the running trainers."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum


def run_jobs(jobs: list[Job], parallel: int, progress: bool = True) -> int:
    """Run the pending jobs, at most ``parallel`` at once; returns 0, 1 (a job failed) or
    128 + signal number (interrupted)."""
    from tqdm.auto import tqdm

    for j in jobs:
        if j.finished():
            j.status = "done"
    stop = _Stop()
    stop.install()
    total = sum(j.steps for j in jobs if j.variant is not None)
    bar = tqdm(total=total, desc="study (RL steps)", disable=not progress, dynamic_ncols=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    say = tqdm.write
    try:
        while True:
            for j in jobs:
                if j.status == "running" and j.proc.poll() is not None:
                    _finish(j, say)
            running = [j for j in jobs if j.status == "running"]
            if stop.signum is None:
                for j in jobs:
                    if len(running) >= parallel:
                        break
                    if j.status != "pending":
                        continue
                    if j.depends is not None and j.depends.status in ("failed", "skipped"):
                        j.status = "skipped"
                        say(f"skipped {j.name}: its warm start failed")
                        continue
                    if j.depends is not None and j.depends.status != "done":
                        continue
                    _start(j, env, say)
                    running.append(j)
            bar.n = sum(min(j.steps, j.steps_done()) for j in jobs if j.variant is not None)
            bar.set_postfix_str(", ".join(j.name for j in running)[:120])
            bar.refresh()
            if not running and (stop.signum is not None
                                or not any(j.status == "pending" for j in jobs)):
                break
            if stop.signum is not None:
                for j in running:
                    if j.proc.poll() is None and not getattr(j, "_termed", False):
                        j.proc.send_signal(signal.SIGTERM)
                        j._termed = True  # type: ignore[attr-defined]
            time.sleep(1.0)
    finally:
        bar.close()
        for j in jobs:
            if j.status == "running" and j.proc.poll() is None:
                j.proc.send_signal(signal.SIGTERM)
                j.proc.wait()
                _finish(j, say)
    if stop.signum is not None:
        say("study interrupted: the running trainers saved their step; rerun the same command "
            "to continue")
        return 128 + stop.signum
    failed = [j for j in jobs if j.status in ("failed", "skipped")]
    for j in failed:
        say(f"{j.status}: {j.name} (log: {j.run_dir / 'train.log'})")
    return 1 if failed else 0


def _start(j: Job, env: dict[str, str], say: Any) -> None:
    j.run_dir.mkdir(parents=True, exist_ok=True)
    argv = list(j.argv)
    if j.variant is not None and any((j.run_dir / "checkpoints").glob("step_*")):
        argv.append("--resume")
    elif j.variant is None:  # an interrupted warm start starts over
        for stale in ("checkpoints", "warm_start.tmp"):
            _rmtree(j.run_dir / stale)
    j.log = (j.run_dir / "train.log").open("a", encoding="utf-8")
    j.log.write(f"\n$ {sys.executable} -m g2rl.train {' '.join(argv)}\n")
    j.log.flush()
    j.proc = subprocess.Popen([sys.executable, "-m", "g2rl.train", *argv], stdout=j.log,
                              stderr=subprocess.STDOUT, env=env)
    j.status = "running"
    say(f"started {j.name}" + (" (resumed)" if "--resume" in argv else ""))


def _finish(j: Job, say: Any) -> None:
    rc = j.proc.wait()
    j.log.close()
    if rc == 0 and j.finished():
        j.status = "done"
        say(f"finished {j.name}")
    elif rc in (130, 143, -signal.SIGTERM, -signal.SIGINT):
        j.status = "pending"  # interrupted: resumed next time
    elif rc == 3:  # g2rl.train: the run directory is locked by another live process
        j.status = "failed"
        say(f"FAILED {j.name}: its run directory {j.run_dir} is in use by another process "
            "(another study on the same --out?); see its train.log")
    else:
        j.status = "failed"
        tail = (j.run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
        say(f"FAILED {j.name} (exit {rc}); last lines of its log:\n"
            + "\n".join(tail.splitlines()[-8:]))


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------- statistics
def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% t-interval of the mean of paired differences over seeds."""
    n = len(diffs)
    m, sd = mean_sd(diffs)
    if n < 2:
        return m, math.nan, math.nan
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * sd / math.sqrt(n)
    return m, m - half, m + half


# ---------------------------------------------------------------------- report
EVAL_GEOMETRY = ("feature_cos_mean", "feature_neg_share", "semantic_cos_mean",
                 "semantic_neg_share")
#: Solution-diversity numbers of an evaluation (see :func:`g2rl.eval.solution_stats`).
EVAL_SOLUTIONS = ("distinct_correct_mean", "multi_solution_share", "solution_entropy_mean",
                  "rare_share")
#: Per-step exploration numbers averaged over all RL steps of a run.
STEP_EXPLORATION = ("multi_correct_frac", "novelty_spread_frac", "adv_moved")
#: Cumulative coverage numbers of the last RL step of a run.
COVERAGE = ("coverage_solved", "coverage_solutions")


def collect(jobs: list[Job]) -> dict[str, Any]:
    """Per run: the end (and start) evaluation and training summaries; per finished warm
    start: its start-of-RL evaluation and SFT statistics."""
    from g2rl.plot import read_metrics

    runs = []
    for j in jobs:
        if j.variant is None or not j.finished():
            continue
        summary = _read_json(j.run_dir / "eval_summary.json")
        start = _read_json(j.depends.run_dir / "eval_summary.json").get("start", {})
        end = summary.get("end", {})
        rows = read_metrics(j.run_dir / "metrics.jsonl")
        runs.append({
            "scenario": j.scenario, "variant": j.variant.label, "options": j.variant.options,
            "seed": j.seed, "run_dir": str(j.run_dir), "start": _numbers(start),
            "end": _numbers(end), "end_by_class": _by_class(end),
            "training": training_summary(rows), "wall_time_s": summary.get("wall_time_s"),
        })
    warm = [warm_start_record(j) for j in jobs if j.variant is None and j.finished()]
    return {"runs": runs, "warm_starts": warm}


def warm_start_record(j: Job) -> dict[str, Any]:
    """A warm start's start-of-RL evaluation (overall and per class) and SFT statistics."""
    summary = _read_json(j.run_dir / "eval_summary.json")
    start, sft = summary.get("start", {}), summary.get("sft", {})
    shares = sft.get("class_share") if isinstance(sft.get("class_share"), dict) else {}
    return {"scenario": j.scenario, "seed": j.seed, "run_dir": str(j.run_dir),
            "start": _numbers(start), "start_by_class": _by_class(start),
            "sft": {**_numbers(sft), **{f"class_share_{c}": v
                                        for c, v in _numbers(shares).items()}},
            "task": sft.get("task")}


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float))
            and not isinstance(v, bool)}


def _by_class(d: dict[str, Any]) -> dict[str, dict[str, float]]:
    classes = d.get("by_class")
    if not isinstance(classes, dict):
        return {}
    return {c: _numbers(v) for c, v in classes.items() if isinstance(v, dict)}


def training_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Geometry trend (first / last TREND_WINDOW steps), advantage mass, collapse flag,
    exploration (means over all steps, coverage at the last step, the entropy warning), and the
    per-step curves the plot needs."""
    first, last = rows[:TREND_WINDOW], rows[-TREND_WINDOW:]
    out: dict[str, Any] = {"steps": len(rows)}
    for key in ("feature_cos_mean", "feature_neg_share", "semantic_cos_mean", "accuracy",
                "distinct_per_group"):
        out[f"{key}_first"] = _avg(key, first)
        out[f"{key}_last"] = _avg(key, last)
    for key in ("uniform_group_frac", "adv_mass_uniform", *STEP_EXPLORATION):
        out[key] = _avg(key, rows)
    for key in COVERAGE:
        vals = [float(r[key]) for r in rows if _is_number(r.get(key))]
        out[f"{key}_last"] = vals[-1] if vals else math.nan
    # replayed with the current default thresholds (the same rule as the trainer's warning)
    monitor = CollapseMonitor()
    for r in rows:
        if all(isinstance(r.get(k), (int, float)) for k in
               ("accuracy", "feature_cos_mean", "distinct_per_group")):
            monitor.update(r)
    out["collapse_warning"] = monitor.collapsed
    out["collapse_step"] = monitor.fired_at
    fired = [r.get("step", i + 1) for i, r in enumerate(rows) if r.get("entropy_warning") is True]
    out["entropy_warning"] = bool(fired)
    out["entropy_warning_step"] = fired[0] if fired else None
    out["curve_accuracy"] = [float(r.get("accuracy", math.nan)) for r in rows]
    out["curve_feature_cos"] = [float(r.get("feature_cos_mean", math.nan)) for r in rows]
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _avg(key: str, part: list[dict[str, Any]]) -> float:
    vals = [float(r[key]) for r in part if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else math.nan


def _k_order(key: str) -> tuple[bool, int]:
    return key.split("@")[0] != "pass", int(key.split("@")[1])


def metric_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The pass@k and maj@k keys of the runs' end evaluations: pass first, by k."""
    return sorted({k for r in runs for k in r["end"] if k.startswith(("pass@", "maj@"))},
                  key=_k_order)


def headline_keys(keys: list[str]) -> list[str]:
    """The keys of a main table: pass@k (and maj@k where present) for every k when there are
    at most three, else for the smallest, 16 (or the middle one) and the largest k."""
    ks = sorted({int(k.split("@")[1]) for k in keys if k.startswith("pass@")})
    if len(ks) > 3:
        mid = 16 if 16 in ks[1:-1] else ks[len(ks) // 2]
        ks = [ks[0], mid, ks[-1]]
    return [f"{p}@{k}" for p in ("pass", "maj") for k in ks if f"{p}@{k}" in keys]


def compare(mine: dict[int, dict[str, float]], base: dict[int, dict[str, float]],
            keys: list[str], paired_keys: list[str]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Over seeds: (mean, sd) of each key of ``mine``, and for ``paired_keys`` the paired
    difference to ``base`` (same seed) as (mean, low, high) of a 95% t-interval."""
    metrics, paired = {}, {}
    for k in keys:
        vals = [mine[s][k] for s in sorted(mine) if k in mine[s]]
        if vals:
            metrics[k] = mean_sd(vals)
        diffs = [mine[s][k] - base[s][k] for s in sorted(mine)
                 if s in base and k in mine[s] and k in base[s]]
        if diffs and k in paired_keys:
            paired[k] = paired_interval(diffs)
    return metrics, paired


def _runs_of(runs: list[dict[str, Any]], scenario: str, variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if (r["scenario"], r["variant"]) == (scenario, variant)}


def aggregate(data: dict[str, Any], baseline: str) -> list[dict[str, Any]]:
    """One row per (scenario, variant): mean/sd over seeds and paired differences, overall
    and per problem class; the exploration summary. Also sets ``data["metric_keys"]``,
    ``data["table_keys"]`` (per scenario) and ``data["start_of_rl"]``."""
    rows = []
    runs = data["runs"]
    keys = metric_keys(runs)
    for scenario, variant in dict.fromkeys((r["scenario"], r["variant"]) for r in runs):
        mine = _runs_of(runs, scenario, variant)
        base = _runs_of(runs, scenario, baseline) if variant != baseline else {}
        row: dict[str, Any] = {"scenario": scenario, "variant": variant, "seeds": sorted(mine)}
        overall = keys + list(EVAL_GEOMETRY) + list(EVAL_SOLUTIONS)
        row["metrics"], row["paired"] = compare(
            {s: r["end"] for s, r in mine.items()}, {s: r["end"] for s, r in base.items()},
            overall, overall)
        row["by_class"], row["paired_by_class"] = _compare_classes(mine, base)
        for k in ("feature_cos_mean_first", "feature_cos_mean_last", "uniform_group_frac",
                  "adv_mass_uniform", "distinct_per_group_last"):
            vals = [mine[s]["training"][k] for s in sorted(mine)]
            row["metrics"][k] = mean_sd([v for v in vals if not math.isnan(v)])
        row["collapsed_seeds"], row["collapse_steps"] = _fired(mine, "collapse")
        row["entropy_warning_seeds"], row["entropy_warning_steps"] = _fired(mine,
                                                                            "entropy_warning")
        row["exploration"] = exploration(row, mine)
        start = [mine[s]["start"] for s in sorted(mine)]
        row["start"] = {k: mean_sd([x[k] for x in start if k in x])[0] for k in keys
                        if any(k in x for x in start)}
        rows.append(row)
    data["metric_keys"] = keys
    data["table_keys"] = {s: headline_keys(metric_keys([r for r in runs if r["scenario"] == s]))
                          for s in dict.fromkeys(r["scenario"] for r in runs)}
    data["start_of_rl"] = aggregate_start(data.get("warm_starts", []))
    return rows


def _fired(mine: dict[int, dict], warning: str) -> tuple[list[int], list[Any]]:
    """The seeds whose run fired ``warning`` (``collapse``: the collapse warning replayed;
    ``entropy_warning``), and the step it fired at in each."""
    flag_key = "collapse_warning" if warning == "collapse" else warning
    seeds = [s for s in sorted(mine) if mine[s]["training"].get(flag_key)]
    return seeds, [mine[s]["training"].get(f"{warning}_step") for s in seeds]


def _compare_classes(mine: dict[int, dict], base: dict[int, dict]
                     ) -> tuple[dict[str, dict], dict[str, dict]]:
    by_class, paired = {}, {}
    for cls in sorted({c for r in mine.values() for c in r.get("end_by_class", {})}):
        m = {s: r["end_by_class"][cls] for s, r in mine.items() if cls in r["end_by_class"]}
        b = {s: r["end_by_class"][cls] for s, r in base.items()
             if cls in r.get("end_by_class", {})}
        keys = sorted({k for x in m.values() for k in x})
        by_class[cls], paired[cls] = compare(m, b, keys, [k for k in keys if k != "n_prompts"])
    return by_class, paired


def _max_pass_k(metrics: dict[str, Any]) -> int | None:
    ks = [int(k.split("@")[1]) for k in metrics if k.startswith("pass@")]
    return max(ks) if ks else None


def exploration(row: dict[str, Any], mine: dict[int, dict]) -> dict[str, tuple]:
    """Mean and sd over seeds of the exploration numbers of a row: at the end of RL the
    distinct correct solutions and solution entropy per problem, the rare-strategy share on
    ``both`` problems (``both:rare_share``) and the largest-k pass@k on ``B`` problems
    (``B:pass@K``); over training the last coverage (``coverage_solved_last``,
    ``coverage_solutions_last``) and the step means of :data:`STEP_EXPLORATION`."""
    out = {k: row["metrics"][k] for k in ("distinct_correct_mean", "solution_entropy_mean")
           if k in row["metrics"]}
    both, b_only = row["by_class"].get("both", {}), row["by_class"].get("B", {})
    if "rare_share" in both:
        out["both:rare_share"] = both["rare_share"]
    kmax = _max_pass_k(b_only)
    if kmax is not None:
        out[f"B:pass@{kmax}"] = b_only[f"pass@{kmax}"]
    for k in [f"{c}_last" for c in COVERAGE] + list(STEP_EXPLORATION):
        vals = [mine[s]["training"].get(k, math.nan) for s in sorted(mine)]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            out[k] = mean_sd(vals)
    return out


def _means(records: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: mean_sd([r[k] for r in records if k in r]) for k in keys}


def aggregate_start(warm_starts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario, mean and sd over the seeds' warm starts: the start-of-RL evaluation
    (``overall`` and ``by_class``) and the SFT statistics (``sft``: ``rare_trace_share``,
    ``problems``, ``class_share_<class>``, ...)."""
    out: dict[str, Any] = {}
    for scenario in dict.fromkeys(w["scenario"] for w in warm_starts):
        mine = sorted((w for w in warm_starts if w["scenario"] == scenario),
                      key=lambda w: w["seed"])
        classes = sorted({c for w in mine for c in w["start_by_class"]})
        out[scenario] = {
            "seeds": [w["seed"] for w in mine], "task": mine[0].get("task"),
            "overall": _means([w["start"] for w in mine]),
            "by_class": {c: _means([w["start_by_class"][c] for w in mine
                                    if c in w["start_by_class"]]) for c in classes},
            "sft": _means([w["sft"] for w in mine]),
        }
    return out


def _fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    if ms is None or math.isnan(ms[0]):
        return "-"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _fmt_diff(t: tuple[float, float, float] | None) -> str:
    if t is None:
        return "-"
    m, lo, hi = t
    if math.isnan(lo):
        return f"{m:+.3f}"
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _seeds_fired(seeds: list[int], steps: list[Any]) -> str:
    return f"seeds {seeds} (steps {steps})" if seeds else "none"


def write_markdown(path: Path, rows: list[dict[str, Any]], data: dict[str, Any],
                   baseline: str, command: str) -> None:
    ran = data.get("commands") or [command]
    lines = ["# G2RL study", "", "Produced by (every run of the study directory, then this "
             "report):", "", *[f"    {c}" for c in ran + ([command] if command not in ran
                                                             else [])], "",
             "Held-out evaluation at the end of RL: mean ± sd over seeds. Paired difference to "
             f"`{baseline}`: for each seed, the variant's metric minus `{baseline}`'s (same seed, "
             "same warm-start checkpoint, same evaluation problems and sampling seed); mean over "
             "seeds with a 95% t-interval (mean ± t(0.975, n-1) sd / sqrt(n)); t = "
             + ", ".join(f"{_T95[n - 2]:.2f} with {n} seeds" for n in sorted(
                 {len(r["seeds"]) for r in rows if len(r["seeds"]) >= 2})
                 if 2 <= n <= len(_T95) + 1) +
             ", so intervals are wide: an interval that contains 0 is no evidence either way.",
             ""]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        part = [r for r in rows if r["scenario"] == scenario]
        keys = data.get("table_keys", {}).get(scenario, data.get("metric_keys", []))
        start = data.get("start_of_rl", {}).get(scenario, {})
        lines += _md_main(scenario, part, keys, baseline)
        lines += _md_start(start, [k for k in keys if k.startswith("pass@")])
        lines += _md_by_class(part, [k for k in keys if k.startswith("pass@")], baseline)
        lines += _md_exploration(part, start)
        lines += _md_geometry(part)
        png = data.get("plots", {}).get("passk", {}).get(scenario)
        if png:
            lines += [f"pass@k against k at the end of RL (mean over seeds; dashed: the warm "
                      f"start): [{png}]({png})", "", f"![pass@k, {scenario}]({png})", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _md_main(scenario: str, part: list[dict[str, Any]], keys: list[str],
             baseline: str) -> list[str]:
    opts = SCENARIOS.get(scenario, {})
    described = ", ".join(f"{k}={v}" for k, v in opts.items()) or "the default warm start"
    lines = [f"## Scenario `{scenario}` ({described})", ""]
    if part and part[0]["start"]:
        lines += ["Start of RL (the shared warm start, mean over seeds): " + ", ".join(
            f"{k} {part[0]['start'][k]:.3f}" for k in keys if k in part[0]["start"]), ""]
    lines.append("| variant | seeds | " + " | ".join(keys) + " | " +
                 " | ".join(f"Δ{k} vs {baseline}" for k in keys) + " |")
    lines.append("|---" * (2 + 2 * len(keys)) + "|")
    for r in part:
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | " +
                     " | ".join(_fmt(r["metrics"].get(k)) for k in keys) + " | " +
                     " | ".join(_fmt_diff(r["paired"].get(k)) for k in keys) + " |")
    return [*lines, ""]


_CLASS_NAMES = {"A": "A (no solution uses the rare strategy)",
                "B": "B-only (every solution uses it)", "both": "both"}


def _md_start(start: dict[str, Any], keys: list[str]) -> list[str]:
    """The warm start's evaluation per problem class and its SFT statistics."""
    if not start or not start.get("by_class"):
        return []
    cols = ["n_prompts", *keys, "distinct_correct_mean", "solution_entropy_mean", "rare_share"]
    lines = ["Start of RL per problem class (the warm start of each seed, mean ± sd over "
             f"seeds {start['seeds']}):", "",
             "| problems | count | " + " | ".join(keys) + " | distinct correct | solution "
             "entropy | rare share |", "|---" * (len(cols) + 1) + "|"]
    for name, numbers in (("all", start["overall"]), *start["by_class"].items()):
        lines.append(f"| {_CLASS_NAMES.get(name, name)} | " + " | ".join(
            _fmt(numbers.get(k), 0 if k == "n_prompts" else 3) for k in cols) + " |")
    sft = start.get("sft", {})
    if sft:
        shares = ", ".join(f"{k.removeprefix('class_share_')} {_fmt(v, 2)}"
                           for k, v in sft.items() if k.startswith("class_share_"))
        lines += ["", f"SFT warm start ({start.get('task') or 'task'}): "
                  f"{_fmt(sft.get('problems'), 0)} problems of {_fmt(sft.get('train_problems'), 0)}"
                  f"; share of traces using the rare strategy {_fmt(sft.get('rare_trace_share'))}"
                  + (f"; problem classes {shares}" if shares else "")]
    return [*lines, ""]


def _md_by_class(part: list[dict[str, Any]], keys: list[str], baseline: str) -> list[str]:
    """End of RL per problem class: mean ± sd and the paired difference to the baseline."""
    classes = list(dict.fromkeys(c for r in part for c in r.get("by_class", {})))
    if not classes:
        return []
    lines = ["End of RL per problem class (paired differences as above, on that class's "
             "problems):", "", "| class | variant | problems | " + " | ".join(keys) + " | " +
             " | ".join(f"Δ{k} vs {baseline}" for k in keys) + " |",
             "|---" * (3 + 2 * len(keys)) + "|"]
    for cls in classes:
        for r in part:
            m, p = r["by_class"].get(cls, {}), r["paired_by_class"].get(cls, {})
            lines.append(f"| {_CLASS_NAMES.get(cls, cls)} | {r['variant']} | "
                         f"{_fmt(m.get('n_prompts'), 0)} | " +
                         " | ".join(_fmt(m.get(k)) for k in keys) + " | " +
                         " | ".join(_fmt_diff(p.get(k)) for k in keys) + " |")
    return [*lines, ""]


_EXPLORATION_HEADERS = {
    "distinct_correct_mean": "distinct correct", "solution_entropy_mean": "solution entropy",
    "both:rare_share": "rare share (both)", "coverage_solved_last": "problems solved",
    "coverage_solutions_last": "solutions found", "multi_correct_frac": "groups ≥ 2 correct",
    "novelty_spread_frac": "novelty spread", "adv_moved": "advantage moved"}


def _md_exploration(part: list[dict[str, Any]], start: dict[str, Any]) -> list[str]:
    """Exploration per variant (mean ± sd over seeds), with the warm start's eval numbers;
    a column only where some variant has the number."""
    if not any(r.get("exploration") for r in part):
        return []
    b_key = next((k for r in part for k in r["exploration"] if k.startswith("B:pass@")),
                 "B:pass@k")
    headers = {**_EXPLORATION_HEADERS, b_key: f"{b_key.removeprefix('B:')} (B-only)"}
    order = ["distinct_correct_mean", "solution_entropy_mean", "both:rare_share", b_key,
             "coverage_solved_last", "coverage_solutions_last", *STEP_EXPLORATION]
    cols = [k for k in order if any(k in r["exploration"] for r in part)]
    lines = ["Exploration. End of RL: distinct correct solutions per problem, entropy (nats) "
             "of the correct solutions per problem, share of the correct samples on `both` "
             f"problems that use the rare strategy, {b_key.removeprefix('B:')} on B-only "
             "problems. Training: share of the training problems solved at least once and "
             "distinct correct solutions found (cumulative, last step); means over steps of "
             "the share of groups with two or more correct answers, of those the share whose "
             "novelty differs by > 0.1, and the advantage mass moved relative to GRPO "
             "(sum |A - A_grpo| / sum |A_grpo|). Entropy warning: seeds whose mean token "
             "entropy diverged towards uniform.", "",
             "| variant | " + " | ".join(headers[k] for k in cols) + " | entropy warning |",
             "|---" * (len(cols) + 2) + "|"]
    if start:
        at = {**start["overall"], **{f"{c}:{k}": v for c, x in start["by_class"].items()
                                     for k, v in x.items()}}
        lines.append("| start of RL | " + " | ".join(_fmt(at.get(k)) for k in cols) + " | - |")
    for r in part:
        ex = r["exploration"]
        lines.append(f"| {r['variant']} | " + " | ".join(
            _fmt(ex.get(k), 1 if k == "coverage_solutions_last" else 3) for k in cols) +
            f" | {_seeds_fired(r['entropy_warning_seeds'], r['entropy_warning_steps'])} |")
    return [*lines, ""]


def _md_geometry(part: list[dict[str, Any]]) -> list[str]:
    lines = ["Geometry (within-group pairs i < j). Training: mean pairwise cosine of "
             f"the gradient features, first -> last {TREND_WINDOW} steps; evaluation: "
             "features and sentence embeddings of the n held-out samples per problem. "
             "Uniform groups: share of training groups whose rewards are all equal, and "
             "the share of the advantage mass |A| they carry.", "",
             "| variant | train feature cos first -> last | eval feature cos | eval "
             "negative pairs | eval semantic cos | uniform groups | advantage mass in "
             "uniform groups | distinct responses per group (last) | collapse warning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in part:
        m = r["metrics"]
        first, last = m.get("feature_cos_mean_first"), m.get("feature_cos_mean_last")
        trend = (f"{first[0]:.3f} -> {last[0]:.3f}" if first and last
                 and not math.isnan(first[0]) else "-")
        lines.append(
            f"| {r['variant']} | {trend} | {_fmt(m.get('feature_cos_mean'))} | "
            f"{_fmt(m.get('feature_neg_share'))} | {_fmt(m.get('semantic_cos_mean'))} | "
            f"{_fmt(m.get('uniform_group_frac'), 2)} | {_fmt(m.get('adv_mass_uniform'), 2)} "
            f"| {_fmt(m.get('distinct_per_group_last'), 2)} | "
            f"{_seeds_fired(r['collapsed_seeds'], r['collapse_steps'])} |")
    return [*lines, ""]


def plot_study(path: Path, data: dict[str, Any]) -> Path:
    """Training accuracy and within-group feature cosine per step, mean over seeds, smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from g2rl.plot import _smooth

    runs = data["runs"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs)) or ["-"]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 3.8 * len(scenarios)),
                             squeeze=False)
    for row, scenario in enumerate(scenarios):
        variants = list(dict.fromkeys(r["variant"] for r in runs if r["scenario"] == scenario))
        for col, (key, label) in enumerate((("curve_accuracy", "training accuracy"),
                                            ("curve_feature_cos", "mean feature cosine in "
                                                                  "groups"))):
            ax = axes[row][col]
            for v in variants:
                curves = [r["training"][key] for r in runs
                          if (r["scenario"], r["variant"]) == (scenario, v)]
                n = min(len(c) for c in curves)
                if n == 0:
                    continue
                avg = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
                ax.plot(range(1, n + 1), _smooth(avg, max(1, n // 25)),
                        label=f"{v} ({len(curves)} seeds)")
            ax.set_title(f"{scenario}: {label}")
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pass_curve(metrics: dict[str, Any]) -> dict[int, float]:
    """``{k: mean pass@k}`` from ``{"pass@k": (mean, sd)}``."""
    return {int(k.split("@")[1]): float(v[0]) for k, v in metrics.items()
            if k.startswith("pass@") and not math.isnan(v[0])}


def passk_panels(part: list[dict[str, Any]], start: dict[str, Any]
                 ) -> dict[str, dict[str, dict[int, float]]]:
    """The pass@k-vs-k curves of a scenario: panel (all problems, and B-only problems where
    evaluated per class) -> curve label (each variant, then ``warm start``) -> {k: pass@k}."""
    sources = [(f"{r['variant']} ({len(r['seeds'])} seeds)", r["metrics"], r["by_class"])
               for r in part]
    if start:
        sources.append(("warm start", start["overall"], start["by_class"]))
    panels: dict[str, dict[str, dict[int, float]]] = {}
    for title, cls in (("all problems", None), ("B-only problems", "B")):
        curves = {label: _pass_curve(overall if cls is None else by_class.get(cls, {}))
                  for label, overall, by_class in sources}
        curves = {label: c for label, c in curves.items() if c}
        if curves:
            panels[title] = curves
    return panels


def plot_passk_scenarios(out: Path, rows: list[dict[str, Any]], data: dict[str, Any]
                         ) -> dict[str, str]:
    """``study_passk_<scenario>.png`` for every scenario; returns scenario -> file name."""
    from g2rl.plot import plot_passk

    names = {}
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        part = [r for r in rows if r["scenario"] == scenario]
        panels = passk_panels(part, data.get("start_of_rl", {}).get(scenario, {}))
        if panels:
            name = f"study_passk_{scenario}.png"
            plot_passk(out / name, panels, f"{scenario}: pass@k at the end of RL",
                       dashed=("warm start",))
            names[scenario] = name
    return names


def report(jobs: list[Job], out: Path, baseline: str, command: str) -> dict[str, Any]:
    data = collect(jobs)
    data["command"] = command
    log = out / "commands.txt"
    data["commands"] = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    data["rows"] = aggregate(data, baseline)
    out.mkdir(parents=True, exist_ok=True)
    data["plots"] = {"training": None, "passk": {}}
    if data["runs"]:
        data["plots"]["training"] = plot_study(out / "study.png", data).name
        data["plots"]["passk"] = plot_passk_scenarios(out, data["rows"], data)
    (out / "study.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    write_markdown(out / "study.md", data["rows"], data, baseline, command)
    return data


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, passthrough = parser.parse_known_args(argv)
    try:
        jobs = plan(ns, passthrough)
    except StudyError as exc:
        print(f"python -m g2rl.study: error: {exc}", file=sys.stderr)
        return 2
    out = Path(ns.out).expanduser()
    command = "python -m g2rl.study " + " ".join(argv)
    rc = 0
    if not ns.report_only:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "commands.txt").open("a", encoding="utf-8") as fh:
            fh.write(command + "\n")
        n_rl = sum(j.variant is not None for j in jobs)
        print(f"study {out}: {len(jobs) - n_rl} warm starts, {n_rl} RL runs, {ns.jobs} at once",
              flush=True)
        rc = run_jobs(jobs, ns.jobs, ns.progress)
    data = report(jobs, out, ns.baseline, command)
    print(f"report: {out / 'study.md'} ({len(data['runs'])} finished runs)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
