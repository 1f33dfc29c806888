"""RouterDC and the cascade: each learns a planted rule, the losses and the cascade's accounting by hand."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from planted import planted_overrides, write_cascade_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.metrics import RoutingArrays
from fusion_lightning.query.router import load_router_module
from fusion_lightning.query.routers.cascade import GRID, cascade_outcome, run_cascade
from fusion_lightning.query.routers.dc import group_contrastive_loss, kmeans, sample_llm_loss


# RouterDC -------------------------------------------------------------------------------------
def test_dc_learns_the_planted_rule(tmp_path: Path) -> None:
    cfg = compose_recipe("router_dc", planted_overrides(tmp_path, "trainer.max_epochs=15", "callbacks=none",
                                                        "logger=none"))
    s = fit(cfg)
    m = s["metrics"]
    assert m["test/perf"] >= m["test/best_single/perf"] + 0.1, m
    assert m["test/gap_closed"] >= 0.5, m
    router = load_router_module(tmp_path / "run" / s["artifacts"]["best_checkpoint"])
    assert router.centroids.shape == (5, 256)  # the k-means centroids ride in the checkpoint
    perf, cost = router.predict(torch.randn(3, 256), torch.zeros(3, dtype=torch.long))
    assert perf.shape == cost.shape == (3, 4) and bool(((perf > 0) & (perf < 1)).all())


def test_sample_llm_loss_by_hand() -> None:
    score = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    perf = torch.tensor([[1.0, 0.0, 0.0, 0.9]])
    mask = torch.tensor([[True, True, True, False]])
    # top_k=1: positive model 0; last_k=3 lowest observed: models 1, 2 (3 is not logged, never a negative)
    want = -torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), 0)[0]
    torch.testing.assert_close(sample_llm_loss(score, perf, mask, top_k=1, last_k=3), want)
    # a negative scoring > 0.5 is not a negative; the second positive (score 0) contributes nothing
    perf2 = torch.tensor([[1.0, 0.8, 0.0, 0.0]])
    mask2 = torch.ones(1, 4, dtype=torch.bool)
    want2 = -torch.log_softmax(torch.tensor([2.0, 0.0, -1.0]), 0)[0]  # model 0 vs models 2, 3
    want2 = want2 - torch.log_softmax(torch.tensor([1.0, 0.0, -1.0]), 0)[0]  # model 1 (0.8 > 0) vs 2, 3
    torch.testing.assert_close(sample_llm_loss(score, perf2, mask2, top_k=3, last_k=3), want2)


def test_group_contrastive_loss_by_hand() -> None:
    h = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    groups = torch.tensor([0, 0, 1, 1])
    # negatives=2: each query's one same-group partner against exactly the two other-group queries
    hn = torch.nn.functional.normalize(h, dim=-1)
    sim = hn @ hn.T
    rows = [(0, 1, [2, 3]), (1, 0, [2, 3]), (2, 3, [0, 1]), (3, 2, [0, 1])]
    want = torch.stack([-torch.log_softmax(torch.stack([sim[a, p], *sim[a, n]]), 0)[0] for a, p, n in rows]).mean()
    torch.testing.assert_close(group_contrastive_loss(h, groups, negatives=2), want)
    assert float(group_contrastive_loss(h, groups, negatives=3)) == 0.0  # no query has three negatives


def test_kmeans_finds_two_obvious_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([5.0, 0.0]) + 0.1 * torch.randn(20, 2, generator=g),
                   torch.tensor([0.0, 5.0]) + 0.1 * torch.randn(20, 2, generator=g)])
    c = kmeans(x, 2)
    assign = (torch.nn.functional.normalize(x, dim=-1) @ c.T).argmax(1)
    assert len(set(assign[:20].tolist())) == 1 and len(set(assign[20:].tolist())) == 1
    assert assign[0] != assign[20]


# the cascade ---------------------------------------------------------------------------------
def _hand_cascade() -> tuple[np.ndarray, np.ndarray, np.ndarray, RoutingArrays]:
    """Six queries, three models costing 1, 10 and 100 per call, chain cheapest first."""
    quality = np.array([[0.9, 0, 0], [0.2, 0.8, 0], [0.2, 0.3, 0.1], [0.2, 0, 0.9], [0.1, 0.2, 0], [0, 0, 0]])
    logged = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)
    scored = logged.copy()
    scored[3, 1] = False  # query 3: model 1's call is logged without its response
    scored[5] = False  # query 5: no response at all
    cost = np.tile([1.0, 10.0, 100.0], (6, 1))
    perf = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0]], float)
    ev = RoutingArrays(perf, cost, perf, cost / 100.0, logged, np.zeros(6, np.int64))
    return quality, scored, logged, ev


def test_cascade_cost_counts_every_call() -> None:
    quality, scored, logged, ev = _hand_cascade()
    accepted, called = run_cascade(quality, scored, logged, [0, 1, 2], threshold=0.5)
    # q0 accepted at 0 (0.9); q1 at 1 (0.2 rejected, 0.8 accepted); q2 rejected twice, the last accepted;
    # q3 skips model 1 (no response) and ends at 2; q4's last scored model is 1: accepted at 0.2;
    # q5 has nothing to score: its first logged chain model, once
    assert accepted.tolist() == [0, 1, 2, 2, 1, 0]
    per_query = [1, 1 + 10, 1 + 10 + 100, 1 + 100, 1 + 10, 1]
    assert np.where(called, ev.cost, 0).sum(1).tolist() == per_query
    out = cascade_outcome(accepted, called, ev, "balance")
    assert out["cost"] == pytest.approx(np.mean(per_query))  # 39.17, not the accepted calls' 35.33
    assert out["perf"] == pytest.approx(np.mean([1, 1, 1, 0, 1, 1]))
    assert out["calls"] == pytest.approx(np.mean([1, 2, 3, 2, 2, 1]))
    want = np.mean([0.5 * p - 0.5 * c / 100 for p, c in zip([1, 1, 1, 0, 1, 1], per_query, strict=True)])
    assert out["reward"] == pytest.approx(want)
    # threshold 0: every query stops at its first call; inf: every scored model is called
    first, called0 = run_cascade(quality, scored, logged, [0, 1, 2], threshold=0.0)
    assert first.tolist() == [0] * 6 and called0.sum() == 6
    _, called_all = run_cascade(quality, scored, logged, [0, 1, 2], threshold=math.inf)
    assert np.where(called_all, ev.cost, 0).sum(1).tolist() == [111, 111, 111, 101, 11, 1]


def _cascade_overrides(tmp_path: Path, *extra: str) -> list[str]:
    folder = write_cascade_logs(tmp_path / "log")
    return ["data=routellm", f"data.path={folder}", f"data.catalog={folder / 'catalog.json'}",
            "datamodule.encoder=hashing", f"datamodule.embedding_cache={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}", "logger=none", "callbacks.progress_bar=null", *extra]


def test_cascade_learns_the_planted_rule_and_pays_for_every_call(tmp_path: Path) -> None:
    s = fit(compose_recipe("router_cascade", _cascade_overrides(tmp_path, "trainer.max_epochs=20")))
    m = s["metrics"]
    # strong alone is the best single; the cascade accepts cheap's right answers and escalates the rest
    assert m["test/perf"] >= m["test/best_single/perf"] + 0.05, m
    assert 0.3 <= m["test/cascade/first_accepted"] <= 0.7, m
    assert m["test/cost"] <= 0.75 * m["test/best_single/cost"], m
    # every query calls cheap; the escalated ones pay strong on top
    assert m["test/cost"] > m["test/cheapest/cost"] + (1 - m["test/cascade/first_accepted"]) * 0.5 * m[
        "test/best_single/cost"], m
    assert m["test/cascade/calls"] == pytest.approx(2 - m["test/cascade/first_accepted"])
    # RouteLLM's view (strong = the escalation): the scorer knows which cheap answers are right, so the
    # strong/weak gap is recovered well above a random router's 0.5, and half of it with few strong calls
    assert m["test/apgr"] > 0.6 and m["test/cpt@50"] < 0.5, m
    assert "test/arena_score" in m
    run = tmp_path / "run"
    with open(run / "routing_table.csv", newline="") as f:
        all_row = [r for r in csv.DictReader(f) if r["task"] == "all"][0]
    assert float(all_row["router_cost"]) == pytest.approx(m["test/cost"])  # the table counts every call too
    with open(run / "threshold_sweep.csv", newline="") as f:
        sweep = list(csv.DictReader(f))
    assert len(sweep) == len(GRID) and float(sweep[0]["calls"]) == 1.0 and float(sweep[-1]["calls"]) == 2.0
    assert float(sweep[-1]["cost"]) > float(sweep[0]["cost"])
    router = load_router_module(run / s["artifacts"]["best_checkpoint"])
    assert router.chain_idx.tolist() == [0, 1]  # cheap first, from the checkpoint alone
    with pytest.raises(RuntimeError, match="needs the responses"):
        router.predict(torch.zeros(1, 256), torch.zeros(1, dtype=torch.long))


def test_cascade_on_a_log_without_responses_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_recipe("router_cascade", planted_overrides(tmp_path, "logger=none", "callbacks=none"))
    with pytest.raises(ValueError, match=r"cascade scores logged responses, but this log \(data.format=llmrouter"):
        fit(cfg)


def test_cascade_chain_names_are_checked(tmp_path: Path) -> None:
    cfg = compose_recipe("router_cascade", _cascade_overrides(tmp_path, "model.chain=[cheap,nope]"))
    with pytest.raises(InstantiationException, match=r"model.chain=\['cheap', 'nope'\].*unknown: \['nope'\]"):
        fit(cfg)
