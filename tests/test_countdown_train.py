"""``python -m g2rl.train --task countdown`` end to end at tiny sizes (exploration and coverage
metrics, per-class evaluation, the SFT trace report, the entropy warning), a SIGKILLed countdown
run resumed (coverage carried in the trainer state), and the ``--task`` options of the config.

The tiny model cannot solve Countdown after a few SFT steps, so the runs score with the real
verifier OR a fixed hash of the completion (about one in three answers "correct"): every
reward-dependent number (coverage, multi-correct groups, advantage shaping, per-class pass@k)
is then non-trivial, and the reward is still a pure function of the text, so a resumed run must
repeat an uninterrupted one bit for bit. The subprocess run installs the same reward (``PATCH``).
"""

import contextlib
import io
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from _train_helpers import REPO, assert_same_run, metrics, train_env

from g2rl.config import ConfigError, parse_config
from g2rl.train import main
from g2rl.trainer import KILL_ENV

#: the reward of these runs (see the module docstring); exec'd here and in the subprocess
PATCH = """
import zlib
import g2rl.tasks.countdown as _cd
_real_reward = _cd.reward
def reward(text, answer):
    if _real_reward(text, answer) > 0 or zlib.crc32(text.encode()) % 3 == 0:
        return 1.0
    return -1.0
"""
LAUNCH = PATCH + """
import sys
_cd.reward = reward
from g2rl.train import main
sys.exit(main(sys.argv[1:]))
"""

STEPS = 3
GROUP = 4
PROMPTS = 4
TRAIN_PROBLEMS = 100
EVAL_N = 4
WINDOW = 2
FRACTION = 0.5
#: tiny countdown run: SFT 20 steps, RL 3 steps, one evaluation at the end; the entropy warning
#: over a 2-step window at half of ln V (the barely warmed tiny model is far above that)
ARGS = [
    "--task", "countdown", "--sft-steps", "20", "--sft-batch-size", "8",
    "--steps", str(STEPS), "--prompts-per-step", str(PROMPTS), "--group-size", str(GROUP),
    "--train-problems", str(TRAIN_PROBLEMS), "--eval-problems", "8", "--eval-n", str(EVAL_N),
    "--eval-ks", "1,4", "--no-eval-before-sft", "--no-eval-start", "--no-semantic-geometry",
    "--micro-batch-size", "8", "--collapse-window", str(WINDOW),
    "--entropy-warning", str(FRACTION), "--threads", "1", "--no-progress",
]
CLASSES = {"A", "B", "both"}
SOLUTION_KEYS = ("distinct_correct_mean", "multi_solution_share", "solution_entropy_mean",
                 "rare_share")
WARNING = "diverging towards uniform"


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with the reward of these runs; (exit code, stdout + stderr)."""
    import g2rl.tasks.countdown as cd

    ns: dict = {}
    exec(PATCH, ns)
    buf = io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cd, "reward", ns["reward"])
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = main(argv)
        finally:
            torch.set_num_threads(threads)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "g2rl-cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """An uninterrupted run, in this process: (run dir, its output)."""
    run = tmp_path_factory.mktemp("countdown") / "straight"
    rc, out = _run_in_process([*ARGS, "--cache-dir", cache, "--output-dir", str(run)])
    assert rc == 0, out
    return run, out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache):
    """The same run SIGKILLed in the middle of step 3 (after its update, before its metrics and
    checkpoint), then resumed in this process: (run dir, metrics before the resume, trainer
    state of step 2, the killed run's output, the resume's output)."""
    run = tmp_path_factory.mktemp("countdown") / "killed"
    args = [*ARGS, "--cache-dir", cache, "--output-dir", str(run)]
    proc = subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=REPO, capture_output=True,
                          text=True, env=train_env(cache, **{KILL_ENV: "3"}), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    before = metrics(run)
    state2 = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    rc, out = _run_in_process([*args, "--resume"])
    assert rc == 0, out
    return run, before, state2, proc.stdout + proc.stderr, out


# ---------------------------------------------------------------------------- end to end
def test_countdown_run_metrics(straight):
    run, _ = straight
    rows = metrics(run)
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    for m in rows:
        for key in ("multi_correct_frac", "novelty_spread_frac", "coverage_solved"):
            assert 0 <= m[key] <= 1, (key, m[key])
        assert math.isfinite(m["adv_moved"]) and m["adv_moved"] >= 0
        assert m["coverage_solutions"] >= 0 and float(m["coverage_solutions"]).is_integer()
        assert m["response_len"] <= 29
    for key in ("coverage_solved", "coverage_solutions"):
        vals = [m[key] for m in rows]
        assert vals == sorted(vals), (key, vals)  # cumulative: never decreases
    # the reward makes every number non-trivial (the test would prove little otherwise)
    assert any(m["multi_correct_frac"] > 0 for m in rows)
    assert any(m["adv_moved"] > 0 for m in rows)  # g2rl shapes the advantages
    last = rows[-1]
    solved = round(last["coverage_solved"] * TRAIN_PROBLEMS)
    assert math.isclose(solved, last["coverage_solved"] * TRAIN_PROBLEMS, abs_tol=1e-9)
    # every solved problem has at least one solution; no more solutions than correct samples
    correct = sum(round(m["accuracy"] * PROMPTS * GROUP) for m in rows)
    assert 1 <= solved <= last["coverage_solutions"] <= correct
    # the trainer state holds the very sets behind the numbers
    state = json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "trainer_state.json")
                       .read_text())
    assert len(state["solved"]) == solved and len(state["found"]) == last["coverage_solutions"]
    assert {i for i, _ in state["found"]} == set(state["solved"])
    assert all(0 <= i < TRAIN_PROBLEMS for i in state["solved"])


def test_countdown_run_entropy_warning(straight):
    from transformers import AutoConfig

    run, out = straight
    rows = metrics(run)
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    vocab = AutoConfig.from_pretrained(resolved["model_path"]).vocab_size
    ent = sum(m["entropy"] for m in rows[:WINDOW]) / WINDOW
    assert ent > FRACTION * math.log(vocab)  # the rule holds once the window is full
    assert [m["entropy_warning"] for m in rows] == [False, True, True]
    assert out.count(WARNING) == 1
    assert f"at step {WINDOW}:" in out and f"V = {vocab}" in out


def test_countdown_run_summary_and_config(straight):
    run, _ = straight
    summary = json.loads((run / "eval_summary.json").read_text())
    end = summary["end"]
    assert end["n_prompts"] == 8 and 0 <= end["pass@1"] <= 1
    for key in SOLUTION_KEYS:
        assert key in end, key
    assert 0 <= end["multi_solution_share"] <= 1 and 0 <= end["rare_share"] <= 1
    assert 0 <= end["distinct_correct_mean"] <= EVAL_N
    assert 0 <= end["solution_entropy_mean"] <= math.log(EVAL_N) + 1e-12
    by_class = end["by_class"]
    assert by_class and set(by_class) <= CLASSES
    assert sum(c["n_prompts"] for c in by_class.values()) == 8
    for c in by_class.values():
        assert c["n_prompts"] >= 1
        for key in ("pass@1", "pass@4", "multi_solution_share", "rare_share"):
            assert 0 <= c[key] <= 1, key
        assert c["pass@1"] <= c["pass@4"] + 1e-12
    # the classes partition the problems: prompt-weighted class means are the overall ones
    for key in ("pass@1", "pass@4", "distinct_correct_mean", "multi_solution_share",
                "solution_entropy_mean"):
        weighted = sum(c[key] * c["n_prompts"] for c in by_class.values()) / 8
        assert math.isclose(weighted, end[key], abs_tol=1e-9), key
    assert end["pass@1"] > 0  # the reward of this run makes the classes non-trivial
    sft = summary["sft"]
    assert sft["task"] == "countdown" and sft["train_problems"] == TRAIN_PROBLEMS
    assert 0 < sft["problems"] <= TRAIN_PROBLEMS
    assert 0 <= sft["rare_trace_share"] <= 1
    assert set(sft["class_share"]) == CLASSES
    assert math.isclose(sum(sft["class_share"].values()), 1.0, abs_tol=1e-9)
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert resolved["max_new_tokens"] == 29 and resolved["sft_steps"] == 20


def test_sft_trace_stats_counts_division_traces():
    """sft_trace_stats against counts of its own over the same traces."""
    from g2rl.tasks import get_task
    from g2rl.train import sft_trace_stats

    for weight in (0.0, 1.0):
        task = get_task("countdown", division_weight=weight)
        examples = task.make_examples("train", 60, 0)
        info = sft_trace_stats(task, examples, 75, seed=3)
        assert info["task"] == "countdown"
        assert info["problems"] == 60 and info["train_problems"] == 75
        n_div = sum("/" in task.extract_answer(task.sft_solution(ex.answer, None, 3))
                    for ex in examples)
        assert info["rare_trace_share"] == n_div / 60
        labels = [task.problem_class(ex.answer) for ex in examples]
        assert info["class_share"] == {c: labels.count(c) / 60 for c in ("A", "B", "both")}
        if weight == 0.0:  # '/' only where nothing else solves the problem (class B)
            assert n_div == labels.count("B")
        else:
            assert n_div > labels.count("B")
    sub = get_task("subset-sum")
    info = sft_trace_stats(sub, sub.make_examples("train", 5, 0), 5, seed=0)
    assert info == {"task": "subset-sum", "problems": 5, "train_problems": 5}
    assert sft_trace_stats(get_task("countdown"), [], 5, seed=0) == {
        "task": "countdown", "problems": 0, "train_problems": 5,
        "class_share": {"A": 0.0, "B": 0.0, "both": 0.0}}


def test_lm_head_rows_of_the_tiny_model(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from g2rl.tiny_model import tiny_model_path
    from g2rl.train import lm_head_rows

    path = tiny_model_path(cache)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert lm_head_rows(model) == model.config.vocab_size == len(AutoTokenizer.from_pretrained(
        str(path)))


# ---------------------------------------------------------------------------- resume
def test_killed_countdown_run_resumes_with_its_coverage(straight, resumed):
    run, before, state2, killed_out, resume_out = resumed
    assert [m["step"] for m in before] == [1, 2]
    after = metrics(run)
    # coverage continues from the checkpoint: the sets of step 2 are kept and only grow
    assert state2["solved"] and state2["found"]
    state3 = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert set(state2["solved"]) <= set(state3["solved"])
    assert {tuple(x) for x in state2["found"]} <= {tuple(x) for x in state3["found"]}
    for key in ("coverage_solved", "coverage_solutions"):
        assert after[2][key] >= before[1][key]
    assert len(state2["found"]) == before[1]["coverage_solutions"]
    # exactly the uninterrupted run: weights, optimizer, trainer state (coverage sets), and
    # every metrics row (timing aside), coverage and warnings included
    assert_same_run(straight[0], run, STEPS)
    # the entropy warning fired once before the kill, and the resumed run does not repeat it
    assert killed_out.count(WARNING) == 1
    assert WARNING not in resume_out
    assert after[2]["entropy_warning"] is True


def test_resumed_run_keeps_the_sft_report(straight, resumed):
    want = json.loads((straight[0] / "eval_summary.json").read_text())["sft"]
    got = json.loads((resumed[0] / "eval_summary.json").read_text())
    assert got.get("sft") == want


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("task, tokens, sft", [
    ("countdown", 29, 1000), ("countdown5", 38, 1000), ("subset-sum", 12, 250),
])
def test_task_defaults(task, tokens, sft):
    cfg = parse_config(["--task", task])
    assert cfg.task == task
    assert cfg.resolved_max_new_tokens() == tokens and cfg.resolved_sft_steps() == sft


def test_default_task_and_explicit_flags_win(tmp_path):
    cfg = parse_config([])
    assert cfg.task == "subset-sum" and cfg.resolved_max_new_tokens() == 12
    cfg = parse_config(["--task", "countdown", "--max-new-tokens", "7", "--sft-steps", "0"])
    assert cfg.resolved_max_new_tokens() == 7 and cfg.resolved_sft_steps() == 0
    cfg = parse_config(["--task", "countdown5", "--sft-steps", "3"])
    assert cfg.resolved_max_new_tokens() == 38 and cfg.resolved_sft_steps() == 3
    path = tmp_path / "c.yaml"
    path.write_text("task: countdown\nmax-new-tokens: 40\n")
    cfg = parse_config(["--config", str(path)])
    assert cfg.resolved_max_new_tokens() == 40 and cfg.resolved_sft_steps() == 1000
    cfg = parse_config(["--config", str(path), "--task", "countdown5", "--max-new-tokens", "9"])
    assert cfg.task == "countdown5" and cfg.resolved_max_new_tokens() == 9
    # the SFT options: the defaults, and the boundaries of their ranges are valid
    cfg = parse_config([])
    assert (cfg.sft_division_weight, cfg.sft_keep_b_only, cfg.entropy_warning) == (
        0.05, 0.2, 0.8)
    for argv in (["--sft-division-weight", "0"], ["--sft-division-weight", "3"],
                 ["--sft-keep-b-only", "0"], ["--sft-keep-b-only", "1"],
                 ["--entropy-warning", "0"], ["--entropy-warning", "1"]):
        parse_config(argv)


@pytest.mark.parametrize("argv, match", [
    (["--sft-division-weight", "-0.01"], "--sft-division-weight must be >= 0"),
    (["--sft-keep-b-only", "-0.1"], r"--sft-keep-b-only must be in \[0, 1\]"),
    (["--sft-keep-b-only", "1.5"], r"--sft-keep-b-only must be in \[0, 1\]"),
    (["--entropy-warning", "-0.5"], r"--entropy-warning must be in \[0, 1\]"),
    (["--entropy-warning", "1.01"], r"--entropy-warning must be in \[0, 1\]"),
    (["--entropy-warning", "nan"], "--entropy-warning must be a finite number"),
    (["--task", "countdown", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_values_name_the_flag(argv, match, capsys):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)
    assert main(argv) == 2
    assert "--" + match.split("--")[1].split(" ")[0] in capsys.readouterr().err


def test_unknown_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--task", "countdown6"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--task" in err and "countdown6" in err
    path = tmp_path / "c.yaml"
    path.write_text("task: countdown6\n")
    with pytest.raises(ConfigError, match="--task must be one of"):
        parse_config(["--config", str(path)])
    assert main(["--config", str(path)]) == 2
    assert "--task" in capsys.readouterr().err
