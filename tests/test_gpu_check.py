"""python -m g2rl_kernels.gpu_check: the no-GPU message, and its plumbing through the
``--device cpu --smoke`` mode (same code, tiny sizes): well-formed JSON and markdown with every
expected row and field, bad results flagged, the time budget, out-of-memory rows, and the GPU
test runner's counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from g2rl_kernels import _gpu_bench as gb
from g2rl_kernels import _gpu_report as rep
from g2rl_kernels import gpu_check

ROW_FIELDS = {"name", "op", "config", "dtype", "flops", "flop_formula", "status", "reason",
              "note", "timing", "tflops", "share_of_bf16_gemm", "share_of_dtype_gemm",
              "peak_mib", "time_vs_logprob_only", "check", "impl"}
TIMING_FIELDS = {"median_s", "min_s", "max_s", "spread", "times_s"}
ENV_FIELDS = {"device_name", "torch", "triton", "torch_cuda", "driver", "git_commit", "python"}


def smoke(tmp_path: Path, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--skip-tests", "--out", str(out),
                         *extra])
    report = json.loads((out / "gpu_check.json").read_text())
    return rc, report, (out / "gpu_check.md").read_text()


def table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]  # without the header
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


def expected_rows(interpreted: bool) -> set[tuple[str, str]]:
    rows = {(f"{dt} GEMM roof (torch.mm 256^3)", "256^3") for dt in ("bf16", "fp32")}
    rows |= {("group_novelty", f"{dt} B={b} G={g} d={d}") for dt in ("fp32", "bf16")
             for b, g, d in gpu_check.SMOKE_NOVELTY}
    impls = ["chunked"] + (["fused (Triton interpreted)", "chunked (Triton interpreted)"]
                           if interpreted else [])
    for i, (dt, n, v, d, seq_len) in enumerate(gpu_check.SMOKE_SENS):
        cfg = f"{dt} N={n} V={v} d={d} S={n // seq_len}"
        names = ["log-prob only (chunked PyTorch)", "natural PyTorch (full logits)"]
        names += [f"sensitivity {x}" for x in impls]
        if i == 0:
            names += [f"sensitivity {x} check_values=True" for x in impls]
            names += [f"token features {x}" for x in impls]
        rows |= {(name, cfg) for name in names}
    return rows


def check_report(report: dict, md: str, interpreted: bool) -> None:
    assert ENV_FIELDS <= set(report["environment"])
    assert report["environment"]["device_type"] == "cpu"
    assert report["settings"]["check_values_in_timed_rows"] is False
    assert set(report["flop_formulas"]) == set(gb.FLOP_FORMULAS)
    rows = report["rows"]
    assert {(r["name"], r["config"]) for r in rows} == expected_rows(interpreted)
    assert len(rows) == len(expected_rows(interpreted))  # no duplicates
    for r in rows:
        assert ROW_FIELDS <= set(r), r["name"]
        assert r["status"] == "ok", (r["name"], r["config"], r["reason"])
        assert TIMING_FIELDS <= set(r["timing"])
        t = r["timing"]
        assert len(t["times_s"]) >= 3 and t["min_s"] <= t["median_s"] <= t["max_s"]
        assert r["flops"] > 0 and r["tflops"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / t["median_s"] / 1e12)
        assert r["share_of_bf16_gemm"] > 0 and r["share_of_dtype_gemm"] > 0
        assert r["peak_mib"] is None  # no counter on the CPU
        if r["op"] == "gemm":
            assert r["check"] is None
            continue
        assert r["check"]["ok"] and r["check"]["finite"], (r["name"], r["check"])
        for name, f in r["check"]["fields"].items():
            assert f["ok"] and 0 <= f["max_abs_err"] <= f["tol"], (r["name"], name, f)
        if r["op"] not in ("novelty",):
            assert r["time_vs_logprob_only"] > 0
            assert r["check"]["tokens"] > 0
            assert "lse" in r["check"]["fields"]
    # the float32-accumulating paths meet float32's error; bf16 logits (plain PyTorch) do not
    bf16 = [r for r in rows if r["config"].startswith("bf16 N=")]
    assert bf16 and all(r["check"]["strict_ok"] == (r["op"] in ("fused", "chunked"))
                        for r in bf16), [(r["name"], r["check"]["strict_ok"]) for r in bf16]
    pooled = [r for r in rows if r["op"] in ("fused", "chunked", "natural")]
    assert all("seq_features" in r["check"]["fields"] for r in pooled)
    tok = [r for r in rows if r["op"].endswith("_tokens")]
    assert tok and all("token_features" in r["check"]["fields"] for r in tok)
    assert report["roofs"].keys() == {"bf16", "fp32"}
    bf16_roof = [r for r in rows if r["op"] == "gemm" and r["dtype"] == "bf16"][0]
    assert bf16_roof["share_of_bf16_gemm"] == pytest.approx(1.0)
    assert report["summary"]["verdict"] == "pass" and report["summary"]["complete"]
    assert report["tests"]["status"] == "skipped"
    # markdown: one table line per row, in order, every one checked ok
    cells = table_rows(md)
    assert [(c[0], c[1]) for c in cells] == [(r["name"], r["config"]) for r in rows]
    assert all(len(c) == 9 for c in cells)
    assert all(c[7] in ("ok", "ok (16-bit-level)", "n/a") for c in cells)
    assert "BAD RESULT" not in md and "verdict: **pass**" in md
    for formula in gb.FLOP_FORMULAS.values():
        assert formula in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_without_gpu_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "g2rl_kernels.gpu_check", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and "nothing measured" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_plan_of_the_gpu_run(capsys):
    """The default (GPU) plan, printed without running: roofs, the paper's novelty sizes, every
    (dtype, d, N) configuration with its rows, the extra rows at the first one."""
    assert gpu_check.main(["--plan-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 6 + 8 * 4 + 4
    assert "bf16 GEMM roof (torch.mm 8192^3)" in lines[0]
    assert "fp32 B=16 G=16 d=2048 | group_novelty" in lines[2]
    head = "bf16 N=32768 V=151936 d=2048 S=64"
    assert sum(head in ln for ln in lines) == 8
    assert any(f"{head} | token features chunked | 4.08e+13 flop" in ln for ln in lines)
    assert any(f"{head} | sensitivity fused | 4.08e+13 flop" in ln for ln in lines)
    assert any("fp32 N=16384 V=151936 d=896 S=32 | natural PyTorch" in ln for ln in lines)


def test_cpu_needs_smoke():
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--device", "cpu"])
    assert e.value.code == 2


def test_smoke_run_writes_every_row(tmp_path):
    rc, report, md = smoke(tmp_path)
    assert rc == 0
    check_report(report, md, interpreted=False)


def test_smoke_run_interpreted_triton(tmp_path):
    """With TRITON_INTERPRET=1 the fused and chunked Triton paths are rows too (a subprocess:
    the interpreter is chosen when the kernels are defined)."""
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "g2rl_kernels.gpu_check", "--device", "cpu",
                           "--smoke", "--skip-tests", "--out", str(out), "--reps", "3",
                           "--row-time-s", "0.05"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu_check" in proc.stdout  # progress lines
    report = json.loads((out / "gpu_check.json").read_text())
    check_report(report, (out / "gpu_check.md").read_text(), interpreted=True)
    assert report["environment"]["triton_interpret"] is True


def _broken_config(kind: str) -> gpu_check.ConfigSpec:
    """The smoke sensitivity configuration plus a row whose outputs are wrong."""
    dt, n, v, d, seq_len = gpu_check.SMOKE_SENS[0]
    config = gpu_check.sensitivity_config(dt, n, v, d, seq_len, torch.device("cpu"),
                                          headline=False, interp=False)
    good = config.rows[1]
    assert good.op == "chunked"

    def make(x, spot):
        call, check, note = good.make(x, spot)

        def broken():
            out = call()
            if kind == "offset":
                out.seq_features[-1] += 1e-2 * out.seq_features.abs().max()
            else:
                out.entropy[3] = float("nan")
            return out

        return broken, check, note

    config.rows.append(gpu_check.RowSpec(f"broken {kind}", "chunked", good.meta, good.flops,
                                         make))
    return config


@pytest.mark.parametrize("kind", ["offset", "nan"])
def test_bad_result_is_flagged(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(gpu_check, "plan", lambda args, device: [_broken_config(kind)])
    rc, report, md = smoke(tmp_path)
    assert rc == 1
    rows = {r["name"]: r for r in report["rows"]}
    bad = rows[f"broken {kind}"]
    assert bad["status"] == "bad_result" and not bad["check"]["ok"]
    assert bad["timing"] is not None  # still timed
    if kind == "offset":
        f = bad["check"]["fields"]["seq_features"]
        assert not f["ok"] and f["max_abs_err"] > f["tol"] and f["ratio"] > 1
        assert bad["check"]["fields"]["lse"]["ok"]
    else:
        assert not bad["check"]["finite"]
    assert rows["sensitivity chunked"]["status"] == "ok"  # the healthy row next to it
    assert report["summary"]["verdict"] == "FAIL"
    assert report["summary"]["failed_rows"] == [f"broken {kind} / {bad['config']}"]
    flagged = [c for c in table_rows(md) if c[0] == f"broken {kind}"]
    assert flagged and flagged[0][7] == "**BAD RESULT**"
    assert "verdict: **FAIL**" in md


def test_oom_and_errors_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    config = gpu_check.sensitivity_config(*gpu_check.SMOKE_SENS[1], torch.device("cpu"),
                                          headline=False, interp=False)
    meta = config.rows[0].meta

    def raising(exc):
        def make(x, spot):
            def call():
                raise exc
            return call, None, ""
        return make

    config.rows[1:1] = [
        gpu_check.RowSpec("oom row", "chunked", meta, 1.0,
                          raising(torch.OutOfMemoryError("CUDA out of memory. Tried..."))),
        gpu_check.RowSpec("error row", "chunked", meta, 1.0, raising(ValueError("boom"))),
        gpu_check.RowSpec("unavailable row", "chunked", meta, 1.0,
                          raising(gb.Unavailable("no such path"))),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda args, device: [config])
    rc, report, md = smoke(tmp_path)
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["oom row"]["status"] == "oom" and "out of memory" in rows["oom row"]["reason"]
    assert rows["error row"]["status"] == "error" and "boom" in rows["error row"]["reason"]
    assert rows["unavailable row"]["status"] == "skipped"
    assert "no such path" in rows["unavailable row"]["reason"]
    for name in ("log-prob only (chunked PyTorch)", "sensitivity chunked",
                 "natural PyTorch (full logits)"):  # before and after the failing rows
        assert rows[name]["status"] == "ok"
    assert rc == 1 and report["summary"]["verdict"] == "FAIL"  # the error row
    assert {c[7] for c in table_rows(md) if c[0].endswith(" row")} == {"OOM", "ERROR",
                                                                        "skipped"}


def test_budget_skips_the_remaining_rows(tmp_path):
    rc, report, md = smoke(tmp_path, "--budget-s", "0")
    assert rc == 0
    assert {(r["name"], r["config"]) for r in report["rows"]} == expected_rows(False)
    for r in report["rows"]:
        assert r["status"] == "skipped" and r["reason"].startswith("time budget"), r
        assert r["timing"] is None
    assert report["summary"]["verdict"] == "incomplete"
    assert len(table_rows(md)) == len(report["rows"])


def test_budget_prediction_skips_a_row_that_would_not_fit():
    runner = gpu_check.Runner(torch.device("cpu"), budget_s=100.0, max_reps=5, row_time_s=1.0,
                              start=gb.time.perf_counter(), log=lambda s: None)
    runner.rates["bf16"] = 1e12
    spec = gpu_check.RowSpec("huge", "chunked", {"dtype": "bf16"}, 1e15,
                             lambda x, spot: pytest.fail("must not run"))
    config = gpu_check.ConfigSpec("cfg", lambda: None, [spec])
    row = runner.run_row(spec, config, inputs=object(), spot=None)
    assert row["status"] == "skipped" and "predicted" in row["reason"]


def test_spot_check_tolerances_hold_the_real_paths_and_catch_small_errors():
    x = gb.make_inputs(80, 4, 301, 48, torch.float32, seed=5)
    spot = gb.spot_reference(x, pooled=True, tokens=False)
    out = gb.natural(*x)
    assert gb.check_sensitivity(out, spot)["ok"]
    assert spot.idx.tolist() == list(range(20)) + list(range(60, 80))  # sequences 0 and 3
    out.logprobs[65] -= 1e-3  # a token of the last sequence
    res = gb.check_sensitivity(out, spot)
    assert not res["ok"] and not res["fields"]["logprobs"]["ok"]
    assert res["fields"]["entropy"]["ok"] and res["fields"]["seq_features"]["ok"]
    out.logprobs[65] += 1e-3
    out.seq_features[1] *= 1.001  # sequences 1 and 2 are not in the slice
    assert gb.check_sensitivity(out, spot)["ok"]
    out.seq_features[3] *= 1.001
    assert not gb.check_sensitivity(out, spot)["fields"]["seq_features"]["ok"]


def test_gpu_test_runner_counts_from_junit(tmp_path):
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_sensitivity_fake.py").write_text(textwrap.dedent("""
        import pytest
        def test_cuda_passes(): pass
        def test_cuda_fails(): assert False
        @pytest.mark.skip(reason="no")
        def test_cuda_skipped(): pass
        def test_cpu_only(): assert False  # deselected by -k
    """))
    (tests / "test_unrelated.py").write_text("def test_cuda_elsewhere(): assert False\n")
    res = rep.run_gpu_tests(tmp_path, timeout_s=120, tests_dir=tests)
    assert res["status"] == "failed", res
    assert (res["passed"], res["failed"], res["skipped"], res["errors"]) == (1, 1, 1, 0)
    assert len(res["failing"]) == 1
    assert res["failing"][0].endswith("test_sensitivity_fake::test_cuda_fails")
    assert "-k" in res["command"] and "cuda or gpu" in res["command"]
    line = rep._tests_line(res)
    assert line.startswith("failed: 1 passed, 1 failed")


def test_gpu_test_runner_without_tests_directory(tmp_path):
    res = rep.run_gpu_tests(tmp_path, timeout_s=10, tests_dir=tmp_path / "nowhere")
    assert res["status"] == "skipped" and "no tests directory" in res["reason"]


def test_gpu_test_timeout_keeps_the_counts_of_what_ran(tmp_path, monkeypatch):
    """On its time limit pytest is interrupted (SIGINT), not killed: it still writes its JUnit
    XML, so the tests that ran are counted. A relative --out works from any directory."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_sensitivity_slow.py").write_text(textwrap.dedent("""
        import time
        def test_cuda_a_quick(): pass
        def test_cuda_b_slow(): time.sleep(60)
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "out").mkdir()
    (elsewhere / "out" / "gpu_tests_junit.xml").write_text("stale")
    res = rep.run_gpu_tests(Path("out"), timeout_s=8, tests_dir=tests)
    assert res["status"] == "timeout", res
    assert res["passed"] == 1, res
    assert "timeout: pytest ran past 8 s" in rep._tests_line(res)


def test_report_is_strict_json_and_written_whole(tmp_path):
    path = tmp_path / "r.json"
    rep.write_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}},
                   path)
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": "nan", "b": ["inf", 1.5], "c": {"d": "-inf"}}
    assert not path.with_suffix(".json.tmp").exists()


def test_interrupted_run_leaves_a_report_with_every_finished_row(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which main turns into the same) in the middle of a configuration:
    the rows finished before it are in the report (it is saved after every row)."""
    config = gpu_check.sensitivity_config(*gpu_check.SMOKE_SENS[1], torch.device("cpu"),
                                          headline=False, interp=False)

    def interrupting(x, spot):
        def call():
            raise KeyboardInterrupt
        return call, None, ""

    config.rows.insert(2, gpu_check.RowSpec("interrupted", "chunked", config.rows[0].meta, 1.0,
                                            interrupting))
    monkeypatch.setattr(gpu_check, "plan", lambda args, device: [config])
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--skip-tests", "--out", str(out)])
    assert rc == 130
    report = json.loads((out / "gpu_check.json").read_text())
    assert [r["name"] for r in report["rows"]] == [r.name for r in config.rows[:2]]
    assert report["summary"]["verdict"] == "incomplete"


def test_a_lost_device_stops_the_remaining_rows(tmp_path, monkeypatch):
    """After a row whose failure leaves the device unusable (a sticky CUDA error, a hung
    kernel), the remaining rows are recorded as not run instead of crashing the command."""
    config = gpu_check.sensitivity_config(*gpu_check.SMOKE_SENS[1], torch.device("cpu"),
                                          headline=False, interp=False)

    def hanging(x, spot):
        def call():
            raise gb.KernelHang("a GPU call ran past 120 s")
        return call, None, ""

    config.rows.insert(1, gpu_check.RowSpec("hung", "chunked", config.rows[0].meta, 1.0,
                                            hanging))
    monkeypatch.setattr(gpu_check, "plan", lambda args, device: [config, config])
    monkeypatch.setattr(gpu_check.os, "_exit", lambda code: (_ for _ in ()).throw(
        SystemExit(code)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--smoke", "--skip-tests", "--out", str(out)])
    assert e.value.code == 1
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "error"
    assert all(r["reason"].startswith("not run: a GPU call ran past") for r in rows[2:])
    assert len(rows) == 2 * len(config.rows) and report["summary"]["verdict"] == "FAIL"
