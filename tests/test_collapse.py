"""The collapse warning (issue 14) on synthetic metric streams; the run-level tests are in
tests/test_study.py and tests/test_sparse_regression.py."""

from g2rl.collapse import CollapseMonitor


def stream(n, acc, cos, distinct, start=1):
    return [{"step": start + i, "accuracy": acc(i), "feature_cos_mean": cos(i),
             "distinct_per_group": distinct(i)} for i in range(n)]


def feed(monitor, rows):
    return [(r["step"], msg) for r in rows if (msg := monitor.update(r))]


def test_fires_once_when_responses_stop_differing_and_accuracy_does_not_rise():
    m = CollapseMonitor(window=10)
    healthy = stream(30, lambda i: 0.1, lambda i: 0.05, lambda i: 7.5)
    collapsing = stream(40, lambda i: 0.08, lambda i: 0.9, lambda i: 1.2, start=31)
    assert feed(m, healthy) == []
    fired = feed(m, collapsing)
    assert len(fired) == 1  # once
    step, msg = fired[0]
    assert 31 <= step <= 40 and m.fired_at == step and m.collapsed
    assert f"step {step}" in msg and "feature cosine" in msg and "distinct" in msg


def test_silent_on_healthy_runs_and_on_converged_correct_policies():
    # healthy: diverse responses
    m = CollapseMonitor(window=10)
    assert feed(m, stream(100, lambda i: 0.3 + 0.004 * i, lambda i: 0.15, lambda i: 6.0)) == []
    # converged on correct answers: responses agree, but accuracy rose far above the start
    m = CollapseMonitor(window=10)
    rows = stream(100, lambda i: min(0.95, 0.2 + 0.02 * i), lambda i: 0.2 + 0.007 * i,
                  lambda i: max(1.0, 7 - 0.1 * i))
    assert feed(m, rows) == []


def test_distinct_rule_alone_fires():
    m = CollapseMonitor(window=5, cosine=0.99)
    rows = stream(20, lambda i: 0.0, lambda i: 0.3, lambda i: 1.0)
    assert len(feed(m, rows)) == 1


def test_needs_a_full_window():
    m = CollapseMonitor(window=20)
    assert feed(m, stream(19, lambda i: 0.0, lambda i: 0.99, lambda i: 1.0)) == []
