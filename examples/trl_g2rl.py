"""G2RL on math problems with TRL's GRPOTrainer (single GPU, accelerate, DeepSpeed, FSDP, vLLM).

Every ``trl.GRPOConfig`` option is a flag (``--use_vllm``, ``--vllm_mode colocate``,
``--beta``, ``--num_generations``, ...), plus the G2RL ones (``--g2rl_lambda``,
``--g2rl_mode``, ``--g2rl_clip``, ``--g2rl_std_floor``, ``--g2rl_uniform_groups``) and:

  --model        a model directory or hub name (e.g. Qwen/Qwen3-1.7B-Base)
  --data         a .jsonl file with "prompt" and "answer" fields, a datasets.save_to_disk
                 directory, or a hub dataset name; ``--data_split`` picks its split
  --data_limit   use at most this many problems

Reward: +1 when the last ``\\boxed{}`` answer matches "answer" under math-verify, else -1
(``g2rl.rewards.math_reward``); the paper's system prompt is prepended. ``--g2rl_lambda 0``
gives TRL's GRPO advantages (with these +-1 rewards every mixed group is above the default
``--g2rl_std_floor 0.05``; ``--g2rl_std_floor 0`` makes it hold for any reward).

Single process (one GPU, or the CPU with --use_cpu):

    python examples/trl_g2rl.py --model Qwen/Qwen3-1.7B-Base --data math_train.jsonl \\
        --output_dir runs/trl-g2rl --bf16 --learning_rate 5e-7 --beta 0.001 \\
        --num_generations 16 --per_device_train_batch_size 16 --max_completion_length 8192

Several GPUs: ``accelerate launch --config_file <deepspeed_zero3.yaml | fsdp.yaml>
examples/trl_g2rl.py ...`` (see the README's TRL section).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScriptArguments:
    model: str = field(metadata={"help": "model directory or hub name"})
    data: str = field(metadata={"help": ".jsonl (prompt, answer), save_to_disk dir or hub name"})
    data_split: str | None = field(default=None, metadata={"help": "split of --data"})
    data_limit: int | None = field(default=None, metadata={"help": "at most this many problems"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system prompt (default: the paper's; '' for none)"})


def build_dataset(args: ScriptArguments) -> Any:
    """A ``datasets.Dataset`` of conversational prompts with an ``answer`` column."""
    from datasets import Dataset

    from g2rl.data import load_examples
    from g2rl.rewards import MATH_SYSTEM_PROMPT

    system = MATH_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt
    examples = load_examples(args.data, split=args.data_split, limit=args.data_limit)
    if not examples:
        raise SystemExit(f"--data {args.data}: no examples")
    head = [{"role": "system", "content": system}] if system else []
    return Dataset.from_list([
        {"prompt": head + [{"role": "user", "content": ex.prompt}], "answer": ex.answer}
        for ex in examples
    ])


def math_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: +1 / -1 by math-verify on the last \\boxed{} answer."""
    from g2rl.rewards import math_reward as score

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [score(t, a) for t, a in zip(texts, answer, strict=True)]


def main(argv: list[str] | None = None) -> Any:
    from transformers import HfArgumentParser

    from g2rl.integrations.trl import G2RLGRPOConfig, G2RLGRPOTrainer

    parser = HfArgumentParser((ScriptArguments, G2RLGRPOConfig))
    script, config = parser.parse_args_into_dataclasses(args=argv)
    trainer = G2RLGRPOTrainer(script.model, math_reward, args=config,
                              train_dataset=build_dataset(script))
    trainer.train()
    trainer.save_model(config.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
