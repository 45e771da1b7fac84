"""Runs the Triton kernels through Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before triton is imported anywhere in the process, so the cases
(tests/_sensitivity_interpreted_cases.py) run in a fresh pytest subprocess; any failure, error
or skip there, or a different number of passed tests, fails this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _sensitivity_helpers import (
    BAD_VALUES,
    INTERPRETED_CASES,
    INTERPRETED_CHUNKED_CASES,
    INTERPRETED_CHUNKED_CONTAINMENT,
    INTERPRETED_CONTAINMENT,
    INTERPRETED_SHARP_CASES,
)

pytest.importorskip("triton", reason="Triton is not installed (it is on Linux)")

HERE = Path(__file__).resolve().parent
CASES_FILE = HERE / "_sensitivity_interpreted_cases.py"
# test_interpreter_is_on + the cases + test_triton_non_contiguous_and_tied (two dtypes)
# + test_triton_allocates_no_n_by_v_or_n_by_d; issue 12: containment (values x settings),
# NaN token weight, check_values and scalars, the sharp-logit cases, the fuzz subset
# issue 9: the chunked path (cases, containment, allocation, fuzz; both paths for the tied,
# weight-containment and sharp tests), confident tokens (2 paths x 3 dtypes x 4), -inf bias
# (5), shuffled sequences (2), the float16 tail (2), bf16 rounding (1), non-contiguous bias (2),
# autocast (2), one live logits buffer (1), chunk_size < 1 (1)
EXPECTED_PASSED = (1 + len(INTERPRETED_CASES) + 2 * 2 + 1
                   + len(BAD_VALUES) * len(INTERPRETED_CONTAINMENT) + 2 + 1
                   + 2 * len(INTERPRETED_SHARP_CASES) + 1
                   + len(INTERPRETED_CHUNKED_CASES) + 1 + 1
                   + len(BAD_VALUES) * len(INTERPRETED_CHUNKED_CONTAINMENT)
                   + 24 + 5 + 2 + 2 + 1 + 2 + 2 + 1 + 1)


def test_triton_kernels_interpreted():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    # the interpreter's tl.dot is numpy's matmul: a multi-threaded OpenBLAS on a busy machine is
    # slower than one thread by orders of magnitude at these tile sizes
    env["OPENBLAS_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
         str(CASES_FILE)],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    tail = log[-6000:]
    assert proc.returncode == 0, f"interpreted Triton tests failed (rc {proc.returncode}):\n{tail}"
    summary = log.strip().splitlines()[-1]
    assert not re.search(r"failed|error|skipped|xfail|xpass|deselected", summary), tail
    m = re.search(r"(\d+) passed", summary)
    assert m and int(m.group(1)) == EXPECTED_PASSED, (
        f"expected {EXPECTED_PASSED} passed, got summary {summary!r}\n{tail}"
    )
