"""bench/bandit.py --quick: off-policy evaluation (every estimator × target × logger), the OBP table skipped,
and the serve -> reveal -> retrain loop on a small synthetic log (~20 s)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bandit():
    spec = importlib.util.spec_from_file_location("bench_bandit", ROOT / "bench" / "bandit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _finite(row: dict, keys: tuple[str, ...]) -> bool:
    return all(math.isfinite(float(row[k])) for k in keys)


def test_quick_run_writes_every_table(bandit, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bandit"
    assert bandit.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("estimators_synthetic.csv", "loop_synthetic.csv", "loop_synthetic.png", "bandit.md", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "obp_synthetic.csv").exists()  # --quick skips OBP
    assert (out / "loop_synthetic.png").read_bytes()[:4] == b"\x89PNG"

    # estimator accuracy: one row per (logger, target, estimator), every number finite
    est = _rows(out / "estimators_synthetic.csv")
    loggers = {"uniform", "mlp ε=0.2", "mlp-relative ε=0.2"}
    assert {(r["logger"], r["target"], r["estimator"]) for r in est} == {
        (lg, t, e) for lg in loggers for t in bandit.TARGETS for e in bandit.ESTIMATORS}
    assert len(est) == len(loggers) * len(bandit.TARGETS) * len(bandit.ESTIMATORS)
    for r in est:
        assert _finite(r, ("truth", "mean", "bias", "rmse", "sd", "se", "coverage", "width", "ess")), r
        assert 0 <= float(r["coverage"]) <= 1 and float(r["rmse"]) >= abs(float(r["bias"])) - 1e-12
        assert int(r["seeds"]) == 3 and float(r["unsupported"]) == 0.0
    # the uniform logger makes SNIPS the naive mean for a deterministic target
    by = {(r["logger"], r["target"], r["estimator"]): float(r["mean"]) for r in est}
    assert all(by[("uniform", t, "snips")] == pytest.approx(by[("uniform", t, "naive")]) for t in bandit.TARGETS)

    # the loop: 4 variants × 2 rounds, full-information test metrics, cumulative regret growing
    loop = _rows(out / "loop_synthetic.csv")
    variants = {"naive ε=0", "naive ε=0.1", "DR ε=0", "DR ε=0.1"}
    assert {(r["variant"], int(r["round"])) for r in loop} == {(v, k) for v in variants for k in (1, 2)}
    for r in loop:
        assert _finite(r, ("cum_regret", "test_perf", "test_gap", "lookup_gap", "ceiling_gap", "best_single", "oracle"))
    for v in variants:
        reg = [float(r["cum_regret"]) for r in sorted((r for r in loop if r["variant"] == v), key=lambda r: r["round"])]
        assert 0 <= reg[0] <= reg[1]
        assert [int(r["served"]) for r in loop if r["variant"] == v] == [75, 150]  # half the log, in 2 batches

    summary = json.loads((out / "summary.json").read_text())
    s = summary["logs"]["synthetic"]
    assert s["queries"] == 300 and len(s["models"]) == 4 and set(s["truth"]) == set(bandit.TARGETS)
    t = s["estimator_targets"]
    assert isinstance(t["dr_coverage_ge_90"], bool) and isinstance(t["dr_rmse_le_ips"], bool)
    assert set(t["skewed"]) == loggers - {"uniform"}
    assert set(s["loop"]["final"]) == variants and s["obp"] is None and "skipped" in s["obp_note"]
    assert all(math.isfinite(v) for v in s["loop"]["reference"].values())

    md = (out / "bandit.md").read_text()
    for heading in ("### Estimator accuracy", "### Open Bandit Pipeline cross-check", "### The loop", "### Targets"):
        assert heading in md and heading in printed
    for target in bandit.TARGETS:
        assert f"| {target} |" in md
