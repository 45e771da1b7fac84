"""The subset-sum task under its old name: :mod:`g2rl.tasks.subset_sum` (kept importable)."""

from g2rl.tasks.subset_sum import *  # noqa: F401,F403
from g2rl.tasks.subset_sum import (  # noqa: F401
    MAX_TERMS,
    MIN_TERMS,
    NUM_DIGITS,
    SPLITS,
    extract_answer,
    make_examples,
    reward,
    sample_solution,
    solutions,
)
