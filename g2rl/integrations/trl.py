"""G2RL inside TRL's ``GRPOTrainer``: ``G2RLGRPOTrainer`` and ``G2RLGRPOConfig``.

TRL keeps everything it does (generation with transformers or vLLM, accelerate / DeepSpeed /
FSDP, the loss, logging); the subclass only replaces the advantages with the G2RL ones:

1. features: when TRL makes its no-grad "old log-probs" pass (``steps_per_generation > 1``,
   vLLM importance sampling), the features ride on it: TRL computes its old log-probs itself
   (its own fused LM head, dtype and autocast, so the first-iteration ratio is exactly 1, as in
   TRL), and a forward hook on the backbone hands the same final hidden states and the LM-head
   weight to ``g2rl_kernels.sensitivity``, which returns the sequence features Phi (B_local, d)
   in float32 arithmetic (no extra backbone forward; one extra LM-head product over the
   completion tokens). When TRL makes no old pass (on-policy), one no-grad backbone pass
   computes the features.
2. rewards: TRL's ``_calculate_rewards`` already gathers them over processes; they are
   aggregated as TRL does (weighted ``nansum`` over the reward functions; a completion that
   every function left unscored is NaN, left out of its group and given advantage 0).
3. the features are gathered over processes, ``g2rl_kernels.group_novelty`` runs on the global
   (B, G) groups (a group may straddle processes), and each process keeps its slice.

Parity with TRL at ``g2rl_lambda=0``: the advantages equal TRL's (to float32 rounding) in every
group whose reward std (n - 1, scored completions) plus ``g2rl_eps`` is at least
``g2rl_std_floor``, given ``g2rl_eps=1e-4`` (TRL's) and ``g2rl_clip=None`` (or rewards within
the clip); so in every group when ``g2rl_std_floor=0`` or ``scale_rewards="none"``. A group
whose std is below the floor gets (r - mean) / g2rl_std_floor (smaller than TRL's); the share
of such groups is logged as ``g2rl/std_floored_groups`` and, at lambda 0, warned about once.

Hook points (private methods of ``trl.GRPOTrainer``, verified against TRL 1.16.0):
``_calculate_rewards``, ``_get_per_token_logps_and_entropies``, ``_generate`` and
``_generate_and_score_completions``. Another TRL version may move them; the import checks that
they exist and the trainer raises if TRL did not make an old pass where 1.16 makes one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

import g2rl_kernels
from g2rl.collapse import CollapseMonitor
from g2rl.trainer import group_novelty_skip_nan

#: TRL versions this integration was tested with (the ``[trl]`` extra pins the same range).
TESTED_TRL = (1, 16)

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "g2rl.integrations.trl needs TRL: pip install 'g2rl[trl]' (tested with trl==1.16.*); "
        f"importing it failed: {exc}"
    ) from exc

_HOOKS = ("_calculate_rewards", "_get_per_token_logps_and_entropies", "_generate",
          "_generate_and_score_completions")
_missing = [h for h in _HOOKS if not hasattr(GRPOTrainer, h)]
if _missing:  # pragma: no cover - depends on the TRL version
    raise ImportError(f"trl {trl.__version__}: GRPOTrainer has no {_missing}; g2rl's TRL "
                      "integration was written against trl 1.16 (pip install 'g2rl[trl]')")
if tuple(int(x) for x in trl.__version__.split(".")[:2] if x.isdigit()) != TESTED_TRL:
    warnings.warn(f"g2rl.integrations.trl was tested with trl 1.16.*, found {trl.__version__}",
                  stacklevel=2)

__all__ = ["G2RLGRPOConfig", "G2RLGRPOTrainer", "SensitivityPass", "sensitivity_pass"]


@dataclass
class G2RLGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the G2RL options (``G2RL_METHOD.md`` sections 2-4)."""

    g2rl_lambda: float = field(default=0.5, metadata={
        "help": "Shaping strength lambda in [0, 1]. 0 gives TRL's GRPO advantages in every group "
                "whose reward std + g2rl_eps is at least g2rl_std_floor (all groups with "
                "g2rl_std_floor=0); see g2rl_std_floor."})
    g2rl_mode: str = field(default="centered", metadata={
        "help": "'centered': f = 1 + lambda (2 nubar - 1); 'eq12': f = 1 + lambda r nubar."})
    g2rl_clip: float | None = field(default=None, metadata={
        "help": "Clip of the shaped rewards; None: no clip. The paper's 3 is a bound for "
                "rewards in {-1, +1}; with rewards on another scale it would change them."})
    g2rl_eps: float = field(default=1e-4, metadata={
        "help": "eps of the norms, peer weights and the std (TRL's advantage eps is 1e-4)."})
    g2rl_span_floor: float = field(default=0.01, metadata={
        "help": "Novelty min-max spread floor (see g2rl_kernels.group_novelty)."})
    g2rl_std_floor: float = field(default=0.05, metadata={
        "help": "Floor of the group std: A = (r - mean) / max(std + g2rl_eps, g2rl_std_floor). "
                "A group whose reward std + g2rl_eps is below it gets smaller advantages than "
                "TRL's (logged as g2rl/std_floored_groups); 0 disables it, so that lambda 0 "
                "gives TRL's advantages in every group. 0.05 is below the std of any mixed "
                "group of binary rewards; rewards on a finer scale need their own floor."})
    g2rl_uniform_groups: str = field(default="zero", metadata={
        "help": "'zero': groups with all-equal rewards get advantage 0 (as GRPO); 'shape': "
                "the paper's rule (unsafe with sparse rewards)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.g2rl_lambda) <= 1.0:
            raise ValueError(f"g2rl_lambda must be in [0, 1], got {self.g2rl_lambda}")
        if self.g2rl_mode not in g2rl_kernels.novelty.MODES:
            raise ValueError(f"g2rl_mode must be one of {sorted(g2rl_kernels.novelty.MODES)}, "
                             f"got {self.g2rl_mode!r}")
        if self.g2rl_uniform_groups not in g2rl_kernels.novelty.UNIFORM_GROUPS:
            raise ValueError("g2rl_uniform_groups must be one of "
                             f"{list(g2rl_kernels.novelty.UNIFORM_GROUPS)}, got "
                             f"{self.g2rl_uniform_groups!r}")
        if self.g2rl_clip is not None and not float(self.g2rl_clip) > 0:
            raise ValueError(f"g2rl_clip must be None or > 0, got {self.g2rl_clip}")
        for name in ("g2rl_eps", "g2rl_span_floor", "g2rl_std_floor"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.scale_rewards not in ("group", "none", True, False):
            raise ValueError(
                f"G2RL with scale_rewards={self.scale_rewards!r} is not supported: the novelty "
                "shaping standardises within each group; use scale_rewards='group' (or 'none')")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "G2RL needs multi_objective_aggregation='sum_then_normalize' (one reward per "
                f"completion, shaped in its group); got {self.multi_objective_aggregation!r}")


class SensitivityPass(NamedTuple):
    """Result of :func:`sensitivity_pass`: logps (B, K), entropy (B, K), features (B, d)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    features: torch.Tensor


def _unwrap(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    """The transformers causal LM inside accelerate / PEFT wrappers (with its adapters)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    if is_peft_model(model):
        model = model.get_base_model()
    return model


def check_lm_head(model: torch.nn.Module) -> None:
    """Raise ``NotImplementedError`` for heads the sensitivity kernels cannot reproduce: logit
    soft-capping, scaled logits, an LM head with a PEFT adapter."""
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"{type(model).__name__} soft-caps its logits (final_logit_softcapping="
            f"{config.final_logit_softcapping}); g2rl's sensitivity kernels do not support it yet")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and float(value) != 1.0:
            raise NotImplementedError(
                f"{type(model).__name__} scales its logits ({name}={value}); g2rl's "
                "sensitivity kernels do not support scaled logits yet")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise NotImplementedError(f"{type(model).__name__} has no plain LM head (weight)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise NotImplementedError("an LM head with a PEFT adapter is not supported: the "
                                  "features need the head's weight itself")


def _head_features(model: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, logits_to_keep: int, *, temperature: float,
                   head_fp32: bool = False, feature_mask: torch.Tensor | None = None
                   ) -> SensitivityPass:
    """``g2rl_kernels.sensitivity`` on the final hidden states ``hidden`` (b, L, d) of
    ``input_ids`` (b, L): the K positions that predict ``input_ids[:, -K:]``.

    Runs outside any autocast region, in float32 arithmetic: hidden states and LM-head weight
    of one dtype go in as they are (16-bit values are upcast exactly, chunk by chunk, inside the
    kernel); of two dtypes (e.g. a float32 head, ``cast_lm_head_to_fp32``) both are upcast."""
    from torch.distributed.tensor import DTensor

    head = model.get_output_embeddings()
    k = int(logits_to_keep)
    b = input_ids.shape[0]
    keep = attention_mask[:, -k:] != 0
    if feature_mask is not None:  # e.g. TRL's env_mask: environment tokens are in no feature
        keep = keep & (feature_mask != 0)
    targets = input_ids[:, -k:].masked_fill(~keep, -100)
    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor):  # FSDP2, as TRL's fused head does
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    h = hidden[:, -k - 1:-1].to(weight.device)  # (b, K, d): position t predicts token t + 1
    with maybe_gather_lm_head_ctx(*params), torch.autocast(h.device.type, enabled=False):
        w = weight.float() if head_fp32 else weight
        hs = h.reshape(-1, h.shape[-1])
        if hs.dtype != w.dtype:
            hs, w = hs.float(), w.float()
        rows = torch.arange(b, device=hs.device)[:, None].expand(b, k).reshape(-1)
        out = g2rl_kernels.sensitivity(
            hs, w, targets.reshape(-1).to(hs.device), seq_index=rows, num_seqs=b,
            bias=None if bias is None else bias.to(w.dtype), temperature=temperature)
    return SensitivityPass(out.logprobs.view(b, k), out.entropy.view(b, k), out.seq_features)


def sensitivity_pass(model: torch.nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, logits_to_keep: int, *,
                     temperature: float, batch_size: int | None = None,
                     autocast: Callable[[], Any] | None = None,
                     head_fp32: bool = False,
                     feature_mask: torch.Tensor | None = None) -> SensitivityPass:
    """Log-probs, entropies and sequence features of the last ``K = logits_to_keep`` tokens.

    One backbone forward per chunk of ``batch_size`` rows; the final hidden states at the K
    positions that predict ``input_ids[:, -K:]`` and the LM-head weight go to
    ``g2rl_kernels.sensitivity`` (float32 arithmetic, outside autocast). Tokens with
    ``attention_mask == 0`` or ``feature_mask == 0`` are ignored (log-prob and entropy 0, in no
    feature). The log-probs are TRL's in float32 (to ~1e-6); under bf16 TRL's own differ by
    its bf16 logits, which is why the trainer leaves TRL's old log-probs to TRL.

    Args:
        model: a transformers causal LM (PEFT-unwrapped: its adapters stay active).
        input_ids, attention_mask: (B, L) prompt (left-padded) + completion (right-padded).
        autocast: a factory of the context the backbone runs in (``accelerator.autocast``).
        feature_mask: (B, K) or None; 0 leaves a completion token out (TRL's ``env_mask``).
    Returns:
        :class:`SensitivityPass`: logps (B, K), entropy (B, K), features (B, d), float32.
    """
    from contextlib import nullcontext

    backbone = model.base_model
    n = input_ids.shape[0]
    step = batch_size or n
    parts = []
    for start in range(0, n, step):
        ids, am = input_ids[start:start + step], attention_mask[start:start + step]
        with autocast() if autocast is not None else nullcontext():
            hidden = backbone(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        parts.append(_head_features(
            model, hidden, ids, am, logits_to_keep, temperature=temperature, head_fp32=head_fp32,
            feature_mask=None if feature_mask is None else feature_mask[start:start + step]))
    return SensitivityPass(*(torch.cat(x) for x in zip(*parts, strict=True)))


def _scored_pair_stats(cosine: torch.Tensor, scored: torch.Tensor) -> tuple[float, float]:
    """Mean cosine and share of negative cosines over the pairs i < j of each group whose two
    responses were both scored; cosine (B, G, G), scored (B, G) bool. NaN when there is none."""
    g = cosine.shape[-1]
    iu = torch.triu_indices(g, g, offset=1, device=cosine.device)
    ok = scored[:, iu[0]] & scored[:, iu[1]]
    vals = cosine[:, iu[0], iu[1]][ok].double()
    if vals.numel() == 0:
        return float("nan"), float("nan")
    return float(vals.mean()), float((vals < 0).double().mean())


def _distinct_per_group(cosine: torch.Tensor, same: float = 0.9999) -> float:
    """Mean number of distinct responses per group, from (B, G, G) feature cosines: response j
    repeats an earlier i when S_ij > ``same`` (identical token sequences have cosine 1)."""
    g = cosine.shape[-1]
    earlier = torch.ones(g, g, dtype=torch.bool, device=cosine.device).tril(-1)  # i < j
    repeats = ((cosine.transpose(1, 2) > same) & earlier).any(dim=-1)  # (B, G): j repeats
    return float(g - repeats.sum(dim=1).double().mean())


def _std_floored_groups(shaped: torch.Tensor, scored: torch.Tensor, adv: torch.Tensor,
                        eps: float, floor: float) -> torch.Tensor:
    """(B,) bool: groups whose advantages were divided by ``floor`` instead of their std + eps
    (and are not all 0), from the shaped rewards (B, G) of their scored (B, G) completions."""
    n = scored.sum(dim=1)
    x = shaped.double().masked_fill(~scored, 0.0)
    mean = x.sum(dim=1, keepdim=True) / n.clamp(min=1).unsqueeze(1)
    var = ((x - mean).masked_fill(~scored, 0.0) ** 2).sum(dim=1) / (n - 1).clamp(min=1)
    moved = (adv != 0).any(dim=1)
    return (n >= 2) & (var.sqrt() + eps < floor) & moved


def collapse_advice(args: G2RLGRPOConfig) -> str:
    """The collapse warning's advice for a TRL run, in ``G2RLGRPOConfig`` fields."""
    lam = float(args.g2rl_lambda)
    if lam == 0.0:
        return ("With g2rl_lambda=0 these are TRL's GRPO advantages (no novelty shaping), so "
                "G2RL's shaping did not cause this; look at the reward functions, "
                "learning_rate, beta and temperature. ('training accuracy' is the share of "
                "completions with a reward > 0.)")
    if args.g2rl_uniform_groups == "shape":
        return ("G2RL with g2rl_uniform_groups='shape' collapses like this when rewards are "
                "sparse; consider G2RLGRPOConfig(g2rl_uniform_groups='zero') (the default), a "
                f"longer warm start (SFT) or a smaller g2rl_lambda (now {lam:g}; 0 gives TRL's "
                "GRPO advantages). ('training accuracy' is the share of completions with a "
                "reward > 0.)")
    return (f"With g2rl_uniform_groups='zero' G2RL's shaping (g2rl_lambda={lam:g}) acts only "
            "inside groups with mixed rewards; to see whether it contributes, compare with "
            "g2rl_lambda=0 (TRL's GRPO advantages), or try a smaller g2rl_lambda or a longer "
            "warm start (SFT). ('training accuracy' is the share of completions with a "
            "reward > 0.)")


#: The collapse rule's feature-cosine criterion (mean within-group cosine above 0.5, calibrated
#: on the built-in task's 128-dim features) is used only for features of at least this many
#: dimensions. Below it a cosine says little about the responses: unrelated directions have
#: cosines of spread 1/sqrt(d) (0.35 at d = 8, 0.125 at d = 64), and a direction that distinct
#: responses share reaches 0.5 easily. Identical responses (a collapse) have cosine 1 at any d
#: and are caught by the distinct-responses criterion, which is the only one acting below it.
COLLAPSE_COSINE_MIN_DIM = 64


def collapse_monitor_for(args: G2RLGRPOConfig, num_generations: int,
                         feature_dim: int) -> CollapseMonitor:
    """:class:`g2rl.collapse.CollapseMonitor` for a TRL run: its advice names
    ``G2RLGRPOConfig`` fields; the cosine criterion needs ``feature_dim >=``
    :data:`COLLAPSE_COSINE_MIN_DIM`; the distinct criterion (at most 2 distinct responses per
    group) is at most G / 2, so that groups of 2 do not fire it by their size alone."""
    monitor = CollapseMonitor(advice=collapse_advice(args))
    if feature_dim < COLLAPSE_COSINE_MIN_DIM:
        monitor.cosine = math.inf
    monitor.distinct = min(monitor.distinct, num_generations / 2)
    return monitor


class G2RLGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with G2RL advantages (see the module docstring).

    Takes the arguments of ``GRPOTrainer`` (TRL 1.16's signature and order); ``args`` must be a
    :class:`G2RLGRPOConfig`, and without it a default one is built as TRL builds its default
    (``output_dir="<model name>-G2RL"``). Refuses (``NotImplementedError``) what the kernels
    cannot do yet: logit soft-capping or scaled logits, an adapter on the LM head,
    vision-language models, tools / environments (their tokens would enter the features).
    ``rollout_func`` is supported: the tokens its ``env_mask`` marks 0 are left out of the
    features as TRL leaves them out of the loss. PEFT models: hidden states from the base
    model with its adapters active.

    Logged metrics (train): ``g2rl/novelty_mean``, ``g2rl/cos_mean`` (mean pairwise feature
    cosine within groups), ``g2rl/neg_pair_share``, ``g2rl/shaped_reward_mean``,
    ``g2rl/adv_abs_mean``, ``g2rl/served_old_pass`` (1 when the features came from TRL's old
    log-prob pass), ``g2rl/std_floored_groups`` (share of groups whose std was below
    ``g2rl_std_floor``: at lambda 0 exactly the groups whose advantages differ from TRL's),
    ``g2rl/distinct_per_group`` (responses whose features differ: identical token sequences have
    identical features) and ``g2rl/collapse_warning`` (1 from the step where the collapse warning
    of :mod:`g2rl.collapse` fired: responses within groups stopped differing while the share of
    positive rewards did not rise; printed once, never stops; see :func:`collapse_monitor_for`).
    """

    def __init__(self, model: Any, reward_funcs: Any = None,
                 args: G2RLGRPOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None,
                 reward_processing_classes: Any = None, callbacks: Any = None,
                 optimizers: tuple[Any, Any] = (None, None), quantization_config: Any = None,
                 peft_config: Any = None, tools: list[Callable] | None = None,
                 rollout_func: Callable | None = None, environment_factory: Any = None) -> None:
        if args is None:  # as GRPOTrainer builds its default GRPOConfig
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = G2RLGRPOConfig(f"{name.split('/')[-1]}-G2RL")
        if not isinstance(args, G2RLGRPOConfig):
            raise TypeError("G2RLGRPOTrainer needs args=G2RLGRPOConfig(...), got "
                            f"{type(args).__name__}")
        if tools or environment_factory is not None:
            raise NotImplementedError(
                "G2RLGRPOTrainer does not support tools or environment_factory yet (tool outputs "
                "would enter the features); a rollout_func with an env_mask is supported")
        super().__init__(
            model, reward_funcs, args=args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class,
            reward_processing_classes=reward_processing_classes, callbacks=callbacks,
            optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config, tools=tools, rollout_func=rollout_func,
            environment_factory=environment_factory)
        if self._is_vlm:
            raise NotImplementedError("G2RLGRPOTrainer does not support vision-language models")
        check_lm_head(_unwrap(self.model, self.accelerator))
        self._g2rl_serve = False
        self._g2rl_features: torch.Tensor | None = None
        self._g2rl_env_mask: list | None = None
        self._g2rl_collapse: CollapseMonitor | None = None
        self._g2rl_floor_warned = False
        self._g2rl_rewards_per_func: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any,
                           completion_ids_list: Any) -> torch.Tensor:
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._g2rl_rewards_per_func = out  # (B_global, n_funcs), gathered over processes
        return out

    def _generate(self, prompts: list) -> tuple:
        out = super()._generate(prompts)
        # TRL 1.16 returns (prompt_ids, completion_ids, tool_mask, ...); without tools the
        # tool mask is rollout_func's env_mask (1: model token, 0: environment token) or None
        self._g2rl_env_mask = out[2]
        return out

    def _feature_mask(self, n: int, k: int, device: torch.device) -> torch.Tensor | None:
        """(n, K) env_mask of this process's completions as TRL pads it (with 1), or None."""
        rows = self._g2rl_env_mask
        if rows is None:
            return None
        if len(rows) != n:
            raise RuntimeError(f"env_mask has {len(rows)} rows for {n} completions")
        mask = torch.ones(n, k, dtype=torch.long)
        for i, row in enumerate(rows):
            row = list(row)[:k]
            mask[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        return mask.to(device)

    def _old_pass_expected(self) -> bool:
        """TRL 1.16's rule for making the no-grad old log-prob pass."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return bool(self.args.gradient_accumulation_steps % generate_every != 0
                    or (self.use_vllm and self.vllm_importance_sampling_correction))

    def _head_fp32(self) -> bool:
        return bool(getattr(self.args, "cast_lm_head_to_fp32", False))

    def _sensitivity(self, model: torch.nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, logits_to_keep: int,
                     batch_size: int | None) -> SensitivityPass:
        return sensitivity_pass(
            _unwrap(model, self.accelerator), input_ids, attention_mask, logits_to_keep,
            temperature=self.temperature, batch_size=batch_size,
            autocast=self.accelerator.autocast, head_fp32=self._head_fp32(),
            feature_mask=self._feature_mask(input_ids.shape[0], logits_to_keep,
                                            input_ids.device))

    def _served_old_pass(self, model: Any, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, logits_to_keep: int,
                         batch_size: int | None, compute_entropy: bool
                         ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """TRL's own old log-prob pass, unchanged; a forward hook on the backbone computes the
        features from each chunk's final hidden states (``self._g2rl_features``)."""
        inner = _unwrap(model, self.accelerator)
        k = int(logits_to_keep)
        fmask = self._feature_mask(input_ids.shape[0], k, input_ids.device)
        feats: list[torch.Tensor] = []
        done = [0]

        def hook(module: Any, args: Any, kwargs: dict, output: Any) -> None:
            hidden = getattr(output, "last_hidden_state", None)
            hidden = output[0] if hidden is None else hidden
            b, start = hidden.shape[0], done[0]
            ids = input_ids[start:start + b]
            seen = kwargs.get("input_ids")
            if (seen is not None and seen.shape != ids.shape) or ids.shape[0] != b:
                raise RuntimeError("TRL's old log-prob pass fed the backbone rows the G2RL "
                                   "features cannot match; g2rl.integrations.trl needs trl 1.16")
            done[0] += b
            feats.append(_head_features(
                inner, hidden, ids, attention_mask[start:start + b], k,
                temperature=self.temperature, head_fp32=self._head_fp32(),
                feature_mask=None if fmask is None else fmask[start:start + b]).features)

        handle = inner.base_model.register_forward_hook(hook, with_kwargs=True)
        try:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, k, batch_size=batch_size,
                compute_entropy=compute_entropy)
        finally:
            handle.remove()
        if done[0] != input_ids.shape[0]:
            raise RuntimeError(f"the backbone saw {done[0]} of {input_ids.shape[0]} rows in "
                               "TRL's old log-prob pass; g2rl.integrations.trl needs trl 1.16")
        self._g2rl_features = torch.cat(feats)
        return out

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor,
                                           attention_mask: torch.Tensor, logits_to_keep: int,
                                           batch_size: int | None = None,
                                           compute_entropy: bool = False,
                                           compute_aux_loss: bool = False, **kwargs: Any,
                                           ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        if (self._g2rl_serve and model is self.model and not torch.is_grad_enabled()
                and not compute_aux_loss and all(v is None for v in kwargs.values())):
            self._g2rl_serve = False  # the old pass comes first; a later ref pass is TRL's own
            return self._served_old_pass(model, input_ids, attention_mask, logits_to_keep,
                                         batch_size, compute_entropy)
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
            compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        self._g2rl_features = None
        self._g2rl_rewards_per_func = None
        self._g2rl_env_mask = None
        expect_old = mode == "train" and self._old_pass_expected()
        self._g2rl_serve = expect_old
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            served = expect_old and not self._g2rl_serve
            self._g2rl_serve = False
        if mode != "train":  # evaluation keeps TRL's advantages (they only enter eval loss)
            return output
        if expect_old and not served:
            raise RuntimeError(f"trl {trl.__version__} made no old log-prob pass where trl 1.16 "
                               "makes one; g2rl.integrations.trl needs trl 1.16.*")
        features = self._g2rl_features
        if features is None:  # on-policy: one no-grad backbone pass for the features
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            am = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            with torch.no_grad(), disable_gradient_checkpointing(
                    self.model, self.args.gradient_checkpointing_kwargs):
                features = self._sensitivity(self.model, ids, am,
                                             output["completion_ids"].shape[1],
                                             self.args.per_device_train_batch_size).features
        advantages, metrics = self._g2rl_advantages(features, len(output["advantages"]))
        output["advantages"] = advantages
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        self._metrics[mode]["g2rl/served_old_pass"].append(float(served))
        return output

    # ------------------------------------------------------------------ the advantages
    def _g2rl_advantages(self, features: torch.Tensor, n_local: int
                         ) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's (n_local,) G2RL advantages and the step's metrics."""
        rpf = self._g2rl_rewards_per_func
        if rpf is None:
            raise RuntimeError("TRL did not call _calculate_rewards")
        device = rpf.device
        # TRL's sum_then_normalize aggregation; all-NaN rows (unscorable) stay NaN
        rewards = (rpf * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        feats = self.accelerator.gather(features.float().contiguous()).to(device)
        g = self.num_generations
        if feats.shape[0] != rewards.shape[0] or rewards.shape[0] % g:
            raise RuntimeError(f"{feats.shape[0]} gathered features for {rewards.shape[0]} "
                               f"rewards in groups of {g}")
        a = self.args
        scale = self.scale_rewards != "none"
        nov = group_novelty_skip_nan(
            feats.view(-1, g, feats.shape[-1]), rewards.view(-1, g), lam=float(a.g2rl_lambda),
            clip=None if a.g2rl_clip is None else float(a.g2rl_clip), mode=a.g2rl_mode,
            eps=float(a.g2rl_eps), scale_advantages=scale,
            span_floor=float(a.g2rl_span_floor), std_floor=float(a.g2rl_std_floor),
            uniform_groups=a.g2rl_uniform_groups)
        adv = nov.advantages.reshape(-1)
        # the completions table shows the advantages used
        logged = self._logs["advantages"]
        for _ in range(min(len(logged), adv.numel())):
            logged.pop()
        logged.extend(adv.tolist())
        scored = ~torch.isnan(rewards)
        floored = torch.zeros(rewards.shape[0] // g, dtype=torch.bool, device=device)
        if scale and float(a.g2rl_std_floor) > 0:
            floored = _std_floored_groups(nov.shaped_rewards, scored.view(-1, g),
                                          nov.advantages, float(a.g2rl_eps),
                                          float(a.g2rl_std_floor))
        if (bool(floored.any()) and float(a.g2rl_lambda) == 0.0 and not self._g2rl_floor_warned
                and self.accelerator.is_main_process):
            self._g2rl_floor_warned = True
            warnings.warn(
                f"g2rl_lambda=0, but {int(floored.sum())} of {floored.numel()} groups have a "
                f"reward std + g2rl_eps below g2rl_std_floor={a.g2rl_std_floor:g}: their "
                "advantages are (r - mean) / g2rl_std_floor, smaller than TRL's GRPO ones. "
                "Set g2rl_std_floor=0 for TRL's advantages in every group (logged as "
                "g2rl/std_floored_groups; printed once).", stacklevel=2)
        cos_mean, neg_share = _scored_pair_stats(nov.cosine, scored.view(-1, g))
        distinct = _distinct_per_group(nov.cosine)
        if self._g2rl_collapse is None:
            self._g2rl_collapse = collapse_monitor_for(a, g, feats.shape[-1])
        warning = self._g2rl_collapse.update({
            "step": int(self.state.global_step) + 1,
            "accuracy": float((rewards[scored] > 0).float().mean()) if bool(scored.any())
            else 0.0,
            "feature_cos_mean": 0.0 if cos_mean != cos_mean else cos_mean,
            "distinct_per_group": distinct})
        if warning and self.accelerator.is_main_process:
            warnings.warn(warning, stacklevel=2)
        metrics = {
            "g2rl/distinct_per_group": distinct,
            "g2rl/collapse_warning": float(self._g2rl_collapse.collapsed),
            "g2rl/novelty_mean": float(nov.novelty.reshape(-1)[scored].mean()),
            "g2rl/cos_mean": cos_mean,
            "g2rl/neg_pair_share": neg_share,
            "g2rl/shaped_reward_mean": float(nov.shaped_rewards.reshape(-1)[scored].mean()),
            "g2rl/adv_abs_mean": float(adv.abs().mean()),
            "g2rl/std_floored_groups": float(floored.float().mean()),
        }
        start = self.accelerator.process_index * n_local
        return adv[start:start + n_local].to(self.accelerator.device), metrics
