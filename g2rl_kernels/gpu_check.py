"""One command for the GPU: ``python -m g2rl_kernels.gpu_check [--out DIR]``.

On a machine with a CUDA GPU it

1. runs the kernels' CUDA tests (pytest ``-k "cuda or gpu"`` on tests/test_sensitivity*.py,
   tests/test_group_novelty*.py, tests/test_build.py of the checkout, in a subprocess) and counts
   passes and failures;
2. measures the bf16 (and float32) ``torch.mm`` rate at 8192^3 (median of 10 runs, CUDA
   events): the roof;
3. benchmarks, at LLM sizes (V = 151936; d = 2048 and 896; N = 32768 and 16384 tokens in
   S = N / 512 sequences; bf16 and float32): ``g2rl_kernels.sensitivity`` with
   ``impl="fused"`` and ``impl="chunked"`` (sequence features, check_values=False; at the first
   size also check_values=True and per-token features), the log-prob-only pass in chunked
   PyTorch (the baseline a GRPO step pays anyway), natural PyTorch (full logits; skipped with
   the memory it would need where it does not fit) and ``g2rl_kernels.group_novelty`` at the
   paper's sizes (16 prompts x 16 responses, d = 2048 and 2560; and 128 prompts);
4. checks each benchmarked configuration's outputs on a slice (first and last sequence)
   against float64, and writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``
   (default ./gpu_check_out): per row the median time and spread, TFLOP/s by the row's flop
   model, the share of the measured bf16 GEMM rate, the peak memory above the inputs, the check.

Rows run in priority order within ``--budget-s`` (default 540 s, counted from the start,
tests included): a row that would not fit is recorded as skipped. A row that runs out of
memory is recorded ("oom") and the run goes on. Exit status 0 when every check passed and no
test failed, 1 otherwise (also when rows errored).

Without a CUDA GPU it prints one line saying so and exits 0. ``--device cpu --smoke`` runs the
same code at tiny sizes on the CPU (the chunked PyTorch path; with TRITON_INTERPRET=1 the Triton
paths too, interpreted): the test of this plumbing.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import g2rl_kernels
from g2rl_kernels import _gpu_bench as gb
from g2rl_kernels import _gpu_report as rep

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DT_NAME = {v: k for k, v in DTYPES.items()}
VOCAB, SEQ_LEN = 151936, 512
SMOKE_SENS = [("fp32", 96, 300, 48, 32), ("bf16", 64, 257, 32, 16)]  # dtype, N, V, d, seq len
NOVELTY = [(16, 16, 2048), (16, 16, 2560), (128, 16, 2048)]  # B prompts, G responses, d
SMOKE_NOVELTY = [(2, 4, 16), (3, 5, 24)]
STATUS_FAIL = ("bad_result", "error")

# (make(inputs, spot) -> (call, check or None, note)); spot(pooled, tokens) -> SpotReference
Made = tuple[Callable[[], Any], Callable[[Any], dict] | None, str]
SpotFn = Callable[[bool, bool], gb.SpotReference]


@dataclass
class RowSpec:
    """One benchmark row: what to call (built from the configuration's inputs) and its model."""

    name: str
    op: str  # key of gb.FLOP_FORMULAS
    meta: dict
    flops: float
    make: Callable[[Any, SpotFn], Made]
    need_bytes: int | None = None  # memory the row needs above the inputs, if known
    reps: int | None = None  # fixed number of timed runs (else adaptive)
    warmup_s: float = 0.0  # keep calling for this long before timing (clocks up, steady state)


@dataclass
class ConfigSpec:
    """Rows sharing one set of inputs (built once, freed after the last row)."""

    label: str
    build: Callable[[], Any]
    rows: list[RowSpec] = field(default_factory=list)


# ----------------------------------------------------------------------------- the plan


def _sens_row(name: str, op: str, meta: dict, flops: float, impl: str, *, interp: bool = False,
              pooled: bool = True, tokens: bool = False, check_values: bool = False) -> RowSpec:
    def make(inputs: gb.SensInputs, spot: SpotFn) -> Made:
        call = gb.sensitivity_call(inputs, impl, interpreted=interp, pooled=pooled,
                                   tokens=tokens, check_values=check_values)
        return call, lambda out: gb.check_sensitivity(out, spot(pooled, tokens)), ""

    backend = "triton-interpreted" if interp else "default"
    return RowSpec(name, op, {**meta, "impl": impl, "backend": backend,
                              "check_values": check_values, "pooled": pooled,
                              "token_features": tokens}, flops, make)


def sensitivity_config(dtype: str, n: int, v: int, d: int, seq_len: int, device: torch.device,
                       headline: bool, interp: bool) -> ConfigSpec:
    """The rows of one (dtype, N, V, d) configuration."""
    s = max(1, n // seq_len)
    meta = {"dtype": dtype, "N": n, "V": v, "d": d, "S": s}
    label = f"{dtype} N={n} V={v} d={d} S={s}"
    f = {op: gb.flops(op, n, v, d, s) for op in gb.FLOP_FORMULAS}
    impls = [("fused", False), ("chunked", False)] if device.type == "cuda" else [
        ("chunked", False)] + ([("fused", True), ("chunked", True)] if interp else [])

    def tag(impl: str, i: bool) -> str:
        return f"{impl} (Triton interpreted)" if i else impl

    rows = [RowSpec("log-prob only (chunked PyTorch)", "logprob_only",
                    {**meta, "impl": "torch", "chunk": gb.logprob_chunk(v)}, f["logprob_only"],
                    lambda x, spot: (lambda: gb.logprob_only(x.hidden, x.weight, x.targets),
                                     lambda out: gb.check_sensitivity(out, spot(True, False)),
                                     ""))]
    rows += [_sens_row(f"sensitivity {tag(i, it)}", i, meta, f[i], i, interp=it)
             for i, it in impls]
    rows.append(RowSpec(
        "natural PyTorch (full logits)", "natural", {**meta, "impl": "torch"}, f["natural"],
        lambda x, spot: (lambda: gb.natural(*x), lambda out: gb.check_sensitivity(
            out, spot(True, False)), ""), need_bytes=gb.natural_bytes(n, v)))
    if headline:
        rows += [_sens_row(f"sensitivity {tag(i, it)} check_values=True", i, meta, f[i], i,
                           interp=it, check_values=True) for i, it in impls]
        rows += [_sens_row(f"token features {tag(i, it)}", f"{i}_tokens", meta,
                           f[f"{i}_tokens"], i, interp=it, pooled=False, tokens=True)
                 for i, it in impls]
    return ConfigSpec(label, lambda: gb.make_inputs(n, s, v, d, DTYPES[dtype], device), rows)


def novelty_config(b: int, g: int, d: int, dtype: str, device: torch.device) -> ConfigSpec:
    meta = {"dtype": dtype, "B": b, "G": g, "d": d, "impl": "extension"}

    def make(x, spot) -> Made:
        if device.type == "cuda":  # the compiled kernel, or the PyTorch fallback (README)
            meta["impl"] = g2rl_kernels.cuda_backend(device)
        feats, rewards = x
        return (lambda: g2rl_kernels.group_novelty(feats, rewards),
                lambda out: gb.check_novelty(out, feats, rewards), "")

    row = RowSpec("group_novelty", "novelty", meta, gb.flops("novelty", b, g, d), make)
    return ConfigSpec(f"{dtype} B={b} G={g} d={d}",
                      lambda: gb.novelty_inputs(b, g, d, DTYPES[dtype], device), [row])


def roof_config(device: torch.device, size: int) -> ConfigSpec:
    def row(dtype: str) -> RowSpec:
        def make(x, spot) -> Made:
            a, b = x[dtype]
            return (lambda: torch.mm(a, b)), None, ""

        # warmed up for half a second and timed over 50 runs: a short cold burst after the
        # idle test phase would measure the clocks ramping up, not the roof
        return RowSpec(f"{dtype} GEMM roof (torch.mm {size}^3)", "gemm",
                       {"dtype": dtype, "size": size, "impl": "torch.mm"},
                       gb.flops("gemm", size, size, size), make, reps=50, warmup_s=0.5)

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        return {dt: [torch.randn(size, size, dtype=DTYPES[dt], device=device, generator=gen)
                     for _ in range(2)] for dt in ("bf16", "fp32")}

    return ConfigSpec(f"{size}^3", build, [row("bf16"), row("fp32")])


def plan(args: argparse.Namespace, device: torch.device) -> list[ConfigSpec]:
    """Every configuration, in priority order (roofs, novelty, bf16, then fp32)."""
    interp = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    configs = [roof_config(device, 256 if args.smoke else args.gemm_size)]
    novelty = SMOKE_NOVELTY if args.smoke else NOVELTY
    configs += [novelty_config(b, g, d, dt, device) for dt in ("fp32", "bf16")
                for b, g, d in novelty]
    if args.smoke:
        sens = SMOKE_SENS
    else:
        sens = [(dt, n, args.vocab, d, SEQ_LEN) for dt in args.dtypes for d in args.hidden
                for n in args.tokens]
    for i, (dt, n, v, d, seq_len) in enumerate(sens):
        configs.append(sensitivity_config(dt, n, v, d, seq_len, device, i == 0, interp))
    return configs


# ----------------------------------------------------------------------------- running


def log_line(msg: str) -> None:
    """Progress: one flushed line per step (visible in a piped log while it runs)."""
    print(msg, flush=True)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class Runner:
    """Runs the rows of a plan within the time budget and records one dict per row."""

    def __init__(self, device: torch.device, budget_s: float, max_reps: int, row_time_s: float,
                 start: float, log: Callable[[str], None] = log_line,
                 on_record: Callable[[], None] | None = None):
        self.device, self.budget_s, self.max_reps = device, budget_s, max_reps
        self.row_time_s, self.start, self.log = row_time_s, start, log
        self.on_record = on_record  # called after every recorded row (the report is saved)
        self.timer = gb.Timer(device)
        self.rates: dict[str, float] = {}  # dtype -> measured GEMM flop/s
        self.rows: list[dict] = []
        self.total = 0
        self.lost: str | None = None  # why the device cannot be used any more

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def predicted_s(self, spec: RowSpec) -> float | None:
        """A pessimistic time of the row: warm-up + reps at a quarter of the GEMM rate."""
        rate = self.rates.get(spec.meta.get("dtype", ""))
        if not rate or spec.op == "novelty":
            return None
        reps = spec.reps or 3
        return (2 + reps) * spec.flops / (0.25 * rate)

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda" and self.lost is None:
            try:
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a sticky CUDA error: the context is lost
                self.lost = f"CUDA context lost ({e!r})"[:300]

    def _check_alive(self, row: str) -> None:
        """After a failed row: is the device still usable? (An illegal memory access or a
        device-side assert makes every later CUDA call fail.)"""
        if self.device.type != "cuda" or self.lost is not None:
            return
        try:
            self.timer.sync()
        except gb.KernelHang:
            self.lost = f"a GPU call of {row} did not finish"
        except Exception as e:  # noqa: BLE001
            self.lost = f"CUDA context lost after {row} ({e!r})"[:300]

    def run_config(self, config: ConfigSpec) -> None:
        inputs, spots = None, {}
        if self.lost is not None:
            for spec in config.rows:
                self.record(spec, config, status="error", reason=f"not run: {self.lost}")
            return
        try:
            if self.elapsed() < self.budget_s:
                inputs = config.build()
        except Exception as e:  # noqa: BLE001 - recorded per row
            status = "oom" if _is_oom(e) else "error"
            for spec in config.rows:
                self.record(spec, config, status=status, reason=f"building inputs: {e!r}"[:500])
            self._free()
            return

        def spot(pooled: bool, tokens: bool) -> gb.SpotReference:
            if (pooled, tokens) not in spots:
                spots[(pooled, tokens)] = gb.spot_reference(inputs, pooled, tokens)
            return spots[(pooled, tokens)]

        for spec in config.rows:
            self.run_row(spec, config, inputs, spot)
        spots.clear()
        inputs = None  # free before the next configuration's inputs are built
        self._free()

    def record(self, spec: RowSpec, config: ConfigSpec, **fields) -> dict:
        row = {"name": spec.name, "op": spec.op, "config": config.label, **spec.meta,
               "flops": spec.flops, "flop_formula": gb.FLOP_FORMULAS[spec.op],
               "status": "ok", "reason": None, "note": None, "timing": None, "tflops": None,
               "share_of_bf16_gemm": None, "share_of_dtype_gemm": None, "peak_mib": None,
               "time_vs_logprob_only": None, "check": None, **fields}
        self.rows.append(row)
        self._progress(row)
        if self.on_record is not None:
            self.on_record()
        return row

    def run_row(self, spec: RowSpec, config: ConfigSpec, inputs: Any, spot: SpotFn) -> dict:
        if self.lost is not None:
            return self.record(spec, config, status="error", reason=f"not run: {self.lost}")
        left = self.budget_s - self.elapsed()
        predicted = self.predicted_s(spec)
        # a call that takes 20x its pessimistic prediction (at least 2 minutes) has hung
        self.timer.deadline_s = max(120.0, 20 * predicted) if predicted else 120.0
        if inputs is None or left <= 0 or (predicted is not None and predicted > left):
            why = f"time budget: {left:.0f} s of {self.budget_s:.0f} s left"
            if predicted is not None:
                why += f", row predicted {predicted:.0f} s"
            return self.record(spec, config, status="skipped", reason=why)
        if spec.need_bytes is not None and self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
            if spec.need_bytes > 0.9 * free:
                return self.record(spec, config, status="skipped", reason=(
                    f"would need {spec.need_bytes / 2**30:.1f} GiB (about 16 N V bytes), "
                    f"{free / 2**30:.1f} GiB free"))
        out, fields = None, {}
        try:
            call, check, note = spec.make(inputs, spot)
            fields["note"] = note or None
            out = call()  # compile / warm-up; its outputs are the ones checked
            self.timer.sync()
            warm_end = time.perf_counter() + spec.warmup_s
            while time.perf_counter() < warm_end:
                call()
                self.timer.sync()
            t1 = self.timer(call)
            reps = spec.reps or max(3, min(self.max_reps if t1 > 1e-2 else 50,
                                           int(self.row_time_s / max(t1, 1e-9))))
            base = self._mem_reset()
            times = [self.timer(call) for _ in range(reps)]
            peak = self._mem_peak(base)
            fields.update(self._rates(spec, gb.summarise(times)), peak_mib=peak)
            if check is not None:
                try:
                    fields["check"] = check(out)
                except Exception as e:  # noqa: BLE001 - the check itself failed
                    raise RuntimeError(f"spot check: {e!r}") from e
                if not fields["check"]["ok"]:
                    fields["status"] = "bad_result"
        except gb.Unavailable as e:
            fields.update(status="skipped", reason=f"unavailable: {e}")
        except gb.KernelHang as e:
            self.lost = f"{e} in {spec.name} / {config.label}"
            fields.update(status="error", reason=f"hang: {e}")
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            oom = _is_oom(e)
            if "out_dtype" in str(e) and spec.meta.get("impl") == "chunked":
                # this torch has no float32-output 16-bit GEMM: impl="auto" runs fused there
                fields.update(status="skipped", reason=f"unavailable: {e}"[:500])
            else:
                fields.update(status="oom" if oom else "error", reason=repr(e)[:500])
            if not oom:
                self._check_alive(f"{spec.name} / {config.label}")
        finally:
            del out
            self._free()
        return self._with_baseline(self.record(spec, config, **fields))

    def _mem_reset(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _mem_peak(self, base: int | None) -> float | None:
        if base is None:
            return None
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def _rates(self, spec: RowSpec, timing: dict) -> dict:
        rate = spec.flops / timing["median_s"]
        if spec.op == "gemm":
            self.rates[spec.meta["dtype"]] = rate
        bf16, own = self.rates.get("bf16"), self.rates.get(spec.meta.get("dtype", ""))
        return {"timing": timing, "tflops": rate / 1e12,
                "share_of_bf16_gemm": rate / bf16 if bf16 else None,
                "share_of_dtype_gemm": rate / own if own else None}

    def _with_baseline(self, row: dict) -> dict:
        """time / the log-prob-only row of the same configuration."""
        base = next((r for r in self.rows if r["config"] == row["config"]
                     and r["op"] == "logprob_only" and r["timing"]), None)
        if base is not None and row["timing"]:
            row["time_vs_logprob_only"] = row["timing"]["median_s"] / base["timing"]["median_s"]
        return row

    def _progress(self, row: dict) -> None:
        head = f"[gpu_check {self.elapsed():5.0f} s] {len(self.rows):3d}/{self.total}"
        what = f"{row['config']} | {row['name']}"
        if row["timing"]:
            t = row["timing"]
            msg = (f"{t['median_s'] * 1e3:.3g} ms (spread {100 * t['spread']:.0f}%), "
                   f"{row['tflops']:.3g} TFLOP/s")
            if row["share_of_bf16_gemm"] is not None:
                msg += f", {100 * row['share_of_bf16_gemm']:.0f}% of bf16 GEMM"
            if row["check"] is not None:
                msg += ", check " + ("ok" if row["check"]["ok"] else "BAD RESULT")
        else:
            msg = f"{row['status']}: {row['reason']}"
        self.log(f"{head} {what}: {msg}")


# ----------------------------------------------------------------------------- main


def summary(rows: list[dict], tests: dict, elapsed: float, complete: bool) -> dict:
    """Counts by status and the verdict: "FAIL" (a bad result, an error or a failed test),
    "incomplete" (tests timed out, rows cut by the budget or out of memory) or "pass"."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    failed = [f"{r['name']} / {r['config']}" for r in rows if r["status"] in STATUS_FAIL]
    cut = [f"{r['name']} / {r['config']}" for r in rows if r["status"] == "oom"
           or (r["status"] == "skipped" and (r["reason"] or "").startswith("time budget"))]
    if failed or tests.get("status") in ("failed", "error"):
        verdict = "FAIL"
    elif cut or tests.get("status") == "timeout" or not complete:
        verdict = "incomplete"
    else:
        verdict = "pass"
    return {"counts": counts, "failed_rows": failed, "cut_rows": cut,
            "tests_status": tests.get("status"), "verdict": verdict, "elapsed_s": elapsed,
            "complete": complete}


def run_check(args: argparse.Namespace, log: Callable[[str], None] = log_line) -> dict:
    """Tests, roofs, benchmarks; writes the JSON and markdown (after every configuration: a
    run cut short leaves a readable partial report). Returns the report."""
    start = time.perf_counter()
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    report = {"schema": 1, "environment": rep.environment(device), "settings": {
        "device": args.device, "smoke": args.smoke, "budget_s": args.budget_s,
        "max_reps": args.reps, "row_time_s": args.row_time_s,
        "tests_timeout_s": args.tests_timeout_s, "check_values_in_timed_rows": False,
        "argv": sys.argv[1:]}, "flop_formulas": gb.FLOP_FORMULAS, "tests": {}, "roofs": {},
        "rows": []}

    def save(complete: bool) -> None:
        report["summary"] = summary(report["rows"], report["tests"],
                                    time.perf_counter() - start, complete)
        report["roofs"] = {r["dtype"]: {"size": r["size"], "tflops": r["tflops"],
                                        **(r["timing"] or {})}
                           for r in report["rows"] if r["op"] == "gemm" and r["timing"]}
        rep.write_json(report, json_path)
        md_path.write_text(rep.render_markdown(report))

    save(complete=False)  # a report exists from the start: a killed run always leaves one
    complete = False
    try:
        if args.skip_tests:
            report["tests"] = {"status": "skipped", "reason": "--skip-tests"}
        else:
            log(f"[gpu_check] running the GPU tests (at most {args.tests_timeout_s:.0f} s) ...")
            report["tests"] = {"status": "running"}
            report["tests"] = rep.run_gpu_tests(out_dir, args.tests_timeout_s)
            log(f"[gpu_check] GPU tests: {rep._tests_line(report['tests'])}")
            save(complete=False)
        configs = plan(args, device)
        runner = Runner(device, args.budget_s, args.reps, args.row_time_s, start, log,
                        on_record=lambda: save(complete=False))
        runner.total = sum(len(c.rows) for c in configs)
        report["rows"] = runner.rows
        for config in configs:
            runner.run_config(config)
        report["device_lost"] = runner.lost
        complete = runner.lost is None
    finally:  # also on Ctrl-C / SIGTERM (see main) and on an unexpected error
        save(complete=complete)
    log(f"[gpu_check] wrote {json_path} and {md_path}; verdict {report['summary']['verdict']}")
    return report


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _dtype_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m g2rl_kernels.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_out", help="output directory")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the plumbing test)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="rows that would end past this many seconds are skipped")
    p.add_argument("--tests-timeout-s", type=float, default=240.0,
                   help="the GPU tests are interrupted (what ran is counted) after this long")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--reps", type=int, default=7, help="most timed runs of a slow row")
    p.add_argument("--row-time-s", type=float, default=8.0, help="timed seconds per row target")
    p.add_argument("--gemm-size", type=int, default=8192)
    p.add_argument("--tokens", type=_int_list, default=[32768, 16384])
    p.add_argument("--hidden", type=_int_list, default=[2048, 896])
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--dtypes", type=_dtype_list, default=["bf16", "fp32"])
    p.add_argument("--plan-only", action="store_true",
                   help="print the rows (configuration, name, flops) and exit; needs no GPU")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu needs --smoke (the LLM sizes are for a GPU)")
    return args


def print_plan(args: argparse.Namespace) -> None:
    configs = plan(args, torch.device(args.device))
    n = 0
    for c in configs:
        for r in c.rows:
            n += 1
            print(f"{n:3d} {c.label} | {r.name} | {r.flops:.3g} flop ({r.op})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        print_plan(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}, built for "
              f"CUDA {torch.version.cuda}, torch.cuda.is_available() = False): nothing measured. "
              "Run it where a GPU is, or try the plumbing with --device cpu --smoke.")
        return 0
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)  # `timeout` sends SIGTERM
    try:
        report = run_check(args)
    except KeyboardInterrupt:
        print("gpu_check: interrupted; the partial report is written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report.get("device_lost"):
        # a hung kernel or a lost context: leave without touching the device again
        print(f"gpu_check: the device was lost: {report['device_lost']}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 1 if report["summary"]["verdict"] == "FAIL" else 0


def _sigterm_to_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
