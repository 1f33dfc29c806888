"""Cost–quality evaluation: λ sweep, non-decreasing hull, AIQ, cost to match best single, per-task
table, the judge setting, and the RoutingReport callback's files and metrics in a real run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from planted import planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.fit import fit
from fusion_lightning.query.metrics import (
    LAMBDAS,
    RoutingArrays,
    aiq,
    choose,
    cost_to_match,
    nondecreasing_hull,
    per_task_rows,
    routing_metrics,
    sweep_choices,
    sweep_points,
)

nan = np.nan
# a concave frontier (0, .2) (1, .6) (2, .8) (4, .9), a point under it and a dearer, worse point
CURVE = np.array([[1.0, 0.6], [0.0, 0.2], [1.5, 0.3], [2.0, 0.8], [4.0, 0.9], [5.0, 0.5]])


def test_hull_of_a_concave_frontier_drops_points_below_it_and_after_its_peak():
    np.testing.assert_allclose(nondecreasing_hull(CURVE), [[0, .2], [1, .6], [2, .8], [4, .9]])


def test_hull_of_a_staircase_bridges_the_steps_and_stops_at_the_first_peak():
    stairs = np.array([[1, .5], [2, .5], [3, .8], [4, .8]])
    np.testing.assert_allclose(nondecreasing_hull(stairs), [[1, .5], [3, .8]])
    # area over [1, 4]: the bridge (0.5 + 0.8) / 2 · 2, then flat at 0.8 for 1
    assert aiq(stairs, 1, 4) == pytest.approx((1.3 + 0.8) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_hull_is_non_decreasing_and_lies_on_or_above_every_point(seed: int):
    pts = np.random.default_rng(seed).random((40, 2))
    h = nondecreasing_hull(pts)
    assert (np.diff(h[:, 0]) > 0).all() and (np.diff(h[:, 1]) >= 0).all()
    assert h[-1, 1] == pts[:, 1].max() and h[0, 0] == pts[:, 0].min()
    assert (np.interp(pts[:, 0], h[:, 0], h[:, 1]) >= pts[:, 1] - 1e-12).all()  # flat past the peak


@pytest.mark.parametrize("lo, hi, expected", [
    (0.0, 4.0, (0.4 + 0.7 + 1.7) / 4),        # exactly the hull's span
    (1.0, 6.0, (0.7 + 1.7 + 2 * 0.9) / 5),    # flat at 0.9 past the last vertex (4, 0.9)
    (-1.0, 4.0, (0.4 + 0.7 + 1.7) / 5),       # below the router's cheapest point counts 0
    (0.5, 3.0, (0.25 + 0.7 + 0.825) / 2.5),   # clipped inside segments: h(0.5) = 0.4, h(3) = 0.85
    (2.0, 2.0, 0.8),                          # zero-width range: the hull's value there
    (-2.0, -1.0, 0.0),                        # a range the router never reaches
])
def test_aiq_by_hand(lo: float, hi: float, expected: float):
    assert aiq(CURVE, lo, hi) == pytest.approx(expected)


def test_cost_to_match_best_single_by_hand():
    pts = np.array([[4.0, 0.9], [1.0, 0.5], [2.0, 0.7], [3.0, 0.7]])
    assert cost_to_match(pts, perf=0.7, cost=4.0) == pytest.approx(0.5)  # cheapest point with perf ≥ 0.7
    assert cost_to_match(pts, perf=0.9, cost=2.0) == pytest.approx(2.0)  # reached, but dearer than best single
    assert cost_to_match(pts, perf=0.95, cost=4.0) is None  # never reached: no ratio, no inf
    assert cost_to_match(pts, perf=0.5, cost=0.0) is None  # a free best single has no cost fraction


def test_sweep_spans_performance_first_to_cheapest_predicted():
    perf_hat = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7], [0.3, 0.9, 0.6]])
    cost_hat = np.array([[1.0, 0.5, 0.0], [0.9, 0.2, 0.6], [0.1, 0.5, 0.9]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1]], bool)
    ch = sweep_choices(perf_hat, cost_hat, mask, LAMBDAS)
    assert ch.shape == (len(LAMBDAS), 3) and LAMBDAS[0] == 0 and len(LAMBDAS) == 30
    np.testing.assert_array_equal(ch[0], choose(perf_hat, mask))  # λ = 0: performance-first
    np.testing.assert_array_equal(ch[0], [0, 1, 2])
    np.testing.assert_array_equal(ch[-1], [2, 1, 0])  # λ large: the cheapest predicted available model
    perf = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, nan, 0.0]])
    cost = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, nan, 1.0]])
    ev = RoutingArrays(perf, cost, perf, cost / 3, mask, np.zeros(3, int))
    np.testing.assert_allclose(sweep_points(ch[[0, -1]], ev), [[(3 + 2 + 1) / 3, 2 / 3], [(1 + 2 + 3) / 3, 2 / 3]])


def test_per_task_table_by_hand():
    perf = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cost = np.array([[1.0, 4.0], [1.0, 4.0], [2.0, 6.0]])
    ev = RoutingArrays(perf, cost, perf, cost, np.ones((3, 2), bool), np.array([2, 1, 2]))
    choices = {"router": np.array([0, 1, 0]), "oracle": np.array([0, 1, 0]), "best_single": np.array([1, 1, 1])}
    rows = per_task_rows(choices, ev, ["<unk>", "geo", "math"])
    assert [r["task"] for r in rows] == ["geo", "math", "all"] and [r["queries"] for r in rows] == [1, 2, 3]
    geo, math, total = rows
    assert geo["router_perf"] == 1.0 and geo["router_cost"] == 4.0 and geo["best_single_perf"] == 1.0
    assert math["router_perf"] == 1.0 and math["router_cost"] == 1.5
    assert math["best_single_perf"] == 0.5 and math["best_single_cost"] == 5.0
    assert total["router_perf"] == 1.0 and total["router_cost"] == pytest.approx(7 / 3)
    assert total["best_single_perf"] == pytest.approx(2 / 3) and total["best_single_cost"] == pytest.approx(14 / 3)


def test_judge_setting_uses_judged_calls_only():
    ones = np.ones((3, 2))
    perf = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # train: model 1 is the better judged model (0.9 vs 0.3); eval query 3 has no judge score at all
    train = RoutingArrays(perf, ones, perf, 0 * ones, np.ones((3, 2), bool), np.zeros(3, int),
                          np.array([[0.3, 0.9], [0.3, 0.9], [nan, 0.9]]))
    ev = RoutingArrays(perf, ones, perf, 0 * ones, np.ones((3, 2), bool), np.zeros(3, int),
                       np.array([[0.8, 0.2], [nan, 0.6], [nan, nan]]))
    scores = {s: perf for s in REWARD_SETTINGS} | {"judge": np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])}
    out = routing_metrics(scores, train, ev, [1.0, 2.0])
    # judged eval: query 1 (both models), query 2 (model 1 only); the router picks 0 then 1 (the only one)
    assert out["judge/reward"] == pytest.approx((0.8 + 0.6) / 2)
    assert out["judge/best_single/reward"] == pytest.approx((0.2 + 0.6) / 2)
    assert out["judge/oracle/reward"] == pytest.approx((0.8 + 0.6) / 2)
    assert out["judge/random/reward"] == pytest.approx(((0.8 + 0.2) / 2 + 0.6) / 2)
    no_judge = RoutingArrays(perf, ones, perf, 0 * ones, np.ones((3, 2), bool), np.zeros(3, int))
    assert not any(k.startswith("judge/") for k in routing_metrics(scores, train, no_judge, [1.0, 2.0]))


# the callback in real runs --------------------------------------------------------------------
def test_router_run_writes_the_routing_report(tmp_path: Path):
    summary = fit(compose_recipe("router_mlp", planted_overrides(tmp_path, "trainer.max_epochs=20", "logger=csv")))
    run = tmp_path / "run"
    m = summary["metrics"]
    assert json.loads((run / "summary.json").read_text()) == summary
    for key in ("test/aiq", "test/single_models/aiq", "test/cost_to_match_best", "val/aiq", "test/perf",
                "test/best_single/perf", "test/task_best/perf", "test/oracle/perf", "test/gap_closed"):
        assert key in m, key
    assert 0.0 <= m["test/aiq"] <= 1.0 and m["test/reaches_best_single"] == 1.0
    # the planted router beats best single at λ = 0, so matching it costs at most that point's cost
    assert m["test/perf"] > m["test/best_single/perf"]
    assert 0.0 < m["test/cost_to_match_best"] <= m["test/cost"] / m["test/best_single/cost"] * (1 + 1e-5)  # float32 logs
    assert m["test/aiq"] > m["test/single_models/aiq"]  # reading the query beats mixing fixed models
    art = summary["artifacts"]
    assert (art["routing_table_md"], art["routing_table_csv"], art["pareto"]) == (
        "routing_table.md", "routing_table.csv", "pareto.png")
    png = (run / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    rows = list(csv.DictReader((run / "routing_table.csv").open()))
    assert [r["task"] for r in rows] == ["arithmetic", "geography", "poetry", "all"]
    assert sum(int(r["queries"]) for r in rows[:-1]) == int(rows[-1]["queries"]) == summary["data"]["test_queries"]
    assert float(rows[-1]["router_perf"]) == pytest.approx(m["test/perf"], abs=1e-6)
    assert float(rows[-1]["oracle_cost"]) == pytest.approx(m["test/oracle/cost"], rel=1e-5)
    md = (run / "routing_table.md").read_text()
    assert "| arithmetic | " in md and "AIQ" in md and "cost to match best single" in md
    assert 0.0 <= m["test/ece"] < 0.5 and "calibration error of the predicted success probabilities" in md
    assert "alpha 0." in md.split("calibration error")[1]  # per model
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "test/aiq" in logged and "val/aiq" in logged


def test_synthetic_run_reports_the_judge_setting(tmp_path: Path):
    cfg = compose_recipe("router_mlp", [
        "data.synthetic.n_queries=240", "data.synthetic.models=6", "trainer.max_epochs=2",
        "datamodule.encoder=hashing", f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
        "logger=none"])
    m = fit(cfg)["metrics"]
    for k in ("test/judge/reward", "test/judge/best_single/reward", "test/judge/oracle/reward", "test/aiq"):
        assert k in m, k
    assert m["test/judge/oracle/reward"] >= m["test/judge/best_single/reward"] - 1e-9
    assert all(np.isfinite(v) for v in m.values())


def test_tolerance_choices_take_the_cheapest_model_predicted_near_the_best() -> None:
    from fusion_lightning.query.metrics import decision_choices, tolerance_choices

    perf_hat = np.array([[0.80, 0.79, 0.50], [0.40, 0.90, 0.89]])
    cost_hat = np.array([[10.0, 1.0, 0.1], [0.1, 5.0, 5.0]])
    mask = np.array([[True, True, True], [True, True, True]])
    got = tolerance_choices(perf_hat, cost_hat, mask, np.array([0.0, 0.01, 0.3, 1.0]))
    # q1: models 1 and 2 cost the same, so within 0.01 the better prediction (1) wins; 0.4 is 0.5 below
    assert got.T.tolist() == [[0, 1, 2, 2], [1, 1, 1, 0]]  # per query, per τ
    unlogged = mask.copy()
    unlogged[0, 1] = False  # a model the query has no answer from is never chosen
    assert tolerance_choices(perf_hat, cost_hat, unlogged, np.array([0.01]))[0, 0] == 0
    assert decision_choices(perf_hat, cost_hat, mask).shape[0] == len(LAMBDAS) + 14


def test_the_tolerance_sweep_reaches_best_single_cheaper_where_cost_gaps_differ() -> None:
    """Two tasks: the cheap model saves 0.99 a call on A but 0.01 on B. On the queries where it is predicted
    close (and is right) a tolerance routes it everywhere; λ must stay below A's wrong switch (0.3 / 0.99)
    and so never reaches B's (0.005 / 0.01): the tolerance sweep matches best single at a lower cost."""
    from fusion_lightning.query.metrics import cost_to_match, decision_choices

    close = np.tile(np.repeat([True, False], 100), 2)  # per task: 100 close, 100 not
    task = np.repeat([0, 1], 200)
    perf = np.stack([np.ones(400), close.astype(float)], 1)  # strong always right, cheap right where close
    cost = np.where(task[:, None] == 0, [1.0, 0.01], [0.02, 0.01])
    perf_hat = np.stack([np.full(400, 0.9), np.where(close, 0.895, 0.6)], 1)
    ev = RoutingArrays(perf, cost, perf, cost, np.ones_like(perf, bool), task)
    best_cost = cost[:, 0].mean()  # best single: the strong model, perf 1.0
    lam_only = cost_to_match(sweep_points(sweep_choices(perf_hat, cost, ev.mask), ev), 1.0, best_cost)
    both = cost_to_match(sweep_points(decision_choices(perf_hat, cost, ev.mask), ev), 1.0, best_cost)
    assert lam_only == pytest.approx((0.01 + 1.0 + 0.02 + 0.02) / 4 / best_cost)
    assert both == pytest.approx((0.01 + 1.0 + 0.01 + 0.02) / 4 / best_cost) and both < lam_only


def test_calibration_errors_per_model_on_hand_examples() -> None:
    from fusion_lightning.query.metrics import calibration_errors

    perf = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    mask = np.array([[True, True], [True, True], [True, True], [True, False]])
    # model 0: predictions 0.75 everywhere (one bin), success rate 3/4 -> calibrated
    # model 1: 0.95 on its 3 logged queries (one bin), rate 1/3 -> |0.95 - 1/3|
    hat = np.array([[0.75, 0.95], [0.75, 0.95], [0.75, 0.95], [0.75, 0.1]])
    ev = RoutingArrays(perf, np.zeros_like(perf), perf, np.zeros_like(perf), mask, np.zeros(4, np.int64))
    np.testing.assert_allclose(calibration_errors(hat, ev), [0.0, 0.95 - 1 / 3])
    # two bins for model 0: [0.1, 0.1] against 0/0 and [0.9, 0.9] against 1/1 -> 0.1 in each
    hat2 = np.array([[0.1, 0.5], [0.1, 0.5], [0.9, 0.5], [0.9, 0.5]])
    perf2 = np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    ev2 = RoutingArrays(perf2, np.zeros_like(perf2), perf2, np.zeros_like(perf2), np.ones_like(mask), np.zeros(4, np.int64))
    np.testing.assert_allclose(calibration_errors(hat2, ev2), [0.1, 0.0])
    graded = RoutingArrays(perf2 * 0.5, np.zeros_like(perf2), perf2, np.zeros_like(perf2), np.ones_like(mask),
                           np.zeros(4, np.int64))
    assert calibration_errors(hat2, graded) is None  # not 0/1 scores: nothing to calibrate against
