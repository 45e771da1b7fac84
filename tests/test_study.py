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
