"""Platt scaling on val after fit: fitted where cross-fitted log loss says it helps, stored in the best
checkpoint, applied by the report and by `Router.load`; hand examples for the fit and the buffer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query import platt
from fusion_lightning.query.router import Router


def _outcomes(p_true: np.ndarray, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(len(p_true)) < p_true).astype(float)


def test_a_miscalibrated_model_is_scaled_and_a_calibrated_one_left_raw() -> None:
    rng = np.random.default_rng(1)
    p_true = rng.uniform(0.05, 0.95, 2000)
    y = _outcomes(p_true)
    over = 1 / (1 + np.exp(-(0.5 * platt.logit(p_true) + 1.0)))  # runs high and flat: Platt's family
    fit = platt.fit_model("over", over, y)
    assert fit.kept and fit.calibrated_log_loss < fit.raw_log_loss - 0.05
    assert fit.a == pytest.approx(2.0, abs=0.25) and fit.b == pytest.approx(-2.0, abs=0.3)  # the inverse map

    def ece(p: np.ndarray) -> float:
        bins = np.minimum((p * 10).astype(int), 9)
        return sum(abs(p[bins == b].sum() - y[bins == b].sum()) for b in range(10)) / len(p)

    assert ece(over) > 0.15 and ece(platt.apply(over, fit.a, fit.b)) < 0.04
    honest = platt.fit_model("honest", p_true, y)
    assert not honest.kept and honest.reason == "cross-fitted log loss not lower than raw"
    few = platt.fit_model("few", np.full(40, 0.9), np.r_[np.ones(37), np.zeros(3)])
    assert not few.kept and "too few val outcomes of one class (37 right, 3 wrong)" in few.reason
    table = platt.as_table([fit, honest])
    assert table.shape == (2, 2) and np.isnan(table[1]).all() and np.isfinite(table[0]).all()


def test_the_buffer_scales_only_the_models_that_have_a_fit() -> None:
    from fusion_lightning.query.base import RouterModule

    m = RouterModule()
    perf = torch.tensor([[0.2, 0.7], [0.9, 0.5]])
    assert torch.equal(m.calibrated(perf), perf)  # empty buffer: as trained
    m.score_calibration = torch.tensor([[2.0, -1.0], [float("nan"), float("nan")]])
    out = m.calibrated(perf)
    z = torch.logit(perf[:, 0])
    torch.testing.assert_close(out[:, 0], torch.sigmoid(2.0 * z - 1.0))
    assert torch.equal(out[:, 1], perf[:, 1])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("platt")
    summary = fit(compose_recipe("router_mlp", planted_overrides(tmp, "trainer.max_epochs=8", "logger=none")))
    return tmp / "run", summary


def test_fit_stores_the_scaling_in_the_best_checkpoint_and_route_applies_it(run) -> None:
    run_dir, summary = run
    fits = summary["score_calibration"]
    assert set(fits) == {"alpha", "beta", "gamma", "delta"}
    kept = [m for m, f in fits.items() if f["kept"]]
    for f in fits.values():  # a model is scaled exactly when cross-fitting said it helps
        if f["kept"]:
            assert f["calibrated_log_loss"] < f["raw_log_loss"] and f["a"] > 0
        else:
            assert f["reason"]
    ckpt_path = run_dir / summary["artifacts"]["best_checkpoint"]
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]["score_calibration"]
    models = ["alpha", "beta", "gamma", "delta"]
    assert state.shape == (4, 2)
    assert [m for m, row in zip(models, state.tolist(), strict=True) if row[0] == row[0]] == kept
    router = Router.load(ckpt_path)
    torch.testing.assert_close(router.module.score_calibration, state, equal_nan=True)
    table = (run_dir / "routing_table.md").read_text()
    assert "decision picked on val" in table or "no decision picked on val" in table or "costs unknown" in table
    for m in kept:
        assert f"{m} " in table and "(Platt)" in table
    assert json.loads((run_dir / "summary.json").read_text())["score_calibration"] == fits


def test_a_checkpoint_from_before_calibration_still_loads(run, tmp_path: Path) -> None:
    run_dir, summary = run
    data = torch.load(run_dir / summary["artifacts"]["best_checkpoint"], map_location="cpu", weights_only=True)
    del data["state_dict"]["score_calibration"]
    old = tmp_path / "old.ckpt"
    torch.save(data, old)
    router = Router.load(old)
    assert router.module.score_calibration.numel() == 0
    res = router.route(["add the sum of these numbers plus digits"], tasks=["arithmetic"])
    assert res.models == ["alpha"]


def test_calibration_can_be_turned_off(tmp_path: Path) -> None:
    summary = fit(compose_recipe("router_mlp", planted_overrides(
        tmp_path, "trainer.max_epochs=2", "logger=none", "callbacks.score_calibration.enabled=false")))
    assert "score_calibration" not in summary
    state = torch.load(tmp_path / "run" / summary["artifacts"]["best_checkpoint"], map_location="cpu",
                       weights_only=True)["state_dict"]["score_calibration"]
    assert state.numel() == 0


def test_the_val_decision_is_reported_on_test_reached_or_not_and_never_stale() -> None:
    """The decision picked on val is what test reports, whether it reaches best single there or not; a val
    report with no pick (or an in-sample val) clears it and says why."""
    from fusion_lightning.callbacks.routing_report import RoutingReport
    from fusion_lightning.query.metrics import decision_labels

    rr = RoutingReport()
    pts = np.array([[1.0, 0.5], [2.0, 0.7], [3.0, 0.8]])
    rr._val_decision({"decision_points": True, "match": 1, "points": pts, "best": (3.0, 0.7), "scalars": {}}, "val")
    test = {"decision_points": True, "points": np.array([[1.0, 0.5], [2.0, 0.6], [3.0, 0.8]]), "best": (3.0, 0.75),
            "scalars": {}}
    rr._val_decision(test, "test")  # misses best single on test: still reported
    assert test["decision"]["label"] == decision_labels()[1]
    assert test["scalars"]["decision/perf_delta"] == pytest.approx(-0.15)
    assert test["scalars"]["decision/cost_ratio"] == pytest.approx(2 / 3)
    rr._val_decision({"decision_points": True, "points": pts, "best": (3.0, 0.9), "scalars": {}}, "val")
    again = {"decision_points": True, "points": pts, "best": (3.0, 0.7), "scalars": {}}
    rr._val_decision(again, "test")
    assert "decision" not in again and again["decision_note"] == "no single λ or τ reaches best single on val"
    rr._val_decision({"decision_points": True, "match": 1, "points": pts, "best": (3.0, 0.7), "scalars": {}}, "val",
                     in_sample=True)
    third = {"decision_points": True, "points": pts, "best": (3.0, 0.7), "scalars": {}}
    rr._val_decision(third, "test")
    assert "decision" not in third and "refit's training data" in third["decision_note"]
