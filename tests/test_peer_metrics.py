"""RouteLLM's APGR / CPT and RouterArena's score on hand-computed examples and against the peers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fusion_lightning.query.metrics import RoutingArrays
from fusion_lightning.query.peer_metrics import (
    apgr,
    arena_metrics,
    arena_score,
    cpt,
    strong_weak_metrics,
    strong_weak_pair,
    threshold_curve,
)


def arrays(perf: np.ndarray, cost: np.ndarray, mask: np.ndarray | None = None) -> RoutingArrays:
    mask = np.ones(perf.shape, bool) if mask is None else mask
    return RoutingArrays(perf, cost, perf, cost, mask, np.zeros(len(perf), np.int64))


# five queries, scores 0.9 .. 0.1; strong right on 1,2,3,5 (0.8), weak on 2,5 (0.4); 4 bins -> 5 thresholds
SCORES = np.array([0.9, 0.7, 0.5, 0.3, 0.1])
STRONG = np.array([1.0, 1, 1, 0, 1])
WEAK = np.array([0.0, 1, 0, 0, 1])


def test_threshold_curve_by_hand() -> None:
    # thresholds are the quantiles 0, .25, .5, .75, 1 = the scores themselves; ≥ each, > the last
    curve = threshold_curve(SCORES, STRONG, WEAK, num_results=4)
    np.testing.assert_allclose(curve, [[1.0, 0.8], [0.8, 0.8], [0.6, 0.8], [0.4, 0.6], [0.0, 0.4]])


def test_apgr_and_cpt_by_hand() -> None:
    curve = threshold_curve(SCORES, STRONG, WEAK, num_results=4)
    # sorted by share: x 0 .4 .6 .8 1, y .4 .6 .8 .8 .8; AUC = .2 + .14 + .16 + .16 = .66; weak AUC .4, strong .8
    assert apgr(curve, 0.8, 0.4) == pytest.approx((0.66 - 0.4) / (0.8 - 0.4))  # 0.65
    assert cpt(curve, 0.8, 0.4, 0.5) == pytest.approx(0.4)  # reaches .6 at 40 % strong calls
    assert cpt(curve, 0.8, 0.4, 0.8) == pytest.approx(0.52)  # .72 lies 60 % of the way from (.4, .6) to (.6, .8)


def routellm_reference(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray, num_results: int = 10):
    """RouteLLM's own procedure, restated with pandas as lm-sys/RouteLLM does it: the sweep of
    routellm/evals/benchmarks.py (GSM8K.evaluate: pd.qcut bin edges, ≥ / > for the last edge, accuracy in
    percent) and the metrics of routellm/evals/evaluate.py (generate_results: pct_call_metric, auc_metric,
    apgr_metric)."""
    _, thresholds = pd.qcut(pd.Series(scores), num_results, retbins=True)
    rows = []
    for i, t in enumerate(thresholds):
        sel = scores >= t if i != len(thresholds) - 1 else scores > t
        rows.append({"strong_percentage": sel.sum() / len(sel) * 100,
                     "accuracy": np.where(sel, strong, weak).sum() / len(sel) * 100})
    df = pd.DataFrame(rows).sort_values(by=["strong_percentage"])
    s_acc, w_acc = strong.mean() * 100, weak.mean() * 100
    pct = [np.interp(p * (s_acc - w_acc) + w_acc, df["accuracy"], df["strong_percentage"]) for p in (0.5, 0.8)]
    x = df["strong_percentage"] / 100
    auc = np.trapezoid(df["accuracy"], x)
    weak_auc, strong_auc = np.trapezoid(np.full(len(x), w_acc), x), np.trapezoid(np.full(len(x), s_acc), x)
    return (auc - weak_auc) / (strong_auc - weak_auc), pct[0] / 100, pct[1] / 100


def test_two_model_log_is_exactly_routellm() -> None:
    rng = np.random.default_rng(0)
    n = 400
    hard = rng.random(n)
    strong = (rng.random(n) > 0.3 * hard).astype(float)
    weak = (rng.random(n) > 0.9 * hard).astype(float)
    perf_hat = np.stack([0.5 + 0.1 * rng.standard_normal(n), 0.5 - 0.4 * hard + 0.1 * rng.standard_normal(n)], 1)
    perf = np.stack([strong, weak], 1)
    cost = np.tile([1e-3, 1e-4], (n, 1))  # column 0 dearer: strong is best single, weak the cheap other one
    out = strong_weak_metrics(perf_hat, arrays(perf, cost), arrays(perf, cost))
    ref_apgr, ref_cpt50, ref_cpt80 = routellm_reference(perf_hat[:, 0] - perf_hat[:, 1], strong, weak)
    assert out["apgr"] == pytest.approx(ref_apgr, abs=1e-12)
    assert out["cpt@50"] == pytest.approx(ref_cpt50, abs=1e-12)
    assert out["cpt@80"] == pytest.approx(ref_cpt80, abs=1e-12)
    assert out["strong_weak/strong_perf"] == pytest.approx(strong.mean())
    assert 0.5 < out["apgr"] < 1.0 and out["cpt@50"] < 0.5  # the score carries signal: better than random


def test_random_scores_recover_half_the_gap() -> None:
    rng = np.random.default_rng(1)
    n = 20000
    strong, weak = (rng.random(n) < 0.8).astype(float), (rng.random(n) < 0.4).astype(float)
    curve = threshold_curve(rng.random(n), strong, weak)
    assert apgr(curve, strong.mean(), weak.mean()) == pytest.approx(0.5, abs=0.03)
    assert cpt(curve, strong.mean(), weak.mean(), 0.5) == pytest.approx(0.5, abs=0.03)


def test_pair_is_best_single_and_cheapest_other() -> None:
    perf = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # means .67 .67 .33 -> column 0 first
    cost = np.tile([3.0, 1.0, 2.0], (3, 1))
    assert strong_weak_pair(arrays(perf, cost)) == (0, 1)
    assert strong_weak_pair(arrays(perf, np.zeros_like(cost))) == (0, 2)  # no costs: the worst other model
    assert strong_weak_pair(arrays(perf[:, :1], cost[:, :1])) is None


def test_no_gap_leaves_apgr_out() -> None:
    perf = np.ones((4, 2))
    out = strong_weak_metrics(np.zeros((4, 2)), arrays(perf, np.tile([2.0, 1.0], (4, 1))),
                              arrays(perf, np.tile([2.0, 1.0], (4, 1))))
    assert "apgr" not in out and out["strong_weak/strong_perf"] == out["strong_weak/weak_perf"] == 1.0


def routerarena_reference(cost: float, accuracy: float, beta=0.1, c_max=200, c_min=0.0044) -> float:
    """RouteWorks/RouterArena llm_evaluation/run.py compute_arena_score, restated: clamp, log2-normalise, S."""
    cost = max(c_min, min(cost, c_max))
    c = (math.log2(c_max) - math.log2(cost)) / (math.log2(c_max) - math.log2(c_min))
    return ((1 + beta) * accuracy * c) / (beta * accuracy + c)


def test_arena_score_by_hand_and_against_routerarena() -> None:
    # A = .8 at 1 USD per 1,000 queries: C = log2(200) / (log2(200) − log2(.0044)) = 7.6439 / 15.4721 = .49404
    # S = 1.1 · .8 · .49404 / (.08 + .49404) = .43476 / .57404 = .75737
    assert arena_score(0.8, 1.0) == pytest.approx(0.75737, abs=1e-5)
    for a, c in ((0.8, 1.0), (0.55, 0.03), (0.9, 150.0), (0.3, 0.0044)):
        assert arena_score(a, c) == pytest.approx(routerarena_reference(c, a), rel=1e-12)
    assert arena_score(0.7, 500.0) == 0.0  # dearer than c_max: C = 0
    assert arena_score(0.7, 0.0) == pytest.approx(1.1 * 0.7 / (0.07 + 1))  # clamped to c_min: C = 1
    with pytest.raises(ValueError, match="accuracy in"):
        arena_score(1.5, 1.0)


def test_arena_metrics_from_routing_metrics() -> None:
    a = arrays(np.ones((2, 2)), np.tile([0.002, 0.001], (2, 1)))
    m = {"perf": 0.8, "cost": 0.001, "best_single/perf": 0.9, "best_single/cost": 0.002}
    out = arena_metrics(m, a, a)
    assert out["arena_score"] == pytest.approx(0.75737, abs=1e-5)  # 0.001 USD per query = 1 USD per 1,000
    assert out["best_single/arena_score"] == pytest.approx(routerarena_reference(2.0, 0.9))
    assert arena_metrics(m, arrays(np.ones((2, 2)), np.zeros((2, 2))), arrays(np.ones((2, 2)), np.zeros((2, 2)))) == {}
