"""``python -m g2rl.study``: the grid, paired warm starts, resume, interruption, the report and
bad input. End to end at tiny sizes (each run a real ``python -m g2rl.train`` subprocess)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g2rl import study

TINY = [
    "--steps", "2", "--prompts-per-step", "3", "--group-size", "4", "--sft-steps", "4",
    "--sft-batch-size", "8", "--train-problems", "100", "--eval-problems", "6", "--eval-n", "4",
    "--eval-ks", "1,4", "--max-new-tokens", "8", "--micro-batch-size", "6",
    "--no-semantic-geometry",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


def test_paired_interval_by_hand():
    m, lo, hi = study.paired_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) sd / sqrt(n)
    assert m == 2.0 and math.isclose(lo, 2 - half) and math.isclose(hi, 2 + half)
    assert study.mean_sd([2.0]) == (2.0, 0.0)
    m, lo, hi = study.paired_interval([0.5])
    assert m == 0.5 and math.isnan(lo) and math.isnan(hi)


def test_variants_and_options():
    v = study.parse_variant("g2rl-eq12:method=g2rl,novelty-mode=eq12, novelty_lambda=1.0")
    assert v.label == "g2rl-eq12"
    assert v.options == {"method": "g2rl", "novelty_mode": "eq12", "novelty_lambda": "1.0"}
    argv = study.options_to_argv({"method": "g2rl", "semantic_geometry": "false",
                                  "scale_advantages": "true"})
    assert argv == ["--method", "g2rl", "--no-semantic-geometry", "--scale-advantages"]


@pytest.mark.parametrize("args, match", [
    (["--variant", "nocolon"], "expected NAME:KEY=VAL"),
    (["--variant", "x:novelty_mode=eq12"], "give method="),
    (["--variant", "x:method=g2rl,colour=red"], "unknown trainer option 'colour'"),
    (["--variant", "x:method=g2rl,seed=3"], "set by the study itself"),
    (["--variant", "grpo:method=grpo"], "variant names must be unique"),
    (["--methods", "grpo,ppo"], "unknown method 'ppo'"),
    (["--scenarios", "dense,hard"], "unknown scenario 'hard'"),
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--seed", "3"], "--seed is set by the study itself"),
    (["--novelty-lambda", "2"], "--novelty-lambda must be in \\[0, 1\\]"),
    (["--variant", "bad:method=g2rl,uniform_groups=never"], "bad/dense|uniform-groups"),
])
def test_bad_options(args, match, tmp_path, capsys):
    ns, rest = study.build_parser().parse_known_args(["--out", str(tmp_path), *args])
    with pytest.raises((study.StudyError, SystemExit)) as info:
        study.plan(ns, rest)
    text = str(info.value) + capsys.readouterr().err
    import re

    assert re.search(match, text), text
    assert not any(tmp_path.iterdir())  # nothing written
    assert study.main(["--out", str(tmp_path), *args]) == 2


def test_plan_pairs_every_variant_with_its_seeds_warm_start(tmp_path):
    ns, rest = study.build_parser().parse_known_args(
        ["--out", str(tmp_path), "--methods", "grpo,g2rl", "--seeds", "3,4",
         "--scenarios", "dense,sparse", "--variant", "shape:method=g2rl,uniform_groups=shape"])
    jobs = study.plan(ns, rest)
    warm = [j for j in jobs if j.variant is None]
    rl = [j for j in jobs if j.variant is not None]
    assert len(warm) == 4 and len(rl) == 12
    for j in rl:
        assert j.depends.seed == j.seed and j.depends.scenario == j.scenario
        last = {a: i for i, a in enumerate(j.argv)}  # argparse: the last value given wins
        assert j.argv[last["--model"] + 1] == str(j.depends.run_dir / "warm_start")
        assert j.argv[last["--sft-steps"] + 1] == "0"
        assert "--no-eval-start" in j.argv
    sparse_warm = [j for j in warm if j.scenario == "sparse"][0]
    assert "--sft-steps" in sparse_warm.argv and "50" in sparse_warm.argv
    # the paper's evaluation unless the user says otherwise
    assert jobs[0].argv[:4] == ["--eval-n", "16", "--eval-ks", "1,4,16"]
    assert [j.seed for j in jobs[:8]] == [3] * 8  # seed-major


def test_end_to_end_resume_and_report(tmp_path, cache, capfd):
    out = tmp_path / "st"
    args = ["--out", str(out), "--methods", "grpo,g2rl", "--seeds", "0,1", "--no-progress",
            *TINY, "--cache-dir", cache]
    assert study.main(args) == 0
    data = json.loads((out / "study.json").read_text())
    assert len(data["runs"]) == 4
    md = (out / "study.md").read_text()
    assert "| grpo | 2 |" in md and "| g2rl | 2 |" in md and "Δpass@1 vs grpo" in md
    assert (out / "study.png").stat().st_size > 1000
    # paired: the difference of each seed's own evaluations, and a shared start evaluation
    row = [r for r in data["rows"] if r["variant"] == "g2rl"][0]
    diffs = []
    for seed in (0, 1):
        ends = {v: json.loads((out / "dense" / v / f"seed{seed}" / "eval_summary.json")
                              .read_text())["end"]["pass@1"] for v in ("grpo", "g2rl")}
        diffs.append(ends["g2rl"] - ends["grpo"])
    assert math.isclose(row["paired"]["pass@1"][0], sum(diffs) / 2, abs_tol=1e-12)
    for seed in (0, 1):
        cfgs = [(out / "dense" / v / f"seed{seed}" / "config.yaml").read_text()
                for v in ("grpo", "g2rl")]
        ws = str(out / "dense" / f"warm_start_seed{seed}" / "warm_start")
        assert all(f"model: {ws}" in c for c in cfgs)
    capfd.readouterr()
    # a second call finds every run finished and starts nothing
    t0 = time.perf_counter()
    assert study.main(args) == 0
    assert "started" not in capfd.readouterr().out
    assert time.perf_counter() - t0 < 30


def test_sigterm_then_resume(tmp_path, cache):
    out = tmp_path / "st"
    args = ["--out", str(out), "--methods", "grpo", "--seeds", "0", "--no-progress", *TINY,
            "--steps", "40", "--cache-dir", cache]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "g2rl.study", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "dense" / "grpo" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.is_file()
                                      or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    assert metrics.is_file(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "rerun the same command to continue" in text
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 40
    # rerun: the killed run resumes from its checkpoint and finishes
    res = subprocess.run([sys.executable, "-m", "g2rl.study", *args], env=env, text=True,
                         capture_output=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started dense/grpo/seed 0 (resumed)" in res.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert Path(out / "study.md").is_file()


# ------------------------------------------------------------- countdown scenario and report
def test_countdown_scenario_eval_options_precedence(tmp_path):
    from g2rl.config import parse_config

    def configs(*extra):
        ns, rest = study.build_parser().parse_known_args(
            ["--out", str(tmp_path), "--methods", "grpo", "--seeds", "0", "--scenarios",
             "countdown,countdown-sparse", *extra])
        # an RL run's options before the study's own tail (its --model does not exist yet)
        return [(j, parse_config(j.argv[:j.argv.index("--model")] if j.variant else j.argv))
                for j in study.plan(ns, rest)]

    jobs = configs()
    for j, cfg in jobs:
        assert cfg.task == "countdown"
        assert (cfg.eval_n, cfg.eval_ks, cfg.eval_problems) == (128, "1,2,4,8,16,32,64,128", 128)
        assert "16" not in j.argv  # the study default --eval-n 16 is not even given
    warm = {j.scenario: cfg for j, cfg in jobs if j.variant is None}
    assert warm["countdown"].sft_steps == int(study.COUNTDOWN_SFT_STEPS)
    assert warm["countdown-sparse"].sft_steps == int(study.COUNTDOWN_SPARSE_SFT_STEPS)
    # the user's own evaluation flags win over the scenario's; its task and SFT length do not
    for j, cfg in configs("--eval-n", "8", "--eval-ks", "1,8", "--task", "subset-sum",
                          "--sft-steps", "3"):
        assert (cfg.eval_n, cfg.eval_ks, cfg.eval_problems) == (8, "1,8", 128)
        assert cfg.task == "countdown"
        assert cfg.sft_steps == warm[j.scenario].sft_steps


def test_headline_keys():
    dense = ["pass@1", "pass@4", "pass@16", "maj@1", "maj@4", "maj@16"]
    assert study.headline_keys(dense) == dense
    ks = [1, 2, 4, 8, 16, 32, 64, 128]
    keys = [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks[:4]]
    assert study.headline_keys(keys) == ["pass@1", "pass@16", "pass@128", "maj@1"]


KS = [1, 2, 4, 8, 16, 32, 64, 128]
CLASSES = ("A", "B", "both")


def _fake_eval(level: float, rare: float, old_format: bool = False) -> dict:
    """An evaluation like g2rl.eval.evaluate's with class_fn and rare_fn: pass@k grows with k
    from ``level``; per class, B is ``level`` - 0.2. ``old_format``: k = 1, 4, 16 and only
    pass@k, maj@k and geometry."""
    if old_format:
        return {"n_prompts": 6, **{f"pass@{k}": level + 0.05 * math.log2(k) for k in (1, 4, 16)},
                **{f"maj@{k}": level for k in (1, 4, 16)}, "feature_cos_mean": 0.5}
    def numbers(lv: float, rare_share: float) -> dict:
        out = {f"pass@{k}": min(1.0, lv + 0.05 * math.log2(k)) for k in KS}
        out.update(distinct_correct_mean=1 + 4 * lv, multi_solution_share=lv,
                   solution_entropy_mean=lv / 2, rare_share=rare_share)
        return out

    res = {"n_prompts": 128, "n_samples": 128 * 128, "n": 128, **numbers(level, rare),
           **{f"maj@{k}": level for k in KS}, "mean_reward": 2 * level - 1, "when": "x",
           "truncated_frac": 0.0, "mean_response_len": 20.0, "feature_cos_mean": 0.5}
    res["by_class"] = {c: {"n_prompts": n, **numbers(level + d, r)}  # B-only: every "/"
                       for c, n, d, r in (("A", 60, 0.1, 0.0), ("B", 20, -0.2, 1.0),
                                          ("both", 48, 0.0, rare))}
    return res


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fake_metrics(path: Path, steps: int, seed: int, g2rl: bool, entropy_from: int | None,
                  old_format: bool = False):
    rows = []
    for i in range(1, steps + 1):
        row = {"step": i, "accuracy": 0.5, "feature_cos_mean": 0.2, "distinct_per_group": 4.0,
               "reward_mean": 0.0, "collapse_warning": False}
        if not old_format:
            row.update(multi_correct_frac=0.1 * i + (0.2 if g2rl else 0.0),
                       novelty_spread_frac=0.5, adv_moved=0.3 if g2rl else 0.0,
                       coverage_solved=0.1 * i + 0.01 * seed,
                       coverage_solutions=10.0 * i + seed + (5 if g2rl else 0), entropy=1.0,
                       entropy_warning=entropy_from is not None and i >= entropy_from)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_study(out: Path, scenario: str, old_format: bool = False):
    """A finished study (grpo, g2rl x seeds 0-2) made of fabricated run files; ``old_format``:
    files as written before per-class evaluation and exploration metrics (subset-sum ks)."""
    ns, rest = study.build_parser().parse_known_args(
        ["--out", str(out), "--methods", "grpo,g2rl", "--seeds", "0,1,2",
         "--scenarios", scenario])
    jobs = study.plan(ns, rest)
    for j in jobs:
        if j.variant is None:
            (j.run_dir / "warm_start").mkdir(parents=True)
            (j.run_dir / "warm_start" / "config.json").write_text("{}")
            _write(j.run_dir / "eval_summary.json", {
                "sft": {"task": "countdown", "problems": 900 + j.seed, "train_problems": 1000,
                        "rare_trace_share": 0.02 * (j.seed + 1),
                        "class_share": {"A": 0.6, "B": 0.1, "both": 0.3}},
                "start": _fake_eval(0.3, 0.05, old_format),
                "warm_start": str(j.run_dir / "warm_start")})
            continue
        g2rl = j.variant.label == "g2rl"
        # g2rl beats grpo by 0.1 * (seed + 1) on every number
        level = 0.4 + 0.01 * j.seed + (0.1 * (j.seed + 1) if g2rl else 0.0)
        _write(j.run_dir / "eval_summary.json",
               {"end": _fake_eval(level, 0.1 + level / 10, old_format),
                "final_checkpoint": "x"})
        _fake_metrics(j.run_dir / "metrics.jsonl", 5, j.seed, g2rl,
                      3 if g2rl and j.seed == 1 else None, old_format)
    return out, jobs, study.report(jobs, out, "grpo", "python -m g2rl.study (test)")


@pytest.fixture()
def countdown_study(tmp_path):
    return _fake_study(tmp_path / "st", "countdown")


def test_report_without_classes_or_exploration(tmp_path):
    """Runs written before per-class evaluation and exploration metrics: the report as before."""
    out, jobs, data = _fake_study(tmp_path / "st", "dense", old_format=True)
    assert data["table_keys"]["dense"] == ["pass@1", "pass@4", "pass@16", "maj@1", "maj@4",
                                           "maj@16"]
    row = {r["variant"]: r for r in data["rows"]}
    half = 4.303 * 0.1 / math.sqrt(3)
    assert row["g2rl"]["paired"]["pass@4"] == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert row["g2rl"]["by_class"] == {} and row["g2rl"]["exploration"] == {}
    assert row["g2rl"]["entropy_warning_seeds"] == []
    md = (out / "study.md").read_text()
    assert "| g2rl | 3 |" in md and "Δmaj@16 vs grpo" in md and "Geometry" in md
    assert "per problem class" not in md and "Exploration" not in md
    assert list(study.passk_panels(data["rows"], data["start_of_rl"]["dense"])) == [
        "all problems"]
    assert (out / "study_passk_dense.png").stat().st_size > 1000


def test_countdown_report_paired_by_class(countdown_study):
    out, jobs, data = countdown_study
    assert data["table_keys"]["countdown"] == ["pass@1", "pass@16", "pass@128", "maj@1",
                                               "maj@16", "maj@128"]
    row = {r["variant"]: r for r in data["rows"]}
    half = 4.303 * 0.1 / math.sqrt(3)  # diffs 0.1, 0.2, 0.3: mean 0.2, sd 0.1
    for key in ("pass@1", "pass@16"):
        for got in (row["g2rl"]["paired"][key], row["g2rl"]["paired_by_class"]["B"][key]):
            assert got == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    # pass@128 is capped at 1 for A (level + 0.1 + 0.35): recompute from the files
    for cls in CLASSES:
        diffs = []
        for seed in (0, 1, 2):
            ends = {v: json.loads((out / "countdown" / v / f"seed{seed}" / "eval_summary.json")
                                  .read_text())["end"]["by_class"][cls]["pass@128"]
                    for v in ("grpo", "g2rl")}
            diffs.append(ends["g2rl"] - ends["grpo"])
        assert row["g2rl"]["paired_by_class"][cls]["pass@128"] == pytest.approx(
            study.paired_interval(diffs))
    assert row["g2rl"]["by_class"]["B"]["n_prompts"] == (20.0, 0.0)
    assert row["g2rl"]["by_class"]["B"]["pass@1"][0] == pytest.approx(0.41 + 0.2 - 0.2)
    assert row["grpo"]["paired_by_class"] == {c: {} for c in CLASSES}
    md = (out / "study.md").read_text()
    b_g2rl = [x for x in md.splitlines() if x.startswith("| B-only") and "| g2rl |" in x]
    assert len(b_g2rl) == 1
    assert f"+0.200 [{0.2 - half:+.3f}, {0.2 + half:+.3f}]" in b_g2rl[0]
    assert "Δpass@128 vs grpo" in md and "pass@64" not in md


def test_countdown_report_exploration_and_start(countdown_study):
    out, jobs, data = countdown_study
    ex = {r["variant"]: r["exploration"] for r in data["rows"]}
    # coverage at the last (5th) step: 0.5 + 0.01 seed; mean over seeds 0-2
    assert ex["grpo"]["coverage_solved_last"] == pytest.approx((0.51, 0.01))
    assert ex["g2rl"]["coverage_solutions_last"][0] == pytest.approx(56.0)
    # multi_correct_frac: mean over steps of 0.1 i (+ 0.2 for g2rl) = 0.3 (0.5)
    assert ex["grpo"]["multi_correct_frac"] == pytest.approx((0.3, 0.0))
    assert ex["g2rl"]["multi_correct_frac"][0] == pytest.approx(0.5)
    assert ex["g2rl"]["adv_moved"][0] == pytest.approx(0.3)
    # end-of-RL evaluation: grpo level 0.40, 0.41, 0.42
    assert ex["grpo"]["distinct_correct_mean"][0] == pytest.approx(1 + 4 * 0.41)
    assert ex["grpo"]["both:rare_share"][0] == pytest.approx(0.1 + 0.041)
    assert ex["grpo"]["B:pass@128"][0] == pytest.approx(0.41 - 0.2 + 0.35)
    row = {r["variant"]: r for r in data["rows"]}
    assert row["g2rl"]["entropy_warning_seeds"] == [1]
    assert row["g2rl"]["entropy_warning_steps"] == [3]
    assert row["grpo"]["entropy_warning_seeds"] == []
    start = data["start_of_rl"]["countdown"]
    assert start["seeds"] == [0, 1, 2]
    assert start["sft"]["rare_trace_share"] == pytest.approx((0.04, 0.02))
    assert start["by_class"]["B"]["pass@1"] == pytest.approx((0.1, 0.0))
    assert start["overall"]["pass@128"][0] == pytest.approx(0.65)
    md = (out / "study.md").read_text()
    assert ("| start of RL | 2.200 ± 0.000 | 0.150 ± 0.000 | 0.050 ± 0.000 | 0.450 ± 0.000 |"
            in md)
    assert "seeds [1] (steps [3])" in md
    assert "share of traces using the rare strategy 0.040 ± 0.020" in md
    assert any(x.startswith("| B-only") and "| 20 ± 0 |" in x for x in md.splitlines())
    # the study.json written is the data returned (tuples as lists)
    saved = json.loads((out / "study.json").read_text())
    assert saved["start_of_rl"]["countdown"]["sft"]["rare_trace_share"] == pytest.approx(
        [0.04, 0.02])


def test_countdown_report_passk_plot(countdown_study):
    out, jobs, data = countdown_study
    assert data["plots"]["passk"] == {"countdown": "study_passk_countdown.png"}
    assert (out / "study_passk_countdown.png").stat().st_size > 1000
    assert "](study_passk_countdown.png)" in (out / "study.md").read_text()
    panels = study.passk_panels([r for r in data["rows"]],
                                data["start_of_rl"]["countdown"])
    assert list(panels) == ["all problems", "B-only problems"]
    assert panels["B-only problems"]["warm start"][1] == pytest.approx(0.1)
    assert panels["all problems"]["grpo (3 seeds)"][128] == pytest.approx(0.41 + 0.35)
    assert sorted(panels["all problems"]["g2rl (3 seeds)"]) == KS
