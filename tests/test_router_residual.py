"""The residual router: the per-task lookup exactly when the query adds nothing, more when it does; the
task prior it stands on; the shared prior head of the other routers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from planted import planted_overrides, write_subtopic_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.base import split_arrays, task_prior
from fusion_lightning.query.metrics import baseline_choices, choose
from fusion_lightning.query.router import load_router_module
from fusion_lightning.query.routers.residual import ResidualRouter


def _subtopic_overrides(tmp_path: Path, *extra: str) -> list[str]:
    folder = write_subtopic_logs(tmp_path / "sub")
    return ["data=llmrouter", f"data.path={folder}", "datamodule.encoder=hashing",
            f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", "logger=none",
            "~callbacks.progress_bar", *extra]


def test_task_prior_is_the_masked_per_task_mean_with_overall_fallbacks() -> None:
    task = torch.tensor([1, 1, 2, 2])
    perf = torch.tensor([[1.0, 0.0], [0.0, 9.0], [1.0, 1.0], [1.0, 0.0]])
    cost = torch.tensor([[0.2, 0.4], [0.4, 9.0], [0.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    p, c = task_prior(task, perf, cost, mask, n_tasks=4)
    # task 1: model 0 mean of (1, 0); model 1 only observed once (0.0), the masked 9.0 never counts
    torch.testing.assert_close(p[1], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(c[1], torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(p[2], torch.tensor([1.0, 0.5]))
    overall = torch.tensor([3 / 4, 1 / 3])
    torch.testing.assert_close(p[0], overall)  # the unknown task
    torch.testing.assert_close(p[3], overall)  # a task absent from train


def test_residual_router_is_exactly_task_best_without_within_task_signal(tmp_path: Path) -> None:
    """The planted log's scores depend on the task only: α stays 0 and every decision is task-best's."""
    cfg = compose_recipe("router_residual", planted_overrides(tmp_path, "trainer.max_epochs=6", "logger=none"))
    dm = instantiate(cfg.datamodule, _convert_="all")
    dm.setup("fit")
    summary = fit(cfg)
    m = summary["metrics"]
    assert m["test/perf"] == m["test/task_best/perf"] and m["test/cost"] == m["test/task_best/cost"], m
    router = load_router_module(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    assert float(router.alpha) == 0.0
    t = dm.splits["test"].tensors
    perf, _ = router.predict(t["x"], t["task"])
    train, ev = split_arrays(dm.splits["train"].tensors), split_arrays(t)
    lookup = baseline_choices(train, ev, "performance_first", [None] * len(router.hparams.models))["task_best"]
    np.testing.assert_array_equal(choose(perf.numpy(), ev.mask), lookup)


def test_residual_router_beats_task_best_on_a_within_task_rule(tmp_path: Path) -> None:
    m = fit(compose_recipe("router_residual", _subtopic_overrides(tmp_path, "trainer.max_epochs=25")))["metrics"]
    assert m["test/task_best/perf"] < 0.65, m  # the lookup cannot see the sub-topic
    assert m["test/perf"] >= m["test/task_best/perf"] + 0.2, m
    assert m["val/alpha"] > 0


def test_alpha_selection_keeps_zero_unless_a_residual_clearly_wins() -> None:
    kw = {"embed_dim": 2, "models": ["a", "b"], "tasks": ["<unk>", "t"], "binary": True, "encoder": "hashing",
          "normaliser": {}, "model_sizes": [None, None]}
    r = ResidualRouter(**kw, hidden_dims=[], alphas=[0.0, 1.0])
    r.prior_perf = torch.tensor([[0.5, 0.6], [0.5, 0.6]])  # the lookup picks b everywhere
    r.prior_cost = torch.zeros(2, 2)
    x = torch.tensor([[1.0, 0.0]] * 40 + [[0.0, 1.0]] * 40)
    val = {"x": x, "task": torch.ones(80, dtype=torch.long), "mask": torch.ones(80, 2, dtype=torch.bool),
           "cost": torch.zeros(80, 2), "cost_n": torch.zeros(80, 2)}
    with torch.no_grad():  # the residual sends the first 40 queries to a
        r.perf_head.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 0.0]]))
    # a is right on the first 40, b on the rest: α = 1 gains 40 of 80 -> chosen
    val["perf"] = val["perf_n"] = torch.tensor([[1.0, 0.0]] * 40 + [[0.0, 1.0]] * 40)
    assert r.select_alpha(val) == 1.0
    # a and b agree on the first 40 but three: α = 1 gains on two, loses one: 1/80 is within one SE -> 0
    perf = torch.tensor([[1.0, 1.0]] * 40 + [[0.0, 1.0]] * 40)
    perf[0] = perf[1] = torch.tensor([1.0, 0.0])
    perf[2] = torch.tensor([0.0, 1.0])
    val["perf"] = val["perf_n"] = perf
    assert r.select_alpha(val) == 0.0 and float(r.alpha) == 0.0


def test_task_prior_head_is_shared_by_the_mlp_router(tmp_path: Path) -> None:
    """`model.task_prior=true`: the MLP starts from (and is trained around) the lookup's predictions."""
    cfg = compose_recipe("router_mlp", _subtopic_overrides(tmp_path, "model.task_prior=true", "trainer.max_epochs=8"))
    summary = fit(cfg)
    router = load_router_module(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    assert router.uses_task_prior and router.prior_perf.shape == (len(router.hparams.tasks), 3)
    assert summary["metrics"]["test/perf"] >= summary["metrics"]["test/task_best/perf"] + 0.2
