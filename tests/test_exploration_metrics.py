"""Issue 18's numbers on hand-made inputs: the per-step exploration metrics
(``exploration_metrics``), the cumulative coverage of the trainer and its state round trip, the
solution-diversity evaluation (``solution_stats``, ``evaluate(class_fn=, rare_fn=)``), the
entropy divergence warning (``EntropyMonitor``) and Countdown's teacher-forced feature pairs
(``feature_probe.countdown_pairs``) on the untrained tiny model. The run-level checks are in
tests/test_countdown_train.py."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from _tiny_lm import make_tokenizer

from g2rl.collapse import EntropyMonitor
from g2rl.config import TrainConfig
from g2rl.data import Example
from g2rl.eval import evaluate, solution_stats
from g2rl.rollout import RolloutBatch
from g2rl.trainer import Trainer, advantages_for, exploration_metrics
from g2rl_kernels import NoveltyOutput

NAN = float("nan")
H21 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))  # entropy of (2/3, 1/3)


def nov_of(novelty, advantages):
    novelty = torch.tensor(novelty)
    b, g = novelty.shape
    return NoveltyOutput(torch.zeros(b, g, g), novelty, torch.zeros(b, g),
                         torch.tensor(advantages))


def grpo_of(features, rewards, cfg, method="grpo", lam=0.0):
    return advantages_for(method, features, rewards, lam=lam, clip=cfg.novelty_clip,
                          mode=cfg.novelty_mode, eps=cfg.adv_eps, scale=cfg.scale_advantages,
                          span_floor=cfg.novelty_span_floor, std_floor=cfg.novelty_std_floor,
                          uniform_groups=cfg.uniform_groups)


# ------------------------------------------------------------------- exploration_metrics
REWARDS = torch.tensor([
    [1.0, 1.0, -1.0, -1.0],  # two correct, novelty 0.50 / 0.55: not separated
    [1.0, -1.0, -1.0, -1.0],  # one correct: not a multi-correct group
    [1.0, 1.0, 1.0, -1.0],  # three correct, novelty 0.2 .. 0.9: separated
    [-1.0, -1.0, -1.0, -1.0],  # none
])
NOVELTY = [
    [0.50, 0.55, 0.95, 0.05],  # the wrong answers' spread (0.9) must not count
    [0.10, 0.90, 0.00, 0.50],
    [0.20, 0.90, 0.50, 0.00],
    [0.00, 1.00, 0.30, 0.70],
]
# rewards - group mean (--no-scale-advantages): sum of |.| = 4 + 3 + 3 + 0 = 10
GRPO_UNSCALED = [[1.0, 1.0, -1.0, -1.0], [1.5, -0.5, -0.5, -0.5], [0.5, 0.5, 0.5, -1.5],
                 [0.0, 0.0, 0.0, 0.0]]


def test_exploration_metrics_by_hand():
    cfg = TrainConfig(scale_advantages=False)
    feats = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(grpo_of(feats, REWARDS, cfg).advantages, torch.tensor(GRPO_UNSCALED))
    m = exploration_metrics(nov_of(NOVELTY, GRPO_UNSCALED), REWARDS, feats, cfg)
    assert m["multi_correct_frac"] == 2 / 4  # groups 0 and 2
    assert m["novelty_spread_frac"] == 1 / 2  # of those, group 2
    assert m["adv_moved"] == 0.0  # GRPO's own advantages
    # move 0.5 + 0.5 in group 0 and 0.25 + 0.25 in the all-wrong group: 1.5 of 10
    moved = [[1.5, 1.0, -1.0, -1.5], *GRPO_UNSCALED[1:3], [0.25, -0.25, 0.0, 0.0]]
    m = exploration_metrics(nov_of(NOVELTY, moved), REWARDS, feats, cfg)
    assert m["adv_moved"] == pytest.approx(0.15, rel=1e-6)
    assert m["multi_correct_frac"] == 0.5 and m["novelty_spread_frac"] == 0.5
    # the threshold is on the correct answers' novelty only, and strict (> 0.1)
    spread = [row[:] for row in NOVELTY]
    spread[0][:2] = [0.25, 0.5]
    m = exploration_metrics(nov_of(spread, GRPO_UNSCALED), REWARDS, feats, cfg)
    assert m["novelty_spread_frac"] == 1.0


def test_exploration_metrics_scaled_and_without_multi_correct_groups():
    cfg = TrainConfig()
    feats = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    a = 1.5 / (1.0 + cfg.adv_eps)  # std (n - 1) of [1.5, -.5, -.5, -.5] is 1
    grpo = grpo_of(feats, rewards, cfg).advantages
    assert grpo[0].tolist() == pytest.approx([a, -a / 3, -a / 3, -a / 3], rel=1e-6)
    adv = grpo.clone()
    adv[0, 0] += a  # one entry moved by a; the base is a + 3 a / 3 = 2 a
    m = exploration_metrics(nov_of([[0.0, 1.0, 0.5, 0.2]] * 2, adv.tolist()), rewards, feats,
                            cfg)
    assert m == pytest.approx({"multi_correct_frac": 0.0, "novelty_spread_frac": 0.0,
                               "adv_moved": 0.5}, rel=1e-6)
    # every group uniform: nothing to standardise, nothing moved (no division by zero)
    flat = -torch.ones(2, 4)
    m = exploration_metrics(nov_of([[0.0, 1.0, 0.5, 0.2]] * 2, [[0.3] * 4] * 2), flat, feats,
                            cfg)
    assert m == {"multi_correct_frac": 0.0, "novelty_spread_frac": 0.0, "adv_moved": 0.0}


@pytest.mark.parametrize("method", ["grpo", "entropy", "g2rl"])
def test_adv_moved_is_zero_without_shaping(method):
    cfg = TrainConfig()
    feats = torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(2))
    rewards = REWARDS.clone()
    rewards[1, 1] = NAN  # an answer that could not be scored
    # grpo and entropy ignore lambda; g2rl with lambda 0 shapes nothing
    nov = grpo_of(feats, rewards, cfg, method=method, lam=0.5 if method != "g2rl" else 0.0)
    m = exploration_metrics(nov, rewards, feats, cfg)
    assert m["adv_moved"] == pytest.approx(0.0, abs=1e-7)
    assert m["multi_correct_frac"] == 0.5  # NaN is not correct: group 1 still has one


def test_adv_moved_of_g2rl_against_an_independent_standardisation():
    cfg = TrainConfig()
    feats = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(3))
    rewards = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, 1.0, 1.0, -1.0],
                            [1.0, -1.0, 1.0, -1.0]])
    nov = grpo_of(feats, rewards, cfg, method="g2rl", lam=cfg.novelty_lambda)
    grpo = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True)
                                                        + cfg.adv_eps)
    want = float((nov.advantages - grpo).abs().sum() / grpo.abs().sum())
    m = exploration_metrics(nov, rewards, feats, cfg)
    assert want > 0.01 and m["adv_moved"] == pytest.approx(want, rel=1e-5)
    nu = nov.novelty
    spread = [float(nu[b][rewards[b] > 0].max() - nu[b][rewards[b] > 0].min()) > 0.1
              for b in range(3)]
    assert m["multi_correct_frac"] == 1.0 and m["novelty_spread_frac"] == sum(spread) / 3


# ------------------------------------------------------------------- coverage
def make_trainer(answer_fn, n_examples=10, group_size=2):
    cfg = TrainConfig(group_size=group_size)
    examples = [Example(f"p{i}", str(i)) for i in range(n_examples)]
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    return Trainer(cfg, torch.nn.Linear(2, 2), tok, examples, lambda t, a: 1.0, None,
                   answer_fn=answer_fn)


def test_coverage_accumulates_and_round_trips_through_the_state():
    def canon(text):
        return None if "?" in text else text.strip().upper()

    t = make_trainer(canon)
    # problems 3 and 7, two samples each
    got = t.coverage([3, 7], ["ab", "zz", "c", " d? "], torch.tensor([1.0, -1.0, 1.0, 1.0]))
    assert got == {"coverage_solved": 2 / 10, "coverage_solutions": 3.0}
    assert t.solved == {3, 7} and t.found == {(3, "AB"), (7, "C"), (7, "d?")}
    # the same solution again (another text, same canonical form), a NaN reward, a new one
    got = t.coverage([3, 1], [" AB", "x", "y", "e"], torch.tensor([1.0, NAN, NAN, 1.0]))
    assert got == {"coverage_solved": 3 / 10, "coverage_solutions": 4.0}
    state = json.loads(json.dumps(t.state()))  # as trainer_state.json holds it
    assert state["solved"] == [1, 3, 7]
    assert state["found"] == [[1, "E"], [3, "AB"], [7, "C"], [7, "d?"]]
    fresh = make_trainer(canon)
    fresh.load_state({**state, "step": 4, "data_position": 8})
    assert (fresh.solved, fresh.found) == (t.solved, t.found)
    assert (fresh.step_count, fresh.data_position) == (4, 8)
    # a resumed trainer continues from the loaded sets
    assert fresh.coverage([9, 7], ["f", "g", "c", "h"], torch.tensor([1.0, -1.0, 1.0, -1.0])) \
        == {"coverage_solved": 4 / 10, "coverage_solutions": 5.0}
    # a checkpoint written before coverage existed loads with empty sets
    old = make_trainer(canon)
    old.load_state({"step": 2, "data_position": 4})
    assert old.solved == set() and old.found == set() and old.step_count == 2


def test_coverage_without_answer_fn_counts_stripped_texts():
    t = make_trainer(None, n_examples=4, group_size=3)
    got = t.coverage([0, 2], ["x", "x ", "y", "-", "-", "-"],
                     torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0]))
    assert got == {"coverage_solved": 0.25, "coverage_solutions": 2.0}


# ------------------------------------------------------------------- solution_stats
CORRECT = [[True, True, True, True], [True, True, True, False], [False] * 4,
           [True, False, False, False]]
ANSWERS = [["x", "x", "y", "y"], ["a/b", "a/b", "c", "z"], [None, None, "q", "q"],
           [None, "w", "w", "w"]]


def test_solution_stats_by_hand():
    got = solution_stats(CORRECT, ANSWERS, 4, (1, 2), rare_fn=lambda s: "/" in s)
    assert got == pytest.approx({
        "distinct_correct_mean": (2 + 2 + 0 + 1) / 4,
        "multi_solution_share": 2 / 4,
        "solution_entropy_mean": (math.log(2) + H21 + 0 + 0) / 4,
        # correct samples 4 + 3 + 0 + 1 (the unreadable one counts, but never as rare)
        "rare_share": 2 / 8,
    }, rel=1e-12)
    assert "rare_share" not in solution_stats(CORRECT, ANSWERS, 4, (1, 2))
    # two equally frequent solutions: ln 2
    one = solution_stats([[True] * 4], [["x", "y", "y", "x"]], 4, ())
    assert one["solution_entropy_mean"] == pytest.approx(math.log(2), rel=1e-12)
    assert one["distinct_correct_mean"] == 2 and one["multi_solution_share"] == 1
    # with the pass rates: pass@2 = 1, 1, 0, 1 - C(3,2)/C(4,2)
    got = solution_stats(CORRECT, ANSWERS, 4, (2, 4), with_pass=True)
    assert got["pass@1"] == pytest.approx(8 / 16)
    assert got["pass@2"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert got["pass@4"] == pytest.approx(3 / 4)
    none = solution_stats([[False, False]], [["a", "b"]], 2, (), rare_fn=lambda s: True)
    assert none == {"distinct_correct_mean": 0.0, "multi_solution_share": 0.0,
                    "solution_entropy_mean": 0.0, "rare_share": 0.0}


class ScriptedRollout:
    """Fixed completions per prompt text (as in tests/test_eval.py)."""

    def __init__(self, tok, script):
        self.tok, self.script = tok, script

    def generate(self, prompts, n, *, seed=None):
        texts = [t for p in prompts for t in self.script[self.tok.decode(p)][:n]]
        ids = [self.tok.encode(t) for t in texts]
        return RolloutBatch([p for p in prompts for _ in range(n)], ids, [False] * len(ids),
                            texts, n=n)


def test_evaluate_by_class_and_rare_share_by_hand():
    tok = make_tokenizer(chat_template=False)
    script = {"a": ["1/2", "1/2", "3", "x"],  # gold g1 (class A): 1/2 twice, 3 once
              "b": ["5", "5", "5", "5"],  # gold g2 (class B): one solution
              "c": ["x", "7", "8", "9"]}  # gold g3 (class A): 7 and 8
    ok = {"g1": {"1/2", "3"}, "g2": {"5"}, "g3": {"7", "8"}}
    examples = [Example("a", "g1"), Example("b", "g2"), Example("c", "g3")]
    res = evaluate(None, tok, examples, reward_fn=lambda t, g: 1.0 if t in ok[g] else -1.0,
                   answer_fn=lambda t: None if t == "x" else t, n=4, ks=(1, 2),
                   rollout=ScriptedRollout(tok, script), batch_size=8, progress=False,
                   class_fn={"g1": "A", "g2": "B", "g3": "A"}.get,
                   rare_fn=lambda s: "/" in s)
    assert res["pass@1"] == pytest.approx(9 / 12)
    assert res["distinct_correct_mean"] == pytest.approx(5 / 3)
    assert res["multi_solution_share"] == pytest.approx(2 / 3)
    assert res["solution_entropy_mean"] == pytest.approx((H21 + 0 + math.log(2)) / 3)
    assert res["rare_share"] == pytest.approx(2 / 9)
    assert list(res["by_class"]) == ["A", "B"]
    assert res["by_class"]["A"] == pytest.approx({
        "n_prompts": 2, "pass@1": 5 / 8, "pass@2": (1 + 5 / 6) / 2,
        "distinct_correct_mean": 2.0, "multi_solution_share": 1.0,
        "solution_entropy_mean": (H21 + math.log(2)) / 2, "rare_share": 2 / 5})
    assert res["by_class"]["B"] == pytest.approx({
        "n_prompts": 1, "pass@1": 1.0, "pass@2": 1.0, "distinct_correct_mean": 1.0,
        "multi_solution_share": 0.0, "solution_entropy_mean": 0.0, "rare_share": 0.0})
    plain = evaluate(None, tok, examples, reward_fn=lambda t, g: 1.0 if t in ok[g] else -1.0,
                     answer_fn=lambda t: t, n=4, ks=(1,), rollout=ScriptedRollout(tok, script),
                     progress=False)
    assert "by_class" not in plain and "rare_share" not in plain


# ------------------------------------------------------------------- EntropyMonitor
V = 100
TOP = math.log(V)  # 4.605


def rows(entropies, start=1):
    return [{"step": start + i, "entropy": e} for i, e in enumerate(entropies)]


def feed(monitor, stream):
    return [(r["step"], msg) for r in stream if (msg := monitor.update(r))]


def test_entropy_monitor_fires_once_when_the_window_is_full():
    m = EntropyMonitor(vocab_size=V, window=3, fraction=0.8)
    fired = feed(m, rows([4.5] * 10))  # far above 0.8 ln V from the first step
    assert len(fired) == 1
    step, msg = fired[0]
    assert step == 3 and m.fired_at == 3 and m.diverged  # not before 3 steps are in
    for part in ("at step 3", "4.500 nats", "last 3 steps", "98% of ln V = 4.605", "V = 100"):
        assert part in msg, part


def test_entropy_monitor_uses_the_window_mean():
    m = EntropyMonitor(vocab_size=V, window=2, fraction=0.8)  # threshold 3.684
    # means over two steps: 2.5, 4.0 -> fires at step 4
    assert [s for s, _ in feed(m, rows([1.0, 1.0, 4.0, 4.0, 0.0, 4.6, 4.6]))] == [4]
    m = EntropyMonitor(vocab_size=V, window=2, fraction=0.8)
    assert feed(m, rows([1.0, 4.6, 1.0, 4.6, 1.0])) == []  # never a mean above 2.8
    assert not m.diverged and m.fired_at is None
    # strictly above the threshold
    m = EntropyMonitor(vocab_size=V, window=1, fraction=0.5)
    assert feed(m, rows([0.5 * TOP])) == []
    assert [s for s, _ in feed(m, rows([0.5 * TOP + 1e-6], start=2))] == [2]


def test_entropy_monitor_off():
    m = EntropyMonitor(vocab_size=V, window=1, fraction=0.0)
    assert feed(m, rows([TOP] * 5)) == [] and not m.diverged
    m = EntropyMonitor(vocab_size=1, window=1, fraction=0.5)  # ln 1 = 0: no scale
    assert feed(m, rows([1.0] * 3)) == []


def test_entropy_monitor_resumed_feed_warns_once():
    stream = rows([1.0, 1.0, 4.5, 4.5, 4.5, 4.5])
    whole = EntropyMonitor(vocab_size=V, window=2, fraction=0.8)
    assert [s for s, _ in feed(whole, stream)] == [4]
    # resumed after step 5: the prior rows replayed (as g2rl.train does), then step 6
    resumed = EntropyMonitor(vocab_size=V, window=2, fraction=0.8)
    for r in stream[:5]:
        resumed.update(r)
    assert resumed.update(stream[5]) is None and resumed.fired_at == 4
    # resumed after step 3 (before the warning): it fires at the same step as `whole`
    early = EntropyMonitor(vocab_size=V, window=2, fraction=0.8)
    for r in stream[:3]:
        early.update(r)
    assert [s for s, _ in feed(early, stream[3:])] == [4]


# ------------------------------------------------------------------- countdown_pairs
def test_countdown_pairs_on_the_untrained_tiny_model(tmp_path_factory):
    from g2rl.feature_probe import _second_ordering, countdown_pairs
    from g2rl.tasks import countdown as cd
    from g2rl.tiny_model import tiny_model_path

    path = tiny_model_path(tmp_path_factory.getbasetemp() / "g2rl-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = countdown_pairs(str(path), problems=8)
    finally:
        torch.set_num_threads(threads)
    assert out["task"] == "countdown" and out["problems"] == 8
    for kind in ("same_solution", "diff_solution", "division"):
        assert out[f"cos_{kind}_pairs"] > 0, kind
        assert math.isfinite(out[f"cos_{kind}"]) and -1 <= out[f"cos_{kind}"] <= 1, kind
    # the "same solution" pair: another text that reads back as the same solution
    for ex in cd.make_examples("test", 8, 0):
        for e in cd.solution_exprs(ex.answer):
            other = _second_ordering(e)
            if other is not None:
                assert other != cd.render_steps(e)
                assert cd.extract_answer(other) == cd.extract_answer(cd.render_steps(e))
                assert cd.reward(other, ex.answer) == 1.0
