"""kNN, matrix-factorisation and IRT routers: each learns a planted rule, and each part does what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from planted import planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.router import load_router_module
from fusion_lightning.query.routers.irt import IRTRouter, irt_logits
from fusion_lightning.query.routers.knn import KNNRouter
from fusion_lightning.query.routers.mf import MFRouter

RECIPES = ("router_knn", "router_mf", "router_irt")
EPOCHS = {"router_knn": 1, "router_mf": 15, "router_irt": 15}


def _kwargs(m: int = 3, embed_dim: int = 2) -> dict:
    """What RouterDataModule.model_kwargs() would give, for a hand-made problem."""
    return {"embed_dim": embed_dim, "models": [f"m{i}" for i in range(m)], "tasks": ["<unk>", "a", "b"],
            "binary": True, "encoder": "hashing", "normaliser": {}, "model_sizes": [None] * m}


def _hand_knn(**kw) -> KNNRouter:
    """Four train queries on the unit circle; model m1 has no call on query 1, m2 none on query 0."""
    r = KNNRouter(**_kwargs(), **kw)
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    task = torch.tensor([1, 1, 2, 2])
    perf = torch.tensor([[1.0, 1.0, 0.0], [0.0, 9.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    cost = torch.tensor([[0.1, 0.5, 9.0], [0.3, 9.0, 0.2], [0.2, 0.4, 0.6], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    r.build_index(x, task, perf, cost, mask)
    return r


@pytest.mark.parametrize("recipe", RECIPES)
def test_router_learns_the_planted_rule(recipe: str, tmp_path: Path) -> None:
    cfg = compose_recipe(recipe, planted_overrides(tmp_path, f"trainer.max_epochs={EPOCHS[recipe]}",
                                                   "callbacks=none", "logger=none"))
    m = fit(cfg)["metrics"]
    assert m["test/perf"] >= m["test/best_single/perf"] + 0.1, m
    assert m["test/gap_closed"] >= 0.5, m


def test_knn_predictions_are_masked_neighbour_means() -> None:
    r = _hand_knn(k=2)
    q = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    perf, cost = r.predict(q, torch.tensor([0, 0]))
    # query 0: neighbours 0 and 1; m1 only observed on 0, m2 only on 1
    torch.testing.assert_close(perf[0], torch.tensor([0.5, 1.0, 1.0]))
    torch.testing.assert_close(cost[0], torch.tensor([0.2, 0.5, 0.2]))
    # query 1: neighbours 2 and 1
    torch.testing.assert_close(perf[1], torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(cost[1], torch.tensor([0.25, 0.4, 0.4]))


def test_knn_same_task_and_unobserved_models_fall_back_to_the_train_mean() -> None:
    r = _hand_knn(k=1, same_task=True)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    perf, _ = r.predict(q, torch.tensor([2, 0]))
    # task b: nearest b query is 2 (cosine 0 beats -1); unknown task searches all: query 0, whose m2 is
    # unobserved -> m2's train mean over its three observed calls
    torch.testing.assert_close(perf[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(perf[1], torch.tensor([1.0, 1.0, 2.0 / 3.0]))


def test_knn_softmax_weighting_matches_hand_computation() -> None:
    r = _hand_knn(k=2, weighting="softmax", temperature=0.5)
    perf, _ = r.predict(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    w0, w1 = torch.softmax(torch.tensor([1.0, 0.8]) / 0.5, 0)
    torch.testing.assert_close(perf[0, 0], w0 * 1.0 + w1 * 0.0)
    torch.testing.assert_close(perf[0, 1], torch.tensor(1.0))


def test_knn_index_survives_the_checkpoint(tmp_path: Path) -> None:
    cfg = compose_recipe("router_knn", planted_overrides(tmp_path, "logger=none"))
    summary = fit(cfg)
    best = tmp_path / "run" / summary["artifacts"]["best_checkpoint"]
    loaded = KNNRouter.load_from_checkpoint(best, map_location="cpu")
    via_route_api = load_router_module(best)  # what Router.load uses: weights-only, class from the checkpoint
    assert type(via_route_api) is KNNRouter
    dm = instantiate(cfg.datamodule, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    fresh = KNNRouter(**dm.model_kwargs(), k=cfg.model.k)
    tr = dm.splits["train"].tensors
    fresh.build_index(tr["x"], tr["task"], tr["perf"], tr["cost_n"], tr["mask"])
    te = dm.splits["test"].tensors
    assert len(loaded.keys) == len(tr["x"])
    expected = fresh.predict(te["x"], te["task"])
    for router in (loaded, via_route_api):
        for a, b in zip(router.predict(te["x"], te["task"]), expected, strict=True):
            assert torch.equal(a, b)


def test_mf_parameter_shapes_and_outputs() -> None:
    r = MFRouter(**_kwargs(m=5, embed_dim=7), dim=4)
    assert r.model_vecs.shape == (5, 4) and r.cost_vecs.shape == (5, 4) and r.model_bias.shape == (5,)
    assert r.query_proj.weight.shape == (4, 7) and r.task_emb.weight.shape == (3, 4)
    perf, cost = r.eval().predict(torch.randn(6, 7), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert perf.shape == cost.shape == (6, 5) and ((perf > 0) & (perf < 1)).all()
    assert MFRouter(**_kwargs(), task_embedding=False).task_emb is None


def test_irt_parameter_shapes() -> None:
    r = IRTRouter(**_kwargs(m=5, embed_dim=7), dim=3, hidden_dims=(8,), task_embedding_dim=2)
    assert r.theta.shape == (5, 3) and r.disc_head.out_features == 3 and r.diff_head.out_features == 1
    a, b, _ = r.item_params(torch.randn(4, 7), torch.tensor([0, 1, 2, 1]))
    assert a.shape == (4, 3) and (a >= 0).all() and b.shape == (4,)
    perf, cost = r.eval().predict(torch.randn(4, 7), torch.tensor([0, 1, 2, 1]))
    assert perf.shape == cost.shape == (4, 5)


def test_irt_probability_rises_with_ability_and_falls_with_difficulty() -> None:
    a = torch.tensor([[1.0, 0.5]])
    theta = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])  # increasing ability
    p = torch.sigmoid(irt_logits(a, torch.tensor([0.0]), theta))[0]
    assert p[0] < p[1] < p[2] and p[0] == 0.5
    harder = torch.sigmoid(irt_logits(a, torch.tensor([1.5]), theta))[0]
    assert (harder < p).all()
    # through the module: raise the predicted difficulty of every query via the head's bias
    r = IRTRouter(**_kwargs(), hidden_dims=(), task_embedding_dim=0).eval()
    with torch.no_grad():
        r.theta.copy_(torch.tensor([[-1.0] * 16, [0.0] * 16, [1.0] * 16]))
        x = torch.tensor([[0.3, -0.2]])
        easy, _ = r.predict(x, torch.tensor([0]))
        r.diff_head.bias += 2.0
        hard, _ = r.predict(x, torch.tensor([0]))
    assert easy[0, 0] < easy[0, 1] < easy[0, 2]
    assert (hard < easy).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_smoke_runs_on_the_small_synthetic_default(recipe: str, tmp_path: Path) -> None:
    cfg = compose_recipe(recipe, ["data.synthetic.n_queries=240", "data.synthetic.models=6",
                                  "datamodule.encoder=hashing", f"datamodule.embedding_cache={tmp_path / 'cache'}",
                                  f"run_dir={tmp_path / 'run'}", "+trainer.fast_dev_run=true", "logger=none"])
    summary = fit(cfg)
    assert summary["recipe"] == recipe and "test/perf" in summary["metrics"]
