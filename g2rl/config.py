"""Training configuration: one dataclass, every field a CLI flag, optionally read from YAML.

Precedence: built-in defaults < ``--config file.yaml`` < flags given on the command line.
Every error names the option (as its flag) or the YAML file and key.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from g2rl.tasks import TASK_NAMES

METHODS = ("g2rl", "grpo", "entropy", "embedding")
ROLLOUTS = ("auto", "hf", "vllm")
REWARDS = ("auto", "builtin", "math")
NOVELTY_MODES = ("centered", "eq12")
UNIFORM_GROUPS = ("zero", "shape")
NOVELTY_SHAPES = ("all", "correct")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad option value; the message names the flag (or the YAML file and key)."""


def _opt(default: Any, help: str, *, type: Any = None, choices: tuple | None = None,
         group: str = "general") -> Any:
    meta = {"help": help, "type": type, "choices": choices, "group": group}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All options of ``python -m g2rl.train`` (see ``--help``)."""

    # run
    output_dir: str | None = _opt(None, "run directory (default: runs/<timestamp>)", type=str)
    resume: bool = _opt(False, "resume from the last checkpoint of --output-dir (default: the "
                               "newest run under runs/)", type=bool)
    seed: int = _opt(0, "random seed (data order, sampling, SFT)", type=int)
    device: str = _opt("auto", "device (auto: cuda if available)", type=str, choices=DEVICES)
    dtype: str = _opt("auto", "parameter dtype (auto: float32; with bfloat16 AdamW updates "
                              "below its precision are lost)", type=str, choices=DTYPES)
    threads: int = _opt(0, "torch CPU threads (0: auto, i.e. 1 for --model tiny on the CPU, "
                           "whose matrices are too small to gain from more and which then "
                           "keeps its speed on a busy machine; else torch's default)", type=int)
    progress: bool = _opt(True, "show a progress bar", type=bool)
    # model and data
    model: str = _opt("tiny", "HF model directory, or 'tiny' (a tiny Qwen3 built locally)",
                      type=str, group="model and data")
    tiny_hidden_size: int = _opt(128, "--model tiny: hidden size (attention heads of 32, MLP "
                                      "3x wider; 128: 0.8 M parameters)", type=int,
                                 group="model and data")
    tiny_layers: int = _opt(4, "--model tiny: number of layers", type=int,
                            group="model and data")
    cache_dir: str | None = _opt(None, "where the tiny model is cached (default: $G2RL_CACHE or "
                                       "~/.cache/g2rl)", type=str, group="model and data")
    data: str = _opt("builtin", "training data: 'builtin', a .jsonl file (prompt, answer), a "
                                "datasets.save_to_disk directory, or a hub name", type=str,
                     group="model and data")
    task: str = _opt("subset-sum", "built-in task (--data builtin): subset-sum, countdown (four "
                                   "numbers, + - * / step by step; the exploration study's "
                                   "task) or countdown5 (five numbers)", type=str,
                     choices=TASK_NAMES, group="model and data")
    data_split: str | None = _opt(None, "split of a datasets directory / hub dataset", type=str,
                                  group="model and data")
    data_limit: int | None = _opt(None, "use at most this many training problems", type=int,
                                  group="model and data")
    train_problems: int = _opt(20000, "number of built-in training problems", type=int,
                               group="model and data")
    eval_data: str | None = _opt(None, "held-out data (default: built-in test problems with "
                                       "--data builtin, else no evaluation)", type=str,
                                 group="model and data")
    eval_split: str | None = _opt(None, "split of --eval-data", type=str, group="model and data")
    reward: str = _opt("auto", "reward: builtin (the built-in task's rule) or math (math-verify "
                               "on the last \\boxed{}); auto: builtin for --data builtin",
                       type=str, choices=REWARDS, group="model and data")
    reward_timeout: float = _opt(2.0, "--reward math: CPU seconds one answer may take to "
                                      "verify (a worker silent for 3x that + 1 s of wall-clock "
                                      "time is killed); a slower one scores -1", type=float,
                                 group="model and data")
    reward_workers: int = _opt(0, "--reward math: processes that verify answers (0: "
                                  "min(4, CPUs))", type=int, group="model and data")
    system_prompt: str | None = _opt(None, "system prompt (default: the paper's with "
                                           "--reward math, none for builtin)", type=str,
                                     group="model and data")
    # rollouts
    rollout: str = _opt("auto", "rollout engine (auto: vllm when installed and on CUDA, or with "
                                "vLLM's CPU build when --max-new-tokens >= 64; else hf)",
                        type=str, choices=ROLLOUTS, group="rollouts")
    max_new_tokens: int | None = _opt(None, "maximum response length in tokens (default: the "
                                            "built-in task's longest answer plus EOS, 12 for "
                                            "subset-sum and other data, 29 for countdown, 38 "
                                            "for countdown5)", type=int, group="rollouts")
    temperature: float = _opt(1.0, "sampling temperature (also used for every log-prob)",
                              type=float, group="rollouts")
    top_p: float = _opt(1.0, "nucleus sampling", type=float, group="rollouts")
    top_k: int = _opt(0, "top-k sampling (0: off)", type=int, group="rollouts")
    vllm_gpu_memory_utilization: float = _opt(0.5, "vLLM gpu_memory_utilization", type=float,
                                              group="rollouts")
    vllm_sleep: bool = _opt(False, "put vLLM to sleep during the update (frees its GPU memory)",
                            type=bool, group="rollouts")
    vllm_kv_cache_gib: float = _opt(0.0, "vLLM KV-cache size in GiB (0: auto; on the CPU room "
                                         "for 256 full-length sequences, at most 2 GiB; on "
                                         "CUDA from --vllm-gpu-memory-utilization)",
                                    type=float, group="rollouts")
    vllm_max_model_len: int = _opt(0, "vLLM longest prompt + response in tokens (0: the "
                                      "model's maximum; lower it to shrink the KV cache)",
                                   type=int, group="rollouts")
    tis_cap: float = _opt(0.0, "truncated importance sampling: weight each token's policy "
                               "loss by min(exp(old_logp - vllm_logp), C) with C this value "
                               "(0: off; needs --rollout vllm)", type=float, group="rollouts")
    # RL
    method: str = _opt("g2rl", "advantages: g2rl (novelty-shaped GRPO), grpo, entropy (GRPO "
                               "plus an entropy bonus), or embedding (the g2rl chain on an "
                               "external sentence embedding of the responses)", type=str,
                       choices=METHODS, group="RL")
    steps: int = _opt(250, "number of RL steps", type=int, group="RL")
    prompts_per_step: int = _opt(16, "prompts per step (B)", type=int, group="RL")
    group_size: int = _opt(8, "responses per prompt (G); >= 2 for g2rl and grpo", type=int,
                           group="RL")
    lr: float = _opt(4e-5, "AdamW learning rate", type=float, group="RL")
    weight_decay: float = _opt(0.0, "AdamW weight decay", type=float, group="RL")
    adam_beta1: float = _opt(0.9, "AdamW beta1", type=float, group="RL")
    adam_beta2: float = _opt(0.99, "AdamW beta2", type=float, group="RL")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)", type=float,
                            group="RL")
    mini_batches: int = _opt(2, "optimizer steps per rollout batch (split into mini-batches)",
                             type=int, group="RL")
    ppo_epochs: int = _opt(1, "passes over the rollout batch", type=int, group="RL")
    micro_batch_size: int = _opt(64, "sequences per forward/backward (gradient accumulation "
                                     "inside a mini-batch)", type=int, group="RL")
    eps_low: float = _opt(0.2, "ratio clip below: 1 - eps_low", type=float, group="RL")
    eps_high: float = _opt(0.28, "ratio clip above: 1 + eps_high", type=float, group="RL")
    kl_coef: float = _opt(0.001, "k3 KL coefficient to the frozen start policy (0: no "
                                 "reference model)", type=float, group="RL")
    entropy_coef: float = _opt(0.01, "entropy bonus coefficient (--method entropy only)",
                               type=float, group="RL")
    novelty_lambda: float = _opt(0.5, "G2RL shaping strength lambda in [0, 1]", type=float,
                                 group="RL")
    novelty_clip: float = _opt(3.0, "clip shaped rewards to [-c, c] (g2rl and embedding; grpo "
                                    "and entropy never clip)", type=float, group="RL")
    novelty_mode: str = _opt("centered", "shaping formula", type=str, choices=NOVELTY_MODES,
                             group="RL")
    novelty_span_floor: float = _opt(0.01, "floor delta on the spread of the novelty scores in "
                                           "nubar (spec section 3)", type=float, group="RL")
    novelty_std_floor: float = _opt(0.05, "floor on the group std of the shaped rewards before "
                                          "the division (spec section 4; 0: off)", type=float,
                                    group="RL")
    novelty_shape: str = _opt("all", "which answers G2RL shapes: all (the paper) or correct "
                                     "(wrong answers keep their base reward; only the "
                                     "exploration half: credit moved among correct answers)",
                              type=str, choices=NOVELTY_SHAPES, group="RL")
    uniform_groups: str = _opt("zero", "groups whose rewards are all equal: zero (advantage 0, "
                                       "as in GRPO) or shape (the paper; unsafe with sparse "
                                       "rewards)", type=str, choices=UNIFORM_GROUPS, group="RL")
    embedding_model: str | None = _opt(None, "sentence-transformers model directory for "
                                             "--method embedding and the semantic geometry "
                                             "(default: the packaged all-MiniLM-L6-v2 when "
                                             "installed)", type=str, group="RL")
    semantic_geometry: bool = _opt(True, "log the semantic geometry (embedding cosines) when "
                                         "an embedding model is available", type=bool,
                                   group="RL")
    semantic_every: int = _opt(10, "log the semantic geometry every this many steps (every "
                                   "step with --method embedding, which needs the embeddings "
                                   "anyway)", type=int, group="RL")
    collapse_window: int = _opt(20, "steps averaged by the collapse warning", type=int,
                                group="RL")
    collapse_cosine: float = _opt(0.5, "collapse warning: mean feature cosine within groups "
                                       "above this", type=float, group="RL")
    collapse_distinct: float = _opt(2.0, "collapse warning: or at most this many distinct "
                                         "responses per group", type=float, group="RL")
    entropy_warning: float = _opt(0.8, "warn once when the mean token entropy over "
                                       "--collapse-window steps exceeds this fraction of ln V "
                                       "(divergence to the uniform policy; 0: off)",
                                  type=float, group="RL")
    adv_eps: float = _opt(1e-6, "epsilon of the group standardisation", type=float, group="RL")
    scale_advantages: bool = _opt(True, "divide advantages by the group std", type=bool,
                                  group="RL")
    # SFT warm start
    sft_steps: int | None = _opt(None, "supervised warm-start steps (default with --data "
                                       "builtin: the task's, 250 for subset-sum, 1000 for "
                                       "countdown and countdown5; else 0)", type=int,
                                 group="SFT")
    sft_batch_size: int = _opt(64, "SFT batch size", type=int, group="SFT")
    sft_lr: float = _opt(1e-3, "SFT learning rate", type=float, group="SFT")
    sft_division_weight: float = _opt(0.05, "countdown: weight of a solution that uses / when "
                                            "the one SFT trace of a problem is drawn (1 for "
                                            "the others)", type=float, group="SFT")
    sft_keep_b_only: float = _opt(0.2, "countdown: share of the problems that need / kept "
                                       "for the SFT warm start", type=float, group="SFT")
    # evaluation
    eval_problems: int = _opt(200, "held-out problems evaluated (0: no evaluation)", type=int,
                              group="evaluation")
    eval_n: int = _opt(4, "samples per held-out problem", type=int, group="evaluation")
    eval_ks: str = _opt("1,4", "comma-separated k of pass@k and maj@k", type=str,
                        group="evaluation")
    eval_temperature: float = _opt(1.0, "evaluation sampling temperature", type=float,
                                   group="evaluation")
    eval_batch_size: int = _opt(256, "sequences per evaluation generate call", type=int,
                                group="evaluation")
    eval_before_sft: bool = _opt(True, "also evaluate before the SFT warm-start", type=bool,
                                 group="evaluation")
    eval_start: bool = _opt(True, "evaluate at the start of RL (after the warm start)",
                            type=bool, group="evaluation")
    warm_start_only: bool = _opt(False, "run the SFT warm start (and the start evaluation), "
                                        "save the model to <run>/warm_start and stop: "
                                        "python -m g2rl.study starts every method of a seed "
                                        "from it with --model", type=bool, group="SFT")
    # checkpoints
    save_every: int = _opt(1, "save a checkpoint every this many steps", type=int,
                           group="checkpoints")
    keep_checkpoints: int = _opt(2, "keep this many most recent checkpoints", type=int,
                                 group="checkpoints")

    # ---------------------------------------------------------------- derived values
    @property
    def builtin(self) -> bool:
        return self.data == "builtin"

    def resolved_reward(self) -> str:
        if self.reward != "auto":
            return self.reward
        return "builtin" if self.builtin else "math"

    def resolved_max_new_tokens(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.builtin:
            from g2rl.tasks import get_task

            return get_task(self.task).max_new_tokens
        return 12

    def resolved_sft_steps(self) -> int:
        if self.sft_steps is not None:
            return self.sft_steps
        if not self.builtin:
            return 0
        from g2rl.tasks import get_task

        return get_task(self.task).sft_steps

    def ks(self) -> list[int]:
        return parse_ks(self.eval_ks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the flag of the first bad value; return self."""
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                _fail(f.name, f"must be one of {', '.join(choices)}", value)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f.name, "must be a finite number", value)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            _fail("max_new_tokens", "must be >= 1", self.max_new_tokens)
        positive = ("steps", "prompts_per_step", "group_size", "mini_batches",
                    "ppo_epochs", "micro_batch_size", "sft_batch_size", "eval_n",
                    "eval_batch_size", "save_every", "keep_checkpoints", "train_problems",
                    "collapse_window", "semantic_every")
        for name in positive:
            if getattr(self, name) < 1:
                _fail(name, "must be >= 1", getattr(self, name))
        for name in ("lr", "sft_lr", "temperature", "reward_timeout"):
            if getattr(self, name) <= 0:
                _fail(name, "must be > 0", getattr(self, name))
        for name in ("weight_decay", "grad_clip", "kl_coef", "entropy_coef", "eps_low",
                     "novelty_span_floor", "novelty_std_floor", "collapse_distinct",
                     "reward_workers",
                     "eps_high", "adv_eps", "eval_temperature", "threads", "eval_problems",
                     "top_k"):
            if getattr(self, name) < 0:
                _fail(name, "must be >= 0", getattr(self, name))
        if self.eps_low >= 1:
            _fail("eps_low", "must be < 1", self.eps_low)
        if not 0 < self.top_p <= 1:
            _fail("top_p", "must be in (0, 1]", self.top_p)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, "must be in [0, 1)", getattr(self, name))
        if not 0 <= self.novelty_lambda <= 1:
            _fail("novelty_lambda", "must be in [0, 1]", self.novelty_lambda)
        if self.embedding_model is not None and not Path(
                self.embedding_model).expanduser().is_dir():
            _fail("embedding_model", "directory not found", self.embedding_model)
        if not 0 <= self.entropy_warning <= 1:
            _fail("entropy_warning", "must be in [0, 1]", self.entropy_warning)
        if self.sft_division_weight < 0:
            _fail("sft_division_weight", "must be >= 0", self.sft_division_weight)
        if not 0 <= self.sft_keep_b_only <= 1:
            _fail("sft_keep_b_only", "must be in [0, 1]", self.sft_keep_b_only)
        if self.novelty_clip <= 0:
            _fail("novelty_clip", "must be > 0", self.novelty_clip)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            _fail("vllm_gpu_memory_utilization", "must be in (0, 1]",
                  self.vllm_gpu_memory_utilization)
        for name in ("vllm_kv_cache_gib", "vllm_max_model_len", "tis_cap"):
            if getattr(self, name) < 0:
                _fail(name, "must be >= 0", getattr(self, name))
        if self.tis_cap > 0 and self.rollout == "hf":
            _fail("tis_cap", "needs the rollout engine's log-probs: use --rollout vllm",
                  self.tis_cap)
        if self.group_size < 2 and self.method in METHODS:
            _fail("group_size", f"must be >= 2 with --method {self.method} (advantages are "
                                "relative to the group)", self.group_size)
        if self.prompts_per_step * self.group_size < self.mini_batches:
            _fail("mini_batches", "must be <= prompts_per_step * group_size",
                  self.mini_batches)
        if self.sft_steps is not None and self.sft_steps < 0:
            _fail("sft_steps", "must be >= 0", self.sft_steps)
        if self.resolved_sft_steps() > 0 and not self.builtin:
            _fail("sft_steps", "the SFT warm-start needs solutions, which only --data builtin "
                               "has; use 0", self.sft_steps)
        if self.resolved_reward() == "builtin" and not self.builtin:
            _fail("reward", "builtin needs --data builtin", self.reward)
        if self.data_limit is not None and self.data_limit < 1:
            _fail("data_limit", "must be >= 1", self.data_limit)
        if self.model != "tiny" and not Path(self.model).expanduser().is_dir():
            _fail("model", "model directory not found (give a local HF model directory or "
                           "'tiny')", self.model)
        for name in ("tiny_hidden_size", "tiny_layers"):
            if getattr(self, name) < 1:
                _fail(name, "must be >= 1", getattr(self, name))
        if self.tiny_hidden_size % 32:
            _fail("tiny_hidden_size", "must be a multiple of 32 (the head size)",
                  self.tiny_hidden_size)
        if self.model == "tiny" and not self.builtin:
            _fail("model", "the tiny model only knows the built-in task's characters; give "
                           "an HF model directory with --data other than builtin", self.model)
        self.ks()
        return self


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in str(text).split(",") if k.strip()})
    except ValueError:
        _fail("eval_ks", "must be comma-separated integers", text)
    if not ks or ks[0] < 1:
        _fail("eval_ks", "must be comma-separated integers >= 1", text)
    return ks


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail(name: str, what: str, value: Any) -> None:
    raise ConfigError(f"{flag(name)} {what} (got {value!r})")


# -------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every default is suppressed so that given flags can be told apart."""
    parser = argparse.ArgumentParser(
        prog="python -m g2rl.train",
        description="GRPO / G2RL training. With no arguments: a tiny Qwen3 model learns the "
                    "built-in digit-sum task on the CPU (SFT warm-start, then G2RL).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="read options from a YAML file (keys as the flags, with - or _); "
                             "flags given on the command line override it")
    groups: dict[str, Any] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default if f.default is not MISSING else None
        shown = "auto" if default is None and "default:" in meta["help"] else default
        help_text = meta["help"]
        if "default:" not in help_text:
            help_text += f" (default: {shown})"
        if meta["type"] is bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               help=help_text)
        else:
            group.add_argument(flag(f.name), dest=f.name, type=_typed(f.name, meta["type"]),
                               choices=meta["choices"], help=help_text,
                               metavar=None if meta["choices"] else f.name.upper())
    return parser


def _typed(name: str, typ: Any):
    def convert(text: str) -> Any:
        if text.lower() in ("none", "null") and TrainConfig.__dataclass_fields__[name].default \
                is None:
            return None
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {typ.__name__}, got {text!r}") from None
    convert.__name__ = typ.__name__
    return convert


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Options from a YAML mapping, keys normalised to field names; errors name the file/key."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got "
                          f"{type(raw).__name__}")
    known = {f.name: f for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        typ = known[name].metadata["type"]
        if value is None:
            if known[name].default is not None:
                raise ConfigError(f"--config {path}: option {key!r} cannot be null")
            out[name] = None
            continue
        if typ is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: option {key!r} must be true or false, got "
                                  f"{value!r}")
            out[name] = value
            continue
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
            continue
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
            continue
        if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out[name] = str(value)
            continue
        if typ in (int, float) and isinstance(value, str):
            try:
                out[name] = typ(value)
                continue
            except ValueError:
                pass
        raise ConfigError(f"--config {path}: option {key!r} must be {typ.__name__}, got "
                          f"{value!r}")
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (plus ``--config``) into a validated :class:`TrainConfig`.

    Raises :class:`ConfigError` for bad values; argparse exits (code 2) on unknown flags.
    """
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file:
        values.update(load_yaml(config_file))
    values.update(ns)
    return TrainConfig(**values).validate()


def save_yaml(config: TrainConfig, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    import yaml

    data = config.to_dict()
    if extra:
        data.update(extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
