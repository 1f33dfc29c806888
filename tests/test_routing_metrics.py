"""Routing metrics and baselines on hand-made arrays, and the router DataModule on the synthetic default."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.query.datamodule import RouterDataModule
from fusion_lightning.query.metrics import (
    RoutingArrays,
    baseline_choices,
    choose,
    gap_closed,
    routing_metrics,
)
from fusion_lightning.query.routers.mlp import MLPRouter

nan = np.nan
SIZES = [7.0, 70.0, None]  # model 1 is the largest; model 2's size is unknown
COST = np.array([1.0, 5.0, 3.0])  # raw USD per call of each model; normalised: 0, 1, 0.5
COST_N = np.array([0.0, 1.0, 0.5])


def arrays(perf: list[list[float]], tasks: list[int]) -> RoutingArrays:
    """perf == perf_n (every task spans 0..1); each model costs the same on every query; NaN = no call."""
    p = np.array(perf, float)
    mask = ~np.isnan(p)
    cost = np.where(mask, COST, nan)
    cost_n = np.where(mask, COST_N, nan)
    return RoutingArrays(p, cost, p.copy(), cost_n, mask, np.array(tasks))


@pytest.fixture
def train() -> RoutingArrays:
    # task 0: model means [1, 0, 1] (model 2 has no call on the first query) -> task-best 0 (tie, lower index)
    # task 1: model means [0, 1, 1/3] -> task-best 1;  overall [2/5, 3/5, 2/4] -> best single 1
    return arrays([[1, 0, nan], [1, 0, 1], [0, 1, 0], [0, 1, 0], [0, 1, 1]], [0, 0, 1, 1, 1])


@pytest.fixture
def ev() -> RoutingArrays:
    # task 2 never occurs in train; the last query has no call of model 2
    return arrays([[1, 0, 0], [0, 1, 1], [1, 0, nan]], [0, 1, 2])


def test_choose_respects_the_mask_and_breaks_ties_toward_the_lower_index():
    scores = np.array([[0.5, 0.9, 0.9], [0.3, 0.3, 0.1], [0.2, 0.9, 0.4], [nan, 0.1, 0.0]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [0, 1, 1]], bool)
    np.testing.assert_array_equal(choose(scores, mask), [1, 0, 2, 1])


def test_baselines_by_hand(train, ev):
    b = baseline_choices(train, ev, "performance_first", SIZES)
    assert set(b) == {"best_single", "task_best", "oracle", "cheapest", "largest"}
    np.testing.assert_array_equal(b["best_single"], [1, 1, 1])
    np.testing.assert_array_equal(b["task_best"], [0, 1, 1])  # unseen task 2 falls back to best single
    np.testing.assert_array_equal(b["oracle"], [0, 2, 0])  # query 2: models 1 and 2 tie, 2 is cheaper
    np.testing.assert_array_equal(b["cheapest"], [0, 0, 0])
    np.testing.assert_array_equal(b["largest"], [1, 1, 1])


def test_baselines_follow_the_reward_setting(train, ev):
    # cost_first = 0.2·perf − 0.8·cost: train means [0.08, 0.12 − 0.8, 0.1 − 0.4] -> the cheap model 0
    b = baseline_choices(train, ev, "cost_first", SIZES)
    np.testing.assert_array_equal(b["best_single"], [0, 0, 0])
    np.testing.assert_array_equal(b["task_best"], [0, 0, 0])  # task 1: [0, 0.2 − 0.8, 0.2/3 − 0.4]
    np.testing.assert_array_equal(b["oracle"], [0, 0, 0])  # query 2: [0, −0.6, −0.2]


def test_largest_falls_back_to_the_most_expensive_model_without_sizes(train, ev):
    b = baseline_choices(train, ev, "performance_first", [None, None, None])
    np.testing.assert_array_equal(b["largest"], [1, 1, 1])


@pytest.mark.parametrize("router, best, oracle, expected", [
    (0.7, 0.6, 0.8, 0.5),
    (0.8, 0.6, 0.8, 1.0),
    (0.5, 0.6, 0.8, -0.5),
    (0.6, 0.6, 0.6, 0.0),  # zero gap
    (0.9, 0.6, 0.6, 0.0),
    (0.9, 0.6, 0.5, 0.0),  # the oracle below best single (should not happen): no gap to close
])
def test_gap_closed_by_hand(router, best, oracle, expected):
    assert gap_closed(router, best, oracle) == pytest.approx(expected)


def test_routing_metrics_by_hand(train, ev):
    # the router picks models [0, 1, 1]: perf 1, 1, 0 and cost 1, 5, 5
    scores = np.array([[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.7, 0.9]])  # 0.9 is masked on query 3
    out = routing_metrics({s: scores for s in REWARD_SETTINGS}, train, ev, SIZES)
    baselines = ("best_single", "task_best", "oracle", "random", "cheapest", "largest")
    for k in ("perf", "cost", "reward"):
        assert k in out
        for s in REWARD_SETTINGS:
            assert f"{s}/{k}" in out
            assert all(f"{s}/{b}/{k}" in out for b in baselines)
        assert all(f"{b}/{k}" in out for b in baselines)
    assert out["perf"] == pytest.approx(2 / 3) and out["cost"] == pytest.approx(11 / 3)
    assert out["reward"] == pytest.approx(2 / 3)  # performance_first: reward == perf_n == perf here
    assert out["best_single/perf"] == pytest.approx(1 / 3) and out["best_single/cost"] == pytest.approx(5.0)
    assert out["task_best/perf"] == pytest.approx(2 / 3) and out["task_best/cost"] == pytest.approx(11 / 3)
    assert out["oracle/perf"] == pytest.approx(1.0) and out["oracle/cost"] == pytest.approx(5 / 3)
    assert out["cheapest/perf"] == pytest.approx(2 / 3) and out["cheapest/cost"] == pytest.approx(1.0)
    assert out["largest/perf"] == pytest.approx(1 / 3)
    # random: mean over the models each query has, then over queries: perf (1/3 + 2/3 + 1/2) / 3
    assert out["random/perf"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["random/cost"] == pytest.approx((3 + 3 + 3) / 3)
    assert out["balance/random/reward"] == pytest.approx(np.mean([
        np.mean(0.5 * np.array(p) - 0.5 * COST_N[: len(p)]) for p in ([1, 0, 0], [0, 1, 1], [1, 0])]))
    assert out["gap_closed"] == pytest.approx((2 / 3 - 1 / 3) / (1 - 1 / 3))
    assert all(np.isfinite(v) for v in out.values())


def test_routing_metrics_use_only_the_settings_the_router_scores(train, ev):
    out = routing_metrics({"performance_first": ev.perf_n}, train, ev, SIZES)
    assert not any(k.startswith(("balance/", "cost_first/")) for k in out)
    assert out["gap_closed"] == pytest.approx(1.0)  # scores = true rewards: the router is the oracle


# the synthetic default through the router DataModule ----------------------------------------------
SYNTH = {"format": "synthetic", "synthetic": {"n_queries": 200, "models": 6, "seed": 0}}


def test_router_datamodule_on_the_synthetic_default(tmp_path):
    dm = RouterDataModule(data=SYNTH, encoder="hashing", embedding_cache=str(tmp_path), batch_size=32)
    dm.setup("fit")
    sizes = {s: len(dm.splits[s]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 200 and all(n > 0 for n in sizes.values())
    assert sizes["test"] == pytest.approx(40, abs=8) and sizes["val"] == pytest.approx(20, abs=8)
    kw = dm.model_kwargs()
    for split, n in sizes.items():
        t = dm.splits[split].tensors
        assert t["x"].shape == (n, kw["embed_dim"]) and t["x"].dtype == torch.float32
        assert t["task"].shape == (n,) and t["task"].dtype == torch.long
        for k in ("perf", "perf_n", "cost", "cost_n", "mask"):
            assert t[k].shape == (n, 6), k
        assert t["mask"].all()
        assert torch.isfinite(t["perf_n"]).all() and torch.isfinite(t["cost_n"]).all()
    tr = dm.splits["train"].tensors
    assert tr["perf_n"].min() >= 0 and tr["perf_n"].max() <= 1 and tr["cost_n"].max() <= 1
    assert (tr["task"] > 0).all()  # every train query's task is known (index 0 is <unk>)

    needed = {n for n, p in inspect.signature(MLPRouter.__init__).parameters.items()
              if n != "self" and p.default is inspect.Parameter.empty}
    assert needed <= set(kw)
    assert len(kw["models"]) == 6 and len(kw["model_sizes"]) == 6 and kw["tasks"][0] == "<unk>"
    assert kw["encoder"] == "hashing-256" and kw["embed_dim"] == 256
    batch = next(iter(dm.val_dataloader()))
    perf_hat, cost_hat = MLPRouter(**kw).predict(batch["x"], batch["task"])
    assert perf_hat.shape == cost_hat.shape == (min(32, sizes["val"]), 6)


def test_a_second_datamodule_with_the_same_cache_re_embeds_nothing(tmp_path):
    first = RouterDataModule(data=SYNTH, encoder="hashing", embedding_cache=str(tmp_path))
    first.setup()
    shards = sorted(p.name for p in tmp_path.rglob("shard-*.npz"))
    assert len(shards) == 1
    second = RouterDataModule(data=SYNTH, encoder="hashing", embedding_cache=str(tmp_path))
    second.setup()
    assert sorted(p.name for p in tmp_path.rglob("shard-*.npz")) == shards
    for s in ("train", "val", "test"):
        assert torch.equal(first.splits[s].tensors["x"], second.splits[s].tensors["x"])
