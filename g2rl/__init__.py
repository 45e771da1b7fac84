"""g2rl: a thin GRPO / G2RL trainer on transformers or vLLM rollouts.

Entry points: ``python -m g2rl.train`` (training; the built-in default learns a small task on a
CPU) and ``python -m g2rl.eval`` (pass@1, maj@k and pass@k of a checkpoint). The kernels the
trainer consumes live in :mod:`g2rl_kernels`.
"""

__version__ = "0.1.0"
