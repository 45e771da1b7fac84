"""Shared TRL test settings: the GRPOConfig keyword arguments of a tiny CPU run."""

from __future__ import annotations

from typing import Any


def common_args(tmp_path: Any, group_size: int, **kw: Any) -> dict[str, Any]:
    """Keyword arguments for ``GRPOConfig`` / ``G2RLGRPOConfig``: groups of ``group_size``, two
    prompts per device batch, 6-token completions, CPU, float32, no KL; ``kw`` overrides."""
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * group_size,
                num_generations=group_size, max_completion_length=6, learning_rate=1e-3,
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                bf16=False, beta=0.0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return base
