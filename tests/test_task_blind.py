"""Measured as routing is used: tasks inferred from the text (task-blind), and logs without costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import planted_overrides, write_subtopic_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.metrics import RoutingArrays, task_blind_metrics
from fusion_lightning.query.router import Router
from fusion_lightning.query.routers.residual import ResidualRouter
from fusion_lightning.query.task_classifier import fit_task_classifier, infer_tasks


def _arrays(perf: list[list[float]], tasks: list[int]) -> RoutingArrays:
    p = np.array(perf, float)
    return RoutingArrays(p, np.zeros_like(p), p, np.zeros_like(p), np.ones_like(p, bool), np.array(tasks))


def test_task_blind_metrics_by_hand() -> None:
    # train: task 1 -> model 0 clearly; task 2 -> model 1, narrowly (0.45 vs 0.55); overall model 0
    train = _arrays([[1, 0], [1, 0], [0.45, 0.55], [0.45, 0.55]], [1, 1, 2, 2])
    ev = _arrays([[1, 0], [0, 1], [1, 0], [0, 1]], [1, 2, 1, 2])
    # the third query (task 1) reads as task 2 (p 0.55) or task 1 (0.45); the others are inferred right
    task_hat = np.array([[1, 2], [2, 1], [2, 1], [2, 1]])
    task_p = np.array([[1.0, 0.0], [1.0, 0.0], [0.55, 0.45], [1.0, 0.0]])
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # the router errs on the third
    m = task_blind_metrics(scores, task_hat, task_p, train, ev, [None, None])
    assert m["perf"] == pytest.approx(3 / 4)
    assert m["task_accuracy"] == pytest.approx(3 / 4)  # the most probable task is wrong on the third
    # best single (model 0) scores 2/4, the oracle 4/4
    assert m["gap_closed"] == pytest.approx((3 / 4 - 1 / 2) / (1 - 1 / 2))
    # the lookup averaged over the inferred tasks: 0.55·(0.45, 0.55) + 0.45·(1, 0) = (0.70, 0.30) -> model 0,
    # right on the third query although its most probable task is wrong
    assert m["task_best/perf"] == pytest.approx(1.0) and m["task_best/gap_closed"] == pytest.approx(1.0)


def test_predictions_are_averaged_over_the_inferred_tasks() -> None:
    kw = {"embed_dim": 2, "models": ["a", "b"], "tasks": ["<unk>", "s", "t"], "binary": True, "encoder": "hashing",
          "normaliser": {}, "model_sizes": [None, None]}
    r = ResidualRouter(**kw, hidden_dims=[], alphas=[0.0])
    r.prior_perf = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.6]])
    r.prior_cost = torch.zeros(3, 2)
    perf, _ = r.predict_mixture(torch.zeros(2, 2), torch.tensor([[1, 2], [2, 1]]), torch.tensor([[0.7, 0.3], [1.0, 0.0]]))
    torch.testing.assert_close(perf, torch.tensor([[0.7 * 0.9 + 0.3 * 0.2, 0.7 * 0.1 + 0.3 * 0.6], [0.2, 0.6]]))


def test_task_classifier_separates_tasks_and_never_predicts_unknown() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    task = torch.tensor([1, 2, 3] * 50)
    x = centres[task] + 0.3 * torch.randn(150, 3, generator=g)
    w, b = fit_task_classifier(x, task, n_tasks=5)  # task 4 never appears in train
    pred = infer_tasks(x, w, b)
    assert (pred == task).float().mean() >= 0.99
    assert not (pred == 0).any() and not (pred == 4).any()
    one = fit_task_classifier(x, torch.ones(150, dtype=torch.long), n_tasks=3)
    assert (infer_tasks(x, *one) == 1).all()


def test_route_infers_missing_tasks_and_fit_reports_task_blind(tmp_path: Path) -> None:
    cfg = compose_recipe("router_mlp", planted_overrides(tmp_path, "trainer.max_epochs=8", "logger=none"))
    summary = fit(cfg)
    m = summary["metrics"]
    assert m["test/task_blind/task_accuracy"] >= 0.95
    for k in ("test/task_blind/perf", "test/task_blind/gap_closed", "val/task_blind/perf"):
        assert k in m
    assert m["test/task_blind/perf"] >= m["test/best_single/perf"] + 0.1
    table = (tmp_path / "run" / "routing_table.md").read_text()
    assert "task-blind" in table and "router task blind perf" in table
    router = Router.load(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    queries = [f"question {i}: " + w for i, w in enumerate(
        ["add the numbers plus sum", "river capital ocean", "sonnet rhyme verse poem"] * 4)]
    tasks = ["arithmetic", "geography", "poetry"] * 4
    known, blind = router.route(queries, tasks), router.route(queries)
    assert blind.models == known.models
    mixed = router.route(queries, [None, "geography", "not-a-task"] * 4)  # missing / unknown names inferred
    assert mixed.models == known.models


def test_costs_unknown_says_so_and_plots_performance(tmp_path: Path) -> None:
    folder = write_subtopic_logs(tmp_path / "free", price=0.0)
    cfg = compose_recipe("router_mlp", ["data=llmrouter", f"data.path={folder}", "datamodule.encoder=hashing",
                                        f"datamodule.embedding_cache={tmp_path / 'cache'}", "logger=none",
                                        f"run_dir={tmp_path / 'run'}", "trainer.max_epochs=2"])
    summary = fit(cfg)
    m, run = summary["metrics"], tmp_path / "run"
    assert m["test/cost"] == 0.0
    for k in ("test/cost_to_match_best", "test/aiq", "test/reaches_best_single", "val/aiq"):
        assert k not in m, k
    table = (run / "routing_table.md").read_text()
    assert "costs unknown" in table and "never reached" not in table and "cost |" not in table
    assert (run / "pareto.png").stat().st_size > 10_000
    assert json.loads((run / "summary.json").read_text())["metrics"] == m
