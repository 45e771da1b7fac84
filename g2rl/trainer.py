"""The RL step: rollouts, rewards, one no-grad sensitivity pass, group novelty, the update.

One step (``Trainer.step``):

1. draw ``B`` prompts, sample ``G`` responses each (token ids kept, never re-tokenised);
2. score them (+1 / -1);
3. one no-grad forward over prompt + response; the final hidden states (after the final norm)
   of the response positions and the LM-head weight go to ``g2rl_kernels.sensitivity``, which
   returns the old log-probs, the entropies and the sequence features Phi in one call (and the
   same for the frozen reference model's log-probs when the KL term is on);
4. ``g2rl_kernels.group_novelty(Phi (B, G, d), rewards (B, G))`` gives the advantages
   (``--method g2rl``: lambda-shaped; ``grpo`` / ``entropy``: lambda = 0, i.e. plain group
   standardisation of the rewards);
5. the clipped-surrogate update over ``mini_batches`` optimizer steps (gradient accumulation
   over micro-batches, token-mean over each mini-batch, gradient clipping, AdamW);
6. ``rollout.sync_weights(model)``.

Every log-prob uses the sampling temperature.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import g2rl_kernels
from g2rl.config import TrainConfig
from g2rl.data import Example, encode_prompt
from g2rl.geometry import PairStats, distinct_per_group, group_cosine
from g2rl.loss import LossStats, policy_loss, token_logprobs
from g2rl.rollout import RolloutBatch, logprob_mismatch, rollout_logprobs
from g2rl.sft import NonFiniteLossError

#: Test hook: SIGKILL the process in the middle of this RL step (after its update, before its
#: metrics and checkpoint are written), to test ``--resume``.
KILL_ENV = "G2RL_TEST_KILL_AT_STEP"


@dataclass
class PackedBatch:
    """Prompt + response sequences, right-padded, with targets aligned to hidden positions.

    Attributes:
        input_ids: (N, L) token ids (pad after the response).
        attention_mask: (N, L) 1 for real tokens.
        targets: (N, L) the next token at positions that predict a response token, else -100
            (``targets[i, t] = input_ids[i, t + 1]`` for response tokens).
        mask: (N, L) bool, ``targets != -100``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def rows(self, idx: torch.Tensor) -> PackedBatch:
        """The sub-batch of rows ``idx``, cropped to its longest sequence."""
        am = self.attention_mask[idx]
        width = max(1, int(am.sum(1).max()))
        return PackedBatch(self.input_ids[idx, :width], am[:, :width], self.targets[idx, :width],
                           self.mask[idx, :width])


def pack(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
         pad_id: int, device: torch.device | str = "cpu") -> PackedBatch:
    """Pack N (prompt, response) pairs into a :class:`PackedBatch` (right padding)."""
    n = len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(lengths) if lengths else 1
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    am = torch.zeros((n, width), dtype=torch.long)
    targets = torch.full((n, width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        seq = list(p) + list(r)
        if not p:
            raise ValueError(f"sample {i}: empty prompt")
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        am[i, : len(seq)] = 1
        if r:
            targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(list(r), dtype=torch.long)
    return PackedBatch(ids.to(device), am.to(device), targets.to(device),
                       (targets != -100).to(device))


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a ``*ForCausalLM`` (its output is after the final norm)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:
        raise TypeError(f"{type(model).__name__} has no base model to take hidden states from")
    return base


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, d), bias (V,) or None) of the LM head."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def response_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(M, d) final hidden states at the M positions that predict response tokens (row-major)."""
    out = backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False)
    return out.last_hidden_state[batch.mask]


@torch.no_grad()
def sensitivity_pass(model: torch.nn.Module, batch: PackedBatch, temperature: float,
                     *, features: bool = True) -> g2rl_kernels.SensitivityOutput:
    """Old log-probs (M,), entropies (M,) and, with ``features``, the sequence features
    (N, d) of every response, from one no-grad forward and one ``g2rl_kernels.sensitivity``
    call. A non-finite hidden state or LM-head row raises :class:`NonFiniteLossError` (the
    trainer's exit code 1: the run diverged)."""
    hidden = response_hidden(model, batch)
    weight, bias = lm_head(model)
    n = batch.input_ids.shape[0] if features else None
    seq_index = None
    if features:
        rows = torch.arange(n, device=hidden.device)[:, None]
        seq_index = rows.expand_as(batch.mask)[batch.mask]
    try:
        return g2rl_kernels.sensitivity(
            hidden, weight, batch.targets[batch.mask], seq_index=seq_index, num_seqs=n,
            bias=bias, temperature=temperature,
        )
    except ValueError as exc:  # a NaN/inf hidden state or LM-head row: the model diverged
        if "is not finite" not in str(exc):
            raise
        raise NonFiniteLossError(f"the policy's outputs are not finite: {exc}") from exc


@torch.no_grad()
def rollout_features(model: torch.nn.Module, roll: RolloutBatch, pad_id: int,
                     temperature: float) -> torch.Tensor:
    """(N, d) sequence features of the N generated responses of ``roll`` under ``model``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = pack(roll.prompt_ids, roll.response_ids, pad_id, device)
    feats = sensitivity_pass(model, batch, temperature).seq_features
    model.train(was_training)
    return feats


def advantages_for(method: str, features: torch.Tensor, rewards: torch.Tensor, *,
                   lam: float, clip: float | None, mode: str, eps: float, scale: bool,
                   span_floor: float = 0.01, std_floor: float = 0.05,
                   uniform_groups: str = "zero", shape: str = "all",
                   ) -> g2rl_kernels.NoveltyOutput:
    """Advantages (B, G) of ``rewards`` (B, G) from features (B, G, d).

    ``g2rl`` (features: the policy's gradient features) and ``embedding`` (features: an external
    sentence embedding): novelty-shaped rewards, standardised in the group. ``grpo`` and
    ``entropy``: lambda = 0 and no clip, so the shaped reward is the reward itself: plain GRPO
    standardisation; the novelty is still computed (for logging). NaN rewards: see
    :func:`group_novelty_skip_nan`.

    ``shape="correct"`` (a variant, not the paper): only answers with reward > 0 get their
    shaped reward; the others keep their base reward, so a wrong answer is never rewarded for
    resembling (or differing from) its peers. The shaped rewards are then standardised as
    usual (same eps and floors), and a group whose base rewards are all equal still gets
    advantage 0 with ``uniform_groups="zero"``.
    """
    if shape not in ("all", "correct"):
        raise ValueError(f"shape must be 'all' or 'correct', got {shape!r}")
    shaped = method in ("g2rl", "embedding")
    kw = dict(mode=mode, eps=eps, scale_advantages=scale, span_floor=span_floor,
              std_floor=std_floor)
    out = group_novelty_skip_nan(features.float(), rewards.float(), lam=lam if shaped else 0.0,
                                 clip=clip if shaped else None, uniform_groups=uniform_groups,
                                 **kw)
    if not shaped or shape == "all":
        return out
    r = rewards.float()
    kept = torch.where(r > 0, out.shaped_rewards, r)  # NaN stays NaN: left out again below
    again = group_novelty_skip_nan(features.float(), kept, lam=0.0, clip=None,
                                   uniform_groups="shape", **kw)
    adv = again.advantages
    if uniform_groups == "zero":
        valid = ~torch.isnan(r)
        hi = torch.where(valid, r, float("-inf")).amax(dim=1)
        lo = torch.where(valid, r, float("inf")).amin(dim=1)
        adv = adv.masked_fill((hi <= lo)[:, None], 0.0)
    return g2rl_kernels.NoveltyOutput(out.cosine, out.novelty, kept.nan_to_num(0.0), adv)


def _reward_value(x: float | None) -> float:
    """A reward function's output as a float; None (could not be scored) becomes NaN."""
    return float("nan") if x is None else float(x)


def _nanstd(x: torch.Tensor) -> float:
    """Standard deviation (n - 1) of the non-NaN entries of ``x``; 0 with fewer than two."""
    x = x[~torch.isnan(x)]
    return float(x.std()) if x.numel() > 1 else 0.0


def group_novelty_skip_nan(features: torch.Tensor, rewards: torch.Tensor,
                           **kwargs: Any) -> g2rl_kernels.NoveltyOutput:
    """``g2rl_kernels.group_novelty`` where a NaN reward (an answer that could not be scored)
    is handled as TRL does: the response is left out of its group (its mean, std, novelty peers
    and cosines) and gets advantage 0, shaped reward 0, novelty 0 and zero cosines.

    features (B, G, d), rewards (B, G); groups without NaN go through one batched call, each
    group with a NaN is recomputed on its scored responses only.
    """
    bad = torch.isnan(rewards)
    if not bool(bad.any()):
        return g2rl_kernels.group_novelty(features, rewards, **kwargs)
    out = g2rl_kernels.group_novelty(features, rewards.masked_fill(bad, 0.0), **kwargs)
    cos, nov, shaped, adv = (t.clone() for t in out)
    for b in bad.any(dim=1).nonzero().flatten().tolist():
        keep = (~bad[b]).nonzero().flatten()
        cos[b], nov[b], shaped[b], adv[b] = 0.0, 0.0, 0.0, 0.0
        if keep.numel():
            sub = g2rl_kernels.group_novelty(features[b, keep][None], rewards[b, keep][None],
                                             **kwargs)
            cos[b, keep[:, None], keep[None, :]] = sub.cosine[0]
            nov[b, keep], shaped[b, keep], adv[b, keep] = (sub.novelty[0],
                                                           sub.shaped_rewards[0],
                                                           sub.advantages[0])
    return g2rl_kernels.NoveltyOutput(cos, nov, shaped, adv)


def geometry_metrics(nov: g2rl_kernels.NoveltyOutput, rewards: torch.Tensor,
                     features: torch.Tensor, semantic: torch.Tensor | None,
                     novelty_from: str) -> dict[str, float]:
    """Per-step geometry and advantage-mass metrics.

    Args:
        nov: the step's group novelty output (its cosines are of the features it was given).
        rewards: (B, G) base rewards.
        features: (B, G, d) the policy's gradient features.
        semantic: (B, G, D) sentence embeddings of the responses, or None.
        novelty_from: ``"features"`` or ``"semantic"``: what ``nov`` was computed from.
    """
    out: dict[str, float] = {}
    feat_cos = nov.cosine if novelty_from == "features" else group_cosine(features)
    out.update(PairStats().add_cosine(feat_cos).as_dict("feature"))
    if semantic is not None:
        sem_cos = nov.cosine if novelty_from == "semantic" else group_cosine(semantic)
        out.update(PairStats().add_cosine(sem_cos).as_dict("semantic"))
    uniform = (rewards == rewards[:, :1]).all(dim=1)  # (B,)
    mass = nov.advantages.abs().sum(dim=1).cpu()
    total = float(mass.sum())
    out["uniform_group_frac"] = float(uniform.float().mean())
    out["adv_mass_uniform"] = float(mass[uniform.cpu()].sum()) / total if total > 0 else 0.0
    return out


#: novelty difference between the correct answers of a group that counts as "separated"
NOVELTY_SPREAD = 0.1


def exploration_metrics(nov: g2rl_kernels.NoveltyOutput, rewards: torch.Tensor,
                        features: torch.Tensor, cfg: Any) -> dict[str, float]:
    """Could G2RL's exploration half act this step?

    - ``multi_correct_frac``: share of groups with two or more correct answers (reward > 0);
    - ``novelty_spread_frac``: of those, the share whose correct answers' novelty scores differ
      by more than :data:`NOVELTY_SPREAD` (max - min);
    - ``adv_moved``: the advantage mass moved relative to plain GRPO standardisation,
      sum |A - A_grpo| / sum |A_grpo| (0 for grpo and entropy).
    """
    ok = rewards > 0
    multi = ok.sum(dim=1) >= 2
    spread = 0
    for b in multi.nonzero().flatten().tolist():
        nu = nov.novelty[b][ok[b]]
        spread += int(float(nu.max() - nu.min()) > NOVELTY_SPREAD)
    n_multi = int(multi.sum())
    return {"multi_correct_frac": n_multi / max(1, rewards.shape[0]),
            "novelty_spread_frac": spread / n_multi if n_multi else 0.0,
            "adv_moved": _adv_moved(nov, rewards, features, cfg)}


def _adv_moved(nov: g2rl_kernels.NoveltyOutput, rewards: torch.Tensor,
               features: torch.Tensor, cfg: Any) -> float:
    """sum |A - A_grpo| / sum |A_grpo|; grpo and entropy advantages are GRPO's already (0)."""
    if cfg.method in ("grpo", "entropy"):
        return 0.0
    grpo = advantages_for("grpo", features, rewards, lam=0.0, clip=None,
                          mode=cfg.novelty_mode, eps=cfg.adv_eps, scale=cfg.scale_advantages,
                          span_floor=cfg.novelty_span_floor, std_floor=cfg.novelty_std_floor,
                          uniform_groups=cfg.uniform_groups).advantages
    base = float(grpo.abs().sum())
    return float((nov.advantages - grpo).abs().sum()) / base if base > 0 else 0.0


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM. ``exit_code`` is 128 + the signal number (130 for
    Ctrl-C, 143 for SIGTERM); ``saved`` tells whether a checkpoint of the last completed step
    was written on the way out."""

    def __init__(self, signum: int, *, saved: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.saved = saved


class StopRequested:
    """SIGINT / SIGTERM handler: the first Ctrl-C or SIGTERM asks the loop to stop after the
    current step (and save); a second Ctrl-C raises :class:`Interrupted` at once, a second
    SIGTERM is ignored (schedulers follow SIGTERM with SIGKILL, not with another SIGTERM;
    a repeated one must not abort the save). A ``KeyboardInterrupt`` raised inside the block
    after a request (e.g. by the SFT warm-start) leaves it as :class:`Interrupted`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if (self.signum is not None and isinstance(exc, KeyboardInterrupt)
                and not isinstance(exc, Interrupted)):
            raise Interrupted(self.signum) from exc

    def _handle(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.requested:
            if signum == signal.SIGINT:
                raise Interrupted(signal.SIGINT)
            print(f"\n{name} again: still finishing the current step (SIGKILL aborts)",
                  flush=True)
            return
        self.requested, self.signum = True, signum
        print(f"\n{name}: finishing the current step and saving a checkpoint "
              "(Ctrl-C again to abort)", flush=True)

    def __call__(self) -> bool:
        return self.requested

    @property
    def exit_code(self) -> int:
        """128 + the first signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)


class Trainer:
    """The RL part of a run: owns the policy, the optimizer, the reference and the rollout."""

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        examples: Sequence[Example],
        reward_fn: Callable[[str, str], float],
        rollout: Any,
        *,
        ref_model: torch.nn.Module | None = None,
        system_prompt: str | None = None,
        embedder: Any = None,
        answer_fn: Callable[[str], str | None] | None = None,
    ) -> None:
        if not examples:
            raise ValueError("no training examples")
        self.cfg = config
        self.model = model
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.reward_fn = reward_fn
        self.rollout = rollout
        self.ref_model = ref_model
        self.system_prompt = system_prompt
        if config.method == "embedding" and embedder is None:
            raise ValueError("--method embedding needs an embedder (g2rl.embedding.TextEmbedder)")
        self.embedder = embedder  # sentence embeddings: --method embedding, semantic geometry
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
        )
        self.step_count = 0  # completed RL steps
        self.data_position = 0  # prompts consumed
        # coverage, free from the rollouts: problems solved at least once, distinct solutions
        self.answer_fn = answer_fn
        self.solved: set[int] = set()
        self.found: set[tuple[int, str]] = set()
        self._prompt_cache: dict[int, list[int]] = {}
        kill = os.environ.get(KILL_ENV)
        self._kill_at = int(kill) if kill else None

    # ------------------------------------------------------------------ data
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"g2rl-data:{self.cfg.seed}:{epoch}").shuffle(order)
        return order

    def next_prompts(self) -> list[int]:
        """Indices of the next ``prompts_per_step`` examples (a function of the data position
        only, so a resumed run draws the same prompts)."""
        out = []
        n = len(self.examples)
        for k in range(self.data_position, self.data_position + self.cfg.prompts_per_step):
            epoch, offset = divmod(k, n)
            if offset == 0 or not hasattr(self, "_order") or self._order_epoch != epoch:
                self._order, self._order_epoch = self._epoch_order(epoch), epoch
            out.append(self._order[offset])
        self.data_position += self.cfg.prompts_per_step
        return out

    def encode(self, idx: int) -> list[int]:
        if idx not in self._prompt_cache:
            self._prompt_cache[idx] = encode_prompt(self.tokenizer, self.examples[idx].prompt,
                                                    self.system_prompt)
        return self._prompt_cache[idx]

    # ------------------------------------------------------------------ the step
    def step(self) -> dict[str, Any]:
        """One RL step; returns its metrics. Raises :class:`NonFiniteLossError`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        step = self.step_count + 1
        idx = self.next_prompts()
        prompts = [self.encode(i) for i in idx]
        roll: RolloutBatch = self.rollout.generate(prompts, cfg.group_size,
                                                   seed=cfg.seed * 1_000_003 + step)
        sleeping = self.cfg.vllm_sleep and hasattr(self.rollout, "sleep")
        if sleeping:  # free the engine's GPU memory for the update
            self.rollout.sleep()
        t_roll = time.perf_counter()
        answers = [self.examples[i].answer for i in idx for _ in range(cfg.group_size)]
        from g2rl.rewards import score_batch  # math: worker processes, guards, time limits

        scores = score_batch(self.reward_fn, roll.texts, answers, timeout_s=cfg.reward_timeout,
                             workers=cfg.reward_workers or None)
        rewards = torch.tensor([_reward_value(r) for r in scores.rewards])  # NaN: unscored
        t_reward = time.perf_counter()

        batch = pack(roll.prompt_ids, roll.response_ids, self.pad_id, self.device)
        self.model.eval()
        old = sensitivity_pass(self.model, batch, cfg.temperature)
        # Train-inference mismatch: the engine's log-probs of the sampled tokens (vLLM) vs ours.
        rollout_logp = rollout_logprobs(roll, self.device)
        mismatch = logprob_mismatch(rollout_logp, old.logprobs)
        if cfg.tis_cap > 0 and rollout_logp is None:
            raise RuntimeError("--tis-cap needs the rollout engine's log-probs; this rollout "
                               f"({type(self.rollout).__name__}) gives none: use --rollout vllm")
        ref_logp = None
        if cfg.kl_coef > 0 and self.ref_model is not None:
            ref_logp = sensitivity_pass(self.ref_model, batch, cfg.temperature,
                                        features=False).logprobs
        b, g = len(idx), cfg.group_size
        features = old.seq_features.view(b, g, -1)
        semantic = None
        if self.embedder is not None and (cfg.method == "embedding"
                                          or step % cfg.semantic_every == 0):
            semantic = self.embedder.embed(list(roll.texts)).to(self.device).view(b, g, -1)
        novelty_from = "semantic" if cfg.method == "embedding" else "features"
        group_rewards = rewards.to(self.device).view(b, g)
        nov = advantages_for(cfg.method, semantic if novelty_from == "semantic" else features,
                             group_rewards, lam=cfg.novelty_lambda, clip=cfg.novelty_clip,
                             mode=cfg.novelty_mode, eps=cfg.adv_eps, scale=cfg.scale_advantages,
                             span_floor=cfg.novelty_span_floor, std_floor=cfg.novelty_std_floor,
                             uniform_groups=cfg.uniform_groups, shape=cfg.novelty_shape)
        geometry = geometry_metrics(nov, group_rewards, features, semantic, novelty_from)
        geometry.update(exploration_metrics(nov, group_rewards, features, cfg))
        geometry.update(self.coverage(idx, roll.texts, rewards))
        t_old = time.perf_counter()

        stats, grad_norms = self.update(batch, old.logprobs, ref_logp,
                                        nov.advantages.reshape(-1), step,
                                        rollout_logp=rollout_logp)
        if sleeping:
            self.rollout.wake_up()
        self.rollout.sync_weights(self.model)
        if self._kill_at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        self.step_count = step
        t_end = time.perf_counter()

        lengths = torch.tensor([len(r) for r in roll.response_ids], dtype=torch.float32)
        tokens = max(1, stats.tokens)
        return {
            "step": step,
            "reward_mean": float(rewards.nanmean()),  # unscorable (NaN) rewards left out
            "reward_std": _nanstd(rewards),
            "accuracy": float((rewards > 0).float().mean()),
            "shaped_reward_mean": float(nov.shaped_rewards.mean()),
            "novelty_mean": float(nov.novelty.mean()),
            **geometry,
            "distinct_per_group": distinct_per_group(roll.response_ids, g),
            "adv_abs_mean": float(nov.advantages.abs().mean()),
            "kl": stats.kl / tokens,
            "entropy": float(old.entropy.mean()) if old.entropy.numel() else 0.0,
            "clip_frac": stats.clipped / tokens,
            "ratio_mean": stats.ratio / tokens,
            "pg_loss": stats.pg_loss / tokens,
            "grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
            "response_len": float(lengths.mean()),
            "truncated_frac": sum(roll.truncated) / len(roll.truncated),
            "tokens": batch.num_tokens,
            **mismatch,
            **({"tis_weight_mean": stats.tis_weight / tokens,
                "tis_capped_frac": stats.tis_capped / tokens} if cfg.tis_cap > 0 else {}),
            "time_rollout": t_roll - t0,
            "reward_unverified": scores.unverified,  # guarded, timed-out or failed answers
            "time_reward": t_reward - t_roll,
            "time_old_pass": t_old - t_reward,
            "time_update": t_end - t_old,
            "time": t_end - t0,
        }

    def update(self, batch: PackedBatch, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               seq_adv: torch.Tensor, step: int, *, rollout_logp: torch.Tensor | None = None,
               ) -> tuple[LossStats, list[float]]:
        """Clipped-surrogate update over ``ppo_epochs`` x ``mini_batches`` optimizer steps.

        Args:
            old_logp: (M,) per-token old log-probs (row-major over ``batch.mask``).
            ref_logp: (M,) reference log-probs or None.
            seq_adv: (N,) one advantage per sequence.
            rollout_logp: (M,) the rollout engine's log-probs of the same tokens; with
                ``--tis-cap`` they weight the policy loss (truncated importance sampling).
        """
        cfg = self.cfg
        n, width = batch.mask.shape
        # Per-token tensors laid out (N, L) so that any row subset can be taken.
        old_pad = torch.zeros((n, width), device=self.device)
        old_pad[batch.mask] = old_logp.float()
        ref_pad = None
        if ref_logp is not None:
            ref_pad = torch.zeros((n, width), device=self.device)
            ref_pad[batch.mask] = ref_logp.float()
        roll_pad = None  # the rollout engine's log-probs, for the TIS correction
        if cfg.tis_cap > 0 and rollout_logp is not None:
            roll_pad = torch.zeros((n, width), device=self.device)
            roll_pad[batch.mask] = rollout_logp.float().to(self.device)
        adv_pad = seq_adv.float().to(self.device)[:, None].expand(n, width)
        weight, bias = lm_head(self.model)
        ent_coef = cfg.entropy_coef if cfg.method == "entropy" else 0.0
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        total = LossStats()
        grad_norms: list[float] = []
        self.model.train()
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for mb in torch.tensor_split(perm, cfg.mini_batches):
                mb_tokens = int(batch.mask[mb].sum())
                if mb_tokens == 0:
                    continue
                for micro in torch.split(mb, cfg.micro_batch_size):
                    sub = batch.rows(micro.to(self.device))
                    if not bool(sub.mask.any()):
                        continue
                    w = sub.mask.shape[1]
                    hidden = response_hidden(self.model, sub)
                    logp, ent = token_logprobs(hidden, weight, sub.targets[sub.mask],
                                               temperature=cfg.temperature, bias=bias,
                                               with_entropy=ent_coef > 0)
                    rows = micro.to(self.device)
                    loss, st = policy_loss(
                        logp, old_pad[rows, :w][sub.mask], adv_pad[rows, :w][sub.mask],
                        num_tokens=mb_tokens, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                        ref_logp=None if ref_pad is None else ref_pad[rows, :w][sub.mask],
                        kl_coef=cfg.kl_coef if ref_pad is not None else 0.0,
                        entropy=ent, entropy_coef=ent_coef,
                        rollout_logp=None if roll_pad is None else roll_pad[rows, :w][sub.mask],
                        tis_cap=cfg.tis_cap if roll_pad is not None else 0.0,
                    )
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"RL step {step}: the loss is {loss.item()}")
                    loss.backward()
                    total.add(st)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
                if not torch.isfinite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(f"RL step {step}: the gradient norm is {float(norm)}")
                grad_norms.append(float(norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norms

    # ------------------------------------------------------------------ state
    def coverage(self, idx: Sequence[int], texts: Sequence[str],
                 rewards: torch.Tensor) -> dict[str, float]:
        """Cumulative coverage after this step's rollouts: ``coverage_solved`` (training
        problems solved at least once, over the training set), ``coverage_solutions`` (distinct
        correct solutions found, by the task's canonical form; with no ``answer_fn`` by text)."""
        g = self.cfg.group_size
        for k, text in enumerate(texts):
            if float(rewards[k]) > 0:
                i = idx[k // g]
                self.solved.add(i)
                canon = self.answer_fn(text) if self.answer_fn is not None else text.strip()
                self.found.add((i, canon if canon is not None else text.strip()))
        return {"coverage_solved": len(self.solved) / len(self.examples),
                "coverage_solutions": float(len(self.found))}

    def state(self) -> dict[str, Any]:
        return {"step": self.step_count, "data_position": self.data_position,
                "solved": sorted(self.solved), "found": sorted(self.found)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.data_position = int(state["data_position"])
        self.solved = {int(i) for i in state.get("solved", [])}
        self.found = {(int(i), str(s)) for i, s in state.get("found", [])}
