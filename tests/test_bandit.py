"""Bandit logs: telling them from full-information logs, simulated loggers, bad propensities, estimated
propensities, off-policy training targets, and `fit` reporting estimates (never the full table) on one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.bandit import describe_log, draw, estimate_propensities, logging_probabilities
from fusion_lightning.data.datamodule import load_from_config
from fusion_lightning.data.errors import LogValidationError
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.fit import build, fit, run

SMALL = {"format": "synthetic", "synthetic": {"n_queries": 240, "models": 4}}


def _records(n_queries: int = 30, models=("m1", "m2", "m3"), seed: int = 0) -> list[dict]:
    """An LLMFusionBench bandit log: one uniformly chosen model per query, with its propensity."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_queries):
        m = models[int(rng.integers(len(models)))]
        out.append({"task_name": "gsm8k", "query": f"question {i}", "llm": m, "performance": float(rng.random() < 0.5),
                    "cost": 10.0, "input_price": 0.1, "output_price": 0.1, "propensity": 1 / len(models),
                    "policy": "uniform"})
    return out


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_full_and_bandit_logs_are_told_apart_with_counts():
    full = load_from_config(SMALL)
    assert full.shape.kind == "full" and not full.bandit and full.summary()["bandit_log"] == 0
    bandit = load_from_config({**SMALL, "bandit": {"logger": "uniform", "seed": 3}})
    shape = bandit.shape
    assert shape.kind == "bandit" and shape.calls_per_query == (1.0, 1, 1) and shape.has_propensities
    assert sum(shape.queries_per_model.values()) == shape.queries == 240
    assert shape.policies == {"uniform": 240}
    assert any("bandit log" in n and "off-policy estimates" in n for n in bandit.report.notes)
    # the full log stays as the truth, row for row
    assert bandit.truth is not None and len(bandit.truth) == len(full)
    forced = describe_log(bandit.table, bandit.models, "full")
    assert forced.kind == "full" and "data.log_kind=full" in forced.reason
    with pytest.raises(ValueError, match="already a bandit log"):
        from fusion_lightning.data.datamodule import simulated_bandit
        from fusion_lightning.data.source import BanditSimulation

        simulated_bandit(bandit, BanditSimulation(logger="uniform"))


def test_bandit_log_from_file_is_detected(tmp_path):
    logs = load_logs("llmfusionbench", _write(tmp_path / "served.jsonl", _records()))
    assert logs.bandit and logs.shape.reason.startswith("a subset of models per query, with propensities")
    qm = logs.matrix()
    assert np.allclose(qm.propensity[qm.mask], 1 / 3) and np.isnan(qm.propensity[~qm.mask]).all()


def test_simulated_logger_choices_match_its_propensities():
    rng = np.random.default_rng(0)
    n, m = 20000, 4
    scores = rng.normal(size=(n, m))
    avail = np.ones((n, m), bool)
    avail[:, 3] = False  # a model without a call: never chosen
    probs = logging_probabilities(scores, avail, epsilon=0.2)
    assert np.allclose(probs.sum(1), 1) and (probs[:, 3] == 0).all()
    assert np.allclose(probs.max(1), 0.8 + 0.2 / 3)
    chosen = draw(probs, rng)
    for j in range(m):
        expected = probs[:, j].sum()
        assert abs((chosen == j).sum() - expected) < 4 * np.sqrt(expected) + 1
    soft = logging_probabilities(np.array([[0.0, np.log(3.0)]]), np.ones((1, 2), bool), temperature=1.0)
    assert np.allclose(soft, [[0.25, 0.75]])
    # the same seed draws the same log
    a = load_from_config({**SMALL, "bandit": {"logger": "uniform", "seed": 5}})
    b = load_from_config({**SMALL, "bandit": {"logger": "uniform", "seed": 5}})
    assert a.table.equals(b.table)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r[4].update(propensity=0.0), "out of range (0, 1]: 0.0"),
    (lambda r: r[4].update(propensity=1.5), "out of range (0, 1]: 1.5"),
    (lambda r: r[4].pop("propensity"), "missing propensity"),
    (lambda r: r.append({**r[4], "propensity": 0.9}), "disagrees with another row of the same (query, model)"),
])
def test_bad_propensities_name_file_row_and_field(tmp_path, edit, message):
    recs = _records()
    edit(recs)
    path = _write(tmp_path / "served.jsonl", recs)
    with pytest.raises(LogValidationError) as e:
        load_logs("llmfusionbench", path)
    text = str(e.value)
    assert message in text and "'propensity'" in text and (f"{path}: row 5:" in text or f"{path} row 5" in text)
    logs = load_logs("llmfusionbench", path, on_error="quarantine", duplicates="first")
    assert logs.report.counts["quarantined_rows"] >= 1
    assert any(message in reason for q in logs.report.quarantine for reason in q["_reasons"])


def test_estimated_propensities_recover_a_task_driven_logger():
    rng = np.random.default_rng(0)
    n = 3000
    tasks = rng.integers(0, 2, n)
    feats = rng.normal(size=(n, 3))
    true = np.where(tasks[:, None] == 0, [0.7, 0.2, 0.1], [0.1, 0.3, 0.6])
    mask = np.eye(3, dtype=bool)[draw(true, rng)]
    est = estimate_propensities(feats, tasks, mask, folds=5)
    assert np.abs(est - true).max() < 0.08


def _fit(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_recipe("router_mlp", ["debug=fast", f"run_dir={tmp_path}", "trainer.max_epochs=2",
                                        "data.synthetic.models=4", *overrides])
    return fit(cfg)


def test_fit_on_a_bandit_log_reports_estimates_never_the_full_table(tmp_path):
    summary = _fit(tmp_path, "data.bandit.logger=uniform")
    m = summary["metrics"]
    for est in ("naive", "dm", "ips", "snips", "dr"):
        assert np.isfinite(m[f"test/ope/{est}/perf"])
    assert m["test/ope/dr/perf_lo"] <= m["test/ope/dr/perf"] <= m["test/ope/dr/perf_hi"]
    assert "test/ope/task_best/dr/perf" in m and "test/ope/random/dr/perf" in m and "test/ope/ess" in m
    # the full-information metrics are refused: no oracle, no gap closed, no routing table
    assert not any(k in m for k in ("test/oracle/perf", "test/gap_closed", "test/random/perf", "test/best_single/perf"))
    assert m["test/perf"] == m["test/ope/dr/perf"] and m["test/reward"] == m["test/ope/dr/reward"]
    assert not (tmp_path / "routing_table.md").exists()
    report = (tmp_path / "ope_report.md").read_text()
    assert "bandit log" in report and "Which estimate to trust" in report and "oracle" in report
    # simulated: the full log's truth beside the estimates
    assert 0 <= m["test/truth/perf"] <= 1 and "test/truth/gap_closed" in m
    assert summary["data"]["bandit_log"] == 1


def test_bandit_log_without_propensities_needs_them_or_an_estimate(tmp_path):
    recs = [{k: v for k, v in r.items() if k not in ("propensity", "policy")} for r in _records(90)]
    path = _write(tmp_path / "log.jsonl", recs)
    base = ["data=llmfusionbench", f"data.path={path}", "encoder=hashing", "trainer.max_epochs=1"]
    with pytest.raises(ValueError, match="without propensities.*data.propensity=estimate"):
        fit(compose_recipe("router_mlp", [*base, f"run_dir={tmp_path / 'a'}"]))
    summary = fit(compose_recipe("router_mlp", [*base, f"run_dir={tmp_path / 'b'}", "data.propensity=estimate"]))
    assert np.isfinite(summary["metrics"]["test/ope/dr/perf"])
    notes = json.loads((tmp_path / "b" / "data_report.json").read_text())["notes"]
    assert any("propensities estimated" in n for n in notes)


def test_off_policy_targets_on_train(tmp_path):
    """dr/ips replace train's targets with a pseudo-reward for every pair (squared error, not BCE); direct
    keeps the logged calls; on a full log dr's targets are the logged values themselves."""
    def train_tensors(*overrides):
        r = build(compose_recipe("router_mlp", ["debug=fast", f"run_dir={tmp_path}", "data.synthetic.models=4",
                                                *overrides]))
        return r.datamodule.splits["train"].tensors, r.model.hparams.binary, r.datamodule.splits["val"].tensors

    dr, binary, val = train_tensors("data.bandit.logger=uniform")
    assert bool(dr["mask"].all()) and not binary and "prop" not in dr
    assert bool((val["mask"].sum(1) == 1).all()) and "prop" in val and "perf_dm" in val
    direct, binary, _ = train_tensors("data.bandit.logger=uniform", "datamodule.off_policy=direct")
    assert bool((direct["mask"].sum(1) == 1).all()) and "prop" in direct
    ips, _, _ = train_tensors("data.bandit.logger=uniform", "datamodule.off_policy=ips")
    # IPS pseudo-reward: y / p on the logged call (p = 1/4), 0 elsewhere
    logged = direct["mask"]
    assert np.allclose(ips["perf"][logged].numpy(), 4 * direct["perf"][logged].numpy())
    assert float(ips["perf"][~logged].abs().max()) == 0.0
    clipped, _, _ = train_tensors("data.bandit.logger=uniform", "datamodule.off_policy=ips", "datamodule.max_weight=2")
    assert np.allclose(clipped["perf"][logged].numpy(), 2 * direct["perf"][logged].numpy())  # 1/p = 4, clipped at 2
    full_dr, _, _ = train_tensors("datamodule.off_policy=dr")
    full_direct, _, _ = train_tensors("datamodule.off_policy=direct")
    assert np.allclose(full_dr["perf"].numpy(), full_direct["perf"].numpy())


def test_router_logger_writes_its_policy_id(tmp_path):
    first = _fit(tmp_path / "logger")
    ckpt = tmp_path / "logger" / first["artifacts"]["best_checkpoint"]
    r = build(compose_recipe("router_mlp", ["debug=fast", f"run_dir={tmp_path / 'b'}", "data.synthetic.models=4",
                                            "data.bandit.logger=router", f"data.bandit.checkpoint={ckpt}",
                                            "data.bandit.epsilon=0.2"]))
    logs = r.datamodule.logs
    (policy,) = logs.shape.policies
    assert policy.startswith("router:") and policy.endswith(":epsilon=0.2")
    prop = logs.matrix().propensity
    values = prop[~np.isnan(prop)]
    assert np.isclose(values, 0.8 + 0.2 / 4).any()
    assert (np.isclose(values, 0.8 + 0.2 / 4) | np.isclose(values, 0.2 / 4)).all()
    assert run(r)["metrics"]["test/ope/ess"] > 0


def test_evaluate_and_route_estimate_a_checkpoint_on_a_bandit_log(tmp_path, capsys):
    from fusion_lightning import evaluate, route

    first = _fit(tmp_path / "router")
    ckpt = tmp_path / "router" / first["artifacts"]["best_checkpoint"]
    data = ["data.synthetic.n_queries=240", "data.synthetic.models=4", "data.bandit.logger=uniform"]
    summary, run_dir = evaluate.run(evaluate.compose([*data, f"routers={{r: {ckpt}}}", f"out={tmp_path / 'ev'}",
                                                      "bootstrap=200"]))
    m = summary["metrics"]
    assert summary["bandit_log"] and (run_dir / "ope_table.md").exists()
    for est in ("naive", "dm", "ips", "snips", "dr"):
        assert m[f"ope/r/{est}/perf_lo"] <= m[f"ope/r/{est}/perf"] <= m[f"ope/r/{est}/perf_hi"]
    assert {"ope/task_best/dr/perf", "ope/best_single/dr/perf", "ope/random/dr/perf", "ope/r/ess"} <= set(m)
    with pytest.raises(ValueError, match="bandit log"):
        evaluate.run(evaluate.compose([*data, f"routers={{r: {ckpt}}}", "student={model: x}"]))

    # the same log as a served-traffic file: route ope= estimates the checkpoint before it serves
    logs = load_from_config({**SMALL, "synthetic": {"n_queries": 240, "models": 4}, "bandit": {"logger": "uniform"}})
    recs = [{"task_name": r["task"], "query": r["query"], "llm": r["model"], "performance": r["performance"],
             "cost": r["cost"] * 1e6, "propensity": r["propensity"], "policy": r["policy"]}
            for r in logs.table.to_pylist()]
    path = _write(tmp_path / "requests.jsonl", recs)
    assert route.main([f"ckpt={ckpt}", f"ope={path}"]) == 0
    out = capsys.readouterr().out
    assert "| router | dr |" in out and "| task_best | dr |" in out and "effective sample size" in out


def test_router_auto_selects_learners_by_dr_on_a_bandit_log(tmp_path):
    """On a bandit log the `off_policy: direct` candidates train on the logged calls (their twins on DR
    pseudo-rewards) and every candidate is scored by its DR estimate on val; on a full log they are skipped."""
    cfg = compose_recipe("router_auto", ["debug=fast", f"run_dir={tmp_path / 'b'}", "data.synthetic.models=4",
                                         "trainer.max_epochs=2", "data.bandit.logger=uniform",
                                         "model.selection=holdout"])  # val rows: comparable to val's DR terms
    r = build(cfg)
    summary = run(r)
    rows = {row["candidate"]: row for row in r.model.selection["rows"]}
    assert {"mlp_direct", "knn_50_direct", "mlp", "knn_50"} <= set(rows)
    assert rows["mlp_direct"]["val_gap_closed"] is None  # no oracle on a bandit log
    # the val reward each candidate was selected by is its DR estimate: the mean of its DR terms on val
    val = r.datamodule.splits["val"].tensors
    from fusion_lightning.query.base import split_arrays
    from fusion_lightning.query.metrics import per_query_reward

    knn = r.model.candidates["knn_50_direct"]
    perf, cost = knn.predict(val["x"], val["task"])
    dr = per_query_reward(knn.predicted_reward(perf, cost, "performance_first").detach().numpy(),
                          split_arrays(val), "performance_first")
    assert rows["knn_50_direct"]["val_reward"] == pytest.approx(float(dr.mean()), abs=1e-6)
    # kNN's index of the direct twin holds the logged calls only, the other one every pair's pseudo-reward
    assert bool((knn.mask.sum(1) == 1).all()) and bool(r.model.candidates["knn_50"].mask.all())
    assert "test/ope/dr/perf" in summary["metrics"] and (tmp_path / "b" / "selection.md").exists()

    full = build(compose_recipe("router_auto", ["debug=fast", f"run_dir={tmp_path / 'f'}", "data.synthetic.models=4",
                                                "trainer.max_epochs=1"]))
    run(full)
    names = {row["candidate"] for row in full.model.selection["rows"]}
    assert "mlp_direct" not in names and "mlp" in names


@pytest.mark.parametrize("recipe", ["router_residual", "router_knn", "router_graph", "router_dc"])
def test_routers_train_and_are_estimated_on_a_bandit_log(tmp_path, recipe):
    summary = fit(compose_recipe(recipe, ["debug=fast", f"run_dir={tmp_path}", "data.synthetic.models=4",
                                          "data.bandit.logger=uniform"]))
    m = summary["metrics"]
    assert np.isfinite(m["test/ope/dr/perf"]) and "test/oracle/perf" not in m
    assert (tmp_path / "ope_report.md").exists()


@pytest.mark.parametrize(("recipe", "message"), [
    ("router_bt", "battles need two answers to one query"),
    ("router_cascade", "replaying every model's logged answer"),
])
def test_routers_that_need_every_answer_say_so_on_a_bandit_log(tmp_path, recipe, message):
    with pytest.raises(ValueError, match=message):
        fit(compose_recipe(recipe, ["debug=fast", f"run_dir={tmp_path}", "data.bandit.logger=uniform"]))


def test_truth_lines_up_with_the_rows_evaluated_when_val_is_larger_than_a_batch(tmp_path):
    """The sanity check evaluates a few val batches only: the simulated log's truth is taken for those rows
    (each carries its index), so a val split of several batches runs, and the truth matches a full pass."""
    summary = fit(compose_recipe("router_mlp", ["debug=fast", f"run_dir={tmp_path}", "data.synthetic.n_queries=1200",
                                                "data.synthetic.models=4", "data.bandit.logger=uniform",
                                                "datamodule.batch_size=16", "+trainer.num_sanity_val_steps=2"]))
    m = summary["metrics"]
    assert summary["data"]["val_queries"] > 2 * 16
    assert 0 <= m["val/truth/perf"] <= 1 and 0 <= m["test/truth/perf"] <= 1
