"""Graph router: learns the planted rule, never reads the answers it is trained on, takes a new model
from its description and a handful of scores without retraining, and routes from its checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from planted import MODELS, planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.fit import fit
from fusion_lightning.query.graph_data import LLM_TO_QUERY, QUERY_TO_LLM, build_graph
from fusion_lightning.query.router import Router, load_router_module
from fusion_lightning.query.routers.graph import GraphRouter


@pytest.fixture(autouse=True)
def _one_thread():
    """Graphs this small run faster on one thread than with hand-offs between two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hand_router(**kw) -> GraphRouter:
    """12 random train queries over tasks a/b, 3 models, one missing call; no training needed."""
    g = torch.Generator().manual_seed(0)
    kwargs = {"embed_dim": 8, "models": ["m0", "m1", "m2"], "tasks": ["<unk>", "a", "b"], "binary": True,
              "encoder": "hashing-8", "model_sizes": [None] * 3,
              "normaliser": {"perf": {"__all__": [0.0, 1.0]}, "cost": {"__all__": [0.0, 2.0]}}}
    r = GraphRouter(**kwargs, hidden_dim=16, knn_k=3, **kw)
    n = 12
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[5, 2] = False
    r.build_context(torch.randn(n, 8, generator=g), torch.tensor([1, 2] * (n // 2)),
                    (torch.rand(n, 3, generator=g) > 0.5).float(), torch.rand(n, 3, generator=g), mask,
                    torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g))
    return r


def test_training_graph_leaves_out_the_scored_queries_edges() -> None:
    r = _hand_router()
    batch = torch.tensor([0, 3, 7])
    seen = {}

    def spy(g, rows, new, hide=None):
        seen["g"], seen["rows"] = g, rows
        return GraphRouter.forward(r, g, rows, new, hide)

    r.forward = spy
    r.train()
    r.loss({"x": r.ctx_x[batch], "task": r.ctx_task[batch], "index": batch, "perf": r.ctx_perf_n[batch],
            "cost_n": r.ctx_cost_n[batch], "mask": r.ctx_mask[batch]})
    g = seen["g"]
    assert torch.equal(seen["rows"], batch)
    assert not torch.isin(g[LLM_TO_QUERY].edge_index[1], batch).any()
    assert not torch.isin(g[QUERY_TO_LLM].edge_index[0], batch).any()
    assert g[LLM_TO_QUERY].edge_index.shape[1] > 0  # the rest of the context is still there
    # and the answers of the scored queries cannot reach their predictions
    r.eval()
    g0 = build_graph(r.context, drop=batch, k=3)
    before = r(g0, batch, r.llm_new)[0]
    r.ctx_perf_n[batch] = 1.0 - r.ctx_perf_n[batch]
    r.ctx_cost_n[batch] = 5.0
    after = r(build_graph(r.context, drop=batch, k=3), batch, r.llm_new)[0]
    torch.testing.assert_close(before, after)


def test_new_queries_are_scored_independently_of_their_batch() -> None:
    r = _hand_router().eval()
    x, task = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1, 0])
    perf, cost = r.predict(x, task)
    assert perf.shape == cost.shape == (5, 3) and ((perf >= 0) & (perf <= 1)).all()
    for i in range(5):
        p, c = r.predict(x[i:i + 1], task[i:i + 1])
        torch.testing.assert_close(p[0], perf[i])
        torch.testing.assert_close(c[0], cost[i])


def test_add_model_keys_by_context_row_or_query_embedding() -> None:
    r = _hand_router().eval()
    n = len(r.ctx_x)
    fresh = torch.randn(8, generator=torch.Generator().manual_seed(2))
    col = r.add_model("m3", torch.ones(8), {0: 1.0, 4: 0.0, r.ctx_x[6].clone(): 1.0, fresh: 0.0},
                      cost_per_call=1.0, params_b=7.0)
    assert col == 3 and r.hparams.models[-1] == "m3" and r.hparams.model_sizes[-1] == 7.0
    assert len(r.ctx_x) == n + 1  # the unseen query joined the context (unknown task); row 6 was matched
    assert r.ctx_task[-1] == 0
    assert r.ctx_mask[:, 3].nonzero().flatten().tolist() == [0, 4, 6, n]
    assert r.ctx_perf_n[[0, 4, 6, n], 3].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.allclose(r.ctx_cost_n[r.ctx_mask[:, 3], 3], torch.tensor(0.5))  # 1.0 over the [0, 2] range
    assert r.predict(torch.randn(2, 8), torch.tensor([1, 0]))[0].shape == (2, 4)
    with pytest.raises(ValueError, match="already"):
        r.add_model("m3", torch.ones(8), {0: 1.0})


def test_graph_router_learns_the_planted_rule(tmp_path: Path) -> None:
    cfg = compose_recipe("router_graph", planted_overrides(tmp_path, "trainer.max_epochs=30", "logger=none"))
    m = fit(cfg)["metrics"]
    assert m["test/perf"] >= m["test/best_single/perf"] + 0.1, m
    assert m["test/gap_closed"] >= 0.5, m


def _drop_model(folder: Path, name: str) -> dict[str, dict[str, float]]:
    """Remove a model from the planted log files; return its scores per split, keyed by query text."""
    held = {}
    for split in ("train", "test"):
        rows = json.loads((folder / f"scores_{split}.json").read_text())
        held[split] = {r["question"]: r["scores"].pop(name) for r in rows}
        (folder / f"scores_{split}.json").write_text(json.dumps(rows))
    catalog = json.loads((folder / "llm_candidates.json").read_text())
    held["info"] = catalog.pop(name)
    (folder / "llm_candidates.json").write_text(json.dumps(catalog))
    return held


def test_a_held_out_model_is_added_without_retraining(tmp_path: Path) -> None:
    overrides = planted_overrides(tmp_path, "trainer.max_epochs=30", "logger=none")
    held = _drop_model(Path(next(o for o in overrides if o.startswith("data.path="))[10:]), "beta")
    cfg = compose_recipe("router_graph", overrides)
    summary = fit(cfg)
    router = load_router_module(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    assert router.hparams.models == ["alpha", "gamma", "delta"]
    dm = instantiate(cfg.datamodule, _convert_="all")
    dm.setup()
    train, test = dm.matrices["train"], dm.matrices["test"]
    # beta arrives with its description and 12 scores (4 per task) on training queries
    rows = np.concatenate([np.flatnonzero(train.tasks == t)[:4]
                           for t in ("arithmetic", "geography", "poetry")])
    observed = {int(i): held["train"][train.queries[i]] for i in rows}
    gamma = train.models.index("gamma")
    # a call costs what gamma's did (same token counts) at beta's price
    cost = float(np.nanmean(train.cost[:, gamma])) * MODELS["beta"][1] / MODELS["gamma"][1]
    desc = build_encoder(router.hparams.encoder).encode([held["info"]["feature"]])[0]
    col = router.add_model("beta", desc, observed, cost_per_call=cost)
    assert col == 3 and router.hparams.models[-1] == "beta"

    x, task = dm.splits["test"].tensors["x"], dm.splits["test"].tensors["task"]
    with torch.no_grad():
        perf_hat, _ = router.predict(x, task)
    geo, ari = test.tasks == "geography", test.tasks == "arithmetic"
    assert perf_hat[geo, col].mean() > perf_hat[ari, col].mean() + 0.25
    # routing with beta beats routing without it
    beta_scores = [[held["test"][q]] for q in test.queries]
    actual = np.concatenate([np.nan_to_num(test.performance), beta_scores], axis=1)
    rows_ = np.arange(len(actual))
    without = actual[rows_, perf_hat[:, :col].argmax(1).numpy()].mean()
    with_beta = actual[rows_, perf_hat.argmax(1).numpy()].mean()
    assert with_beta > without + 0.03, (with_beta, without)
    # the extended router saves and routes from its checkpoint alone
    again = Router.load(router.save(tmp_path / "with_beta.ckpt"))
    assert again.models == ["alpha", "gamma", "delta", "beta"]
    torch.testing.assert_close(again.module.predict(x, task)[0], perf_hat)


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    cfg = compose_recipe("router_graph", planted_overrides(tmp_path, "logger=none"))
    dm = instantiate(cfg.datamodule, _convert_="all")
    dm.setup()
    model = instantiate(cfg.model, **dm.model_kwargs(), _convert_="all")
    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "graph.ckpt"
    trainer.save_checkpoint(path)
    loaded = GraphRouter.load_from_checkpoint(path, map_location="cpu").eval()
    model.eval()
    x, task = dm.splits["test"].tensors["x"], dm.splits["test"].tensors["task"]
    with torch.no_grad():
        for a, b in zip(model.predict(x, task), loaded.predict(x, task), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(loaded.ctx_x) == len(dm.splits["train"]) and loaded.hparams.models == model.hparams.models
    routed = Router.load(path).route(["which river crosses the capital city"], tasks=["geography"])
    assert routed.models == ["beta"]


def test_recipe_smoke_runs_on_the_synthetic_default(tmp_path: Path) -> None:
    cfg = compose_recipe("router_graph", [
        "data.synthetic.n_queries=240", "data.synthetic.models=6", "datamodule.encoder=hashing",
        f"datamodule.embedding_cache={tmp_path / 'c'}", f"run_dir={tmp_path / 'run'}",
        "+trainer.fast_dev_run=true"])
    assert cfg.description.startswith("Query-level fusion - ")
    summary = fit(cfg)
    assert "test/perf" in summary["metrics"] and "test/gap_closed" in summary["metrics"]
