"""Paired bootstrap intervals of the fusion table: hand-checkable cases and a direct numpy recomputation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fusion_lightning.evaluate import write_report
from fusion_lightning.fusion_table import Evaluation, add_confidence, table_rows

TASKS = np.array(["gsm8k"] * 4 + ["mmlu"] * 3 + ["arc"] * 5)
DOMAINS = np.array(["math"] * 4 + ["world_knowledge"] * 3 + ["commonsense"] * 5)
BEST = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1], float)
OTHER = np.array([1, 1, 1, 0, 1, 1, 1, 0, 1, 1, np.nan, 1], float)  # one unscored call (NaN)


def _ev() -> Evaluation:
    ev = Evaluation("test", np.array([f"q{i}" for i in range(len(TASKS))]), TASKS, DOMAINS)
    zero = np.zeros(len(TASKS))
    ev.add("a", "single", BEST, zero)
    ev.add("b", "single", OTHER, zero)
    ev.add("best_single", "best_single", BEST, zero)
    ev.add("same", "thought", BEST.copy(), zero)  # identical to best single
    ev.add("plus_one", "model", BEST + 1.0, zero)  # best single + 1 on every question
    ev.add("oracle", "oracle", np.ones(len(TASKS)), zero)
    return ev


def _rows(n_boot: int = 400, seed: int = 3) -> dict[str, dict]:
    ev = _ev()
    rows = table_rows(ev)
    add_confidence(ev, rows, n_boot=n_boot, seed=seed)
    return {r["row"]: r for r in rows}


def test_identical_and_shifted_columns_have_exact_difference_intervals() -> None:
    for r in _rows().values():
        assert (r["same_diff"], r["same_diff_lo"], r["same_diff_hi"]) == (0.0, 0.0, 0.0)
        assert r["plus_one_diff_lo"] == pytest.approx(1.0) and r["plus_one_diff_hi"] == pytest.approx(1.0)
        assert r["oracle_perf_lo"] == r["oracle_perf_hi"] == 1.0  # a constant column has no spread
        assert r["a_perf_lo"] <= r["a_perf"] <= r["a_perf_hi"]


def test_question_counts_per_cell() -> None:
    rows = _rows()
    assert rows["arc"]["queries"] == 5 and rows["arc"]["a_n"] == 5 and rows["arc"]["b_n"] == 4  # one NaN
    assert rows["all queries"]["b_n"] == 11 and rows["overall (task avg)"]["a_n"] == 12


def test_two_question_task_spans_zero_to_one() -> None:
    """Hand example: values [0, 1] -> replicate means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4,
    so with many resamples the 95 % interval is [0, 1] and about half the replicates are 1/2."""
    ev = Evaluation("test", np.array(["x", "y"]), np.array(["t", "t"]), np.array(["d", "d"]))
    ev.add("m", "single", np.array([0.0, 1.0]), np.zeros(2))
    ev.add("best_single", "best_single", np.array([0.0, 1.0]), np.zeros(2))
    rows = table_rows(ev)
    add_confidence(ev, rows, n_boot=2000, seed=0)
    t = rows[0]
    assert (t["m_perf"], t["m_perf_lo"], t["m_perf_hi"]) == (0.5, 0.0, 1.0)
    draws = np.random.default_rng(0).integers(0, 2, size=(2000, 2)).mean(1)  # the documented draw
    assert 0.45 < (draws == 0.5).mean() < 0.55


def test_intervals_match_a_direct_numpy_bootstrap() -> None:
    """Recompute every interval with a plain loop over replicates, following the documented draws."""
    n_boot, seed = 300, 7
    rows = _rows(n_boot, seed)
    rng = np.random.default_rng(seed)
    tasks = sorted(set(TASKS))
    draws = {t: np.flatnonzero(t == TASKS)[rng.integers(0, (t == TASKS).sum(), size=(n_boot, (t == TASKS).sum()))]
             for t in tasks}
    stats: dict[str, list[float]] = {k: [] for k in ("b_gsm8k", "b_overall", "b_all", "diff_overall", "b_math")}
    for i in range(n_boot):
        per_b = {t: np.nanmean(OTHER[draws[t][i]]) for t in tasks}
        per_best = {t: np.nanmean(BEST[draws[t][i]]) for t in tasks}
        pooled = np.concatenate([OTHER[draws[t][i]] for t in tasks])
        stats["b_gsm8k"].append(per_b["gsm8k"])
        stats["b_math"].append(per_b["gsm8k"])  # math has one task
        stats["b_overall"].append(np.mean(list(per_b.values())))
        stats["b_all"].append(np.nanmean(pooled))
        stats["diff_overall"].append(np.mean(list(per_b.values())) - np.mean(list(per_best.values())))
    pct = lambda k: np.percentile(stats[k], [2.5, 97.5])  # noqa: E731
    np.testing.assert_allclose([rows["gsm8k"]["b_perf_lo"], rows["gsm8k"]["b_perf_hi"]], pct("b_gsm8k"))
    np.testing.assert_allclose([rows["math (avg)"]["b_perf_lo"], rows["math (avg)"]["b_perf_hi"]], pct("b_math"))
    ov = rows["overall (task avg)"]
    np.testing.assert_allclose([ov["b_perf_lo"], ov["b_perf_hi"]], pct("b_overall"))
    np.testing.assert_allclose([ov["b_diff_lo"], ov["b_diff_hi"]], pct("diff_overall"))
    np.testing.assert_allclose([rows["all queries"]["b_perf_lo"], rows["all queries"]["b_perf_hi"]], pct("b_all"))
    assert ov["b_diff"] == pytest.approx(ov["b_perf"] - ov["best_single_perf"])


def test_bad_bootstrap_settings_are_errors() -> None:
    ev = _ev()
    rows = table_rows(ev)
    with pytest.raises(ValueError, match="n_boot"):
        add_confidence(ev, rows, n_boot=0)
    with pytest.raises(ValueError, match="level"):
        add_confidence(ev, rows, level=1.5)
    with pytest.raises(ValueError, match="reference column 'nope'"):
        add_confidence(ev, rows, reference="nope")


def test_report_carries_intervals_in_markdown_csv_and_summary(tmp_path: Path) -> None:
    summary = write_report(_ev(), tmp_path, n_boot=200, seed=1)
    ov = summary["overall"]
    assert ov["same"]["diff_ci"] == [0.0, 0.0] and ov["plus_one"]["diff_vs_best_single"] == pytest.approx(1.0)
    assert ov["b"]["n"] == 11 and ov["a"]["ci"][0] <= ov["a"]["perf"] <= ov["a"]["ci"][1]
    assert json.loads((tmp_path / "summary.json").read_text())["info"]["bootstrap"]["n_boot"] == 200
    md = (tmp_path / "fusion_table.md").read_text()
    assert "## Difference vs best single (paired)" in md and "+0.000 [+0.000, +0.000]" in md and "(n=4)" in md
    with (tmp_path / "fusion_table.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"a_perf_lo", "a_perf_hi", "a_n", "a_diff", "a_diff_lo", "a_diff_hi"} <= set(rows[0])
    (tmp_path / "plain").mkdir()
    plain = write_report(_ev(), tmp_path / "plain", n_boot=0)  # intervals off: the old table
    assert "ci" not in plain["overall"]["a"]
