"""The Bradley–Terry / Elo router (query/routers/bt.py): ratings recover planted strengths, agree with RouteLLM's
fit, the similarity-weighted variant learns a rule that depends on the query, and `router_bt` runs end to end
on a Chatbot Arena-shaped preference file and on pairs derived from scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.matrix import QueryMatrix
from fusion_lightning.data.preferences import PreferenceTable
from fusion_lightning.fit import fit
from fusion_lightning.query.routers.bt import (
    ELO_SCALE,
    BTRouter,
    fit_bt,
    pairwise_metrics,
    similarity_weights,
    win_rates,
)


def _battles(strength: np.ndarray, n: int, seed: int, tie_rate: float = 0.1) -> tuple[np.ndarray, ...]:
    """Random pairs; a wins with probability sigmoid(s_a - s_b); a share of battles are ties."""
    rng = np.random.default_rng(seed)
    m = len(strength)
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    p = 1 / (1 + np.exp(-(strength[a] - strength[b])))
    y = (rng.random(n) < p).astype(np.float32)
    y[rng.random(n) < tie_rate] = 0.5
    return a, b, y


def _wins(a, b, y, m: int) -> torch.Tensor:
    w = np.zeros((m, m), np.float32)
    np.add.at(w, (a, b), y)
    np.add.at(w, (b, a), 1 - y)
    return torch.from_numpy(w)


def test_ratings_recover_a_planted_ranking_from_simulated_battles() -> None:
    strength = np.array([1.5, -0.5, 0.8, 0.0, -1.2, 0.3])
    a, b, y = _battles(strength, 6000, seed=0)
    r = fit_bt(_wins(a, b, y, 6), l2=1.0).numpy()
    assert list(np.argsort(-r)) == list(np.argsort(-strength))  # the exact order (Kendall tau = 1)
    # without ties (random ties shrink every gap), the strengths themselves, in log-odds
    a0, b0, y0 = _battles(strength, 6000, seed=0, tie_rate=0.0)
    r0 = fit_bt(_wins(a0, b0, y0, 6), l2=1.0).numpy()
    assert np.abs(r0 - (strength - strength.mean())).max() < 0.15
    # at the optimum the gradient of the penalised log-likelihood vanishes
    w = _wins(a, b, y, 6).double()
    rt = torch.from_numpy(r).double()
    p = torch.sigmoid(rt[:, None] - rt[None, :])
    grad = ((w + w.T) * p - w).sum(1) + rt
    assert grad.abs().max() < 1e-3


def test_ties_are_half_wins_and_the_prior_keeps_an_unbeaten_model_finite() -> None:
    only_ties = torch.tensor([[0.0, 5.0], [5.0, 0.0]])  # 10 ties: half a win each, for each side
    assert torch.allclose(fit_bt(only_ties), torch.zeros(2), atol=1e-6)
    # 3 wins and 3 ties against one model: a 75% win rate, so sigmoid(r_0 - r_1) -> 0.75 as the prior fades
    r = fit_bt(torch.tensor([[0.0, 4.5], [1.5, 0.0]]), l2=1e-6)
    assert float(torch.sigmoid(r[0] - r[1])) == pytest.approx(0.75, abs=1e-4)
    unbeaten = fit_bt(torch.tensor([[0.0, 50.0], [0.0, 0.0]]), l2=1.0)
    assert torch.isfinite(unbeaten).all() and unbeaten[0] > 1.5 > -1.5 > unbeaten[1]
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_bt(only_ties, l2=0.0)


def test_elo_agrees_with_routellms_logistic_regression_fit() -> None:
    """RouteLLM (routellm/routers/similarity_weighted/utils.py, compute_elo_mle_with_tie): sklearn logistic
    regression without penalty (penalty=None there, C=inf here) on the duplicated battles, X = ±log(10), Elo = 400 · coef + 1000."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    strength = np.array([0.9, 0.0, -0.6, 0.4])
    a, b, y = _battles(strength, 3000, seed=1, tie_rate=0.2)
    n = len(a)
    X = np.zeros((2 * n, 4))
    X[np.arange(2 * n), np.r_[a, a]] = np.log(10)
    X[np.arange(2 * n), np.r_[b, b]] = -np.log(10)
    Y = np.r_[(y == 1.0), (y == 1.0) | (y == 0.5)].astype(float)  # a tie: one A win in the first copy
    coef = sklearn.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=1000).fit(X, Y).coef_[0]
    theirs = 400 * coef
    ours = ELO_SCALE * fit_bt(_wins(a, b, y, 4), l2=1e-6).numpy()
    np.testing.assert_allclose(ours - ours.mean(), theirs - theirs.mean(), atol=0.5)  # Elo points


def test_win_rates_and_routellms_similarity_weights() -> None:
    r = torch.tensor([[0.0, np.log(3.0)]])
    np.testing.assert_allclose(win_rates(r).numpy(), [[0.25, 0.75]], atol=1e-6)  # two models: sigmoid(r_1 - r_0)
    sim = torch.tensor([[0.2, 0.5, 1.0]])
    np.testing.assert_allclose(similarity_weights(sim).numpy(), 10 ** (np.array([[0.2, 0.5, 1.0]]) / 1.0), rtol=1e-6)


def _cluster_battles(seed: int, n_prompts: int = 120):
    """Prompts in two embedding clusters: model 0 beats model 1 on cluster A 90% of the time, model 1 beats
    model 0 on cluster B; model 2 loses to both (so the global ranking has one model on top for everyone)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:2] * 3
    cluster = np.arange(n_prompts) % 2
    keys = centres[cluster] + rng.normal(0, 0.5, (n_prompts, 8))
    wins = np.zeros((n_prompts, 3, 3), np.float32)
    for q in range(n_prompts):
        p01 = 0.9 if cluster[q] == 0 else 0.1
        w = float(rng.random() < p01)
        wins[q, 0, 1], wins[q, 1, 0] = w, 1 - w
        wins[q, 0, 2] = wins[q, 1, 2] = 1.0  # 0 and 1 both beat 2
    return torch.from_numpy(keys).float(), torch.from_numpy(wins), centres, cluster


def _router(variant: str) -> BTRouter:
    return BTRouter(embed_dim=8, models=["a", "b", "c"], tasks=["<unk>"], binary=False, encoder="x",
                    normaliser={}, model_sizes=[None] * 3, variant=variant)


def test_similarity_weighted_ratings_learn_a_rule_that_depends_on_the_query_cluster() -> None:
    keys, wins, centres, _ = _cluster_battles(seed=0)
    rng = np.random.default_rng(1)
    cluster = np.arange(200) % 2
    queries = torch.from_numpy(centres[cluster] + rng.normal(0, 0.5, (200, 8))).float()
    sw, glob = _router("sw"), _router("global")
    for r in (sw, glob):
        r.fit_battles(wins, keys)
    choice = sw.predict(queries, torch.zeros(200, dtype=torch.long))[0].argmax(1).numpy()
    assert (choice == cluster).mean() > 0.95  # model 0 on cluster A, model 1 on cluster B
    g = glob.predict(queries, torch.zeros(200, dtype=torch.long))[0].argmax(1).numpy()
    assert len(set(g.tolist())) == 1 and (g == cluster).mean() == 0.5  # one model for every query
    # the held-out battle metrics see the difference
    test_keys, test_wins, _, test_cluster = _cluster_battles(seed=2, n_prompts=100)
    qi, ai, bi = np.nonzero(test_wins.numpy())
    pairs = PreferenceTable(np.arange(100), [""] * 100, np.array([""] * 100), np.array(["test"] * 100), ["a", "b", "c"],
                            qi.astype(np.int32), ai.astype(np.int32), bi.astype(np.int32), np.ones(len(qi), np.float32))
    m = pairwise_metrics(sw.query_ratings(test_keys), pairs, sw.ratings)
    assert m["pairwise_acc"] > 0.95 and m["global/pairwise_acc"] < 0.9  # global: half of the a-vs-b battles
    assert m["chosen_win_rate"] > m["best_single/chosen_win_rate"]


def test_pairs_from_scores_win_lose_tie_and_margin() -> None:
    perf = np.array([[1.0, 0.0, 1.0], [0.5, 0.45, np.nan]], np.float32)
    mask = ~np.isnan(perf)
    qm = QueryMatrix(np.array(["q0", "q1"], object), ["x", "y"], np.array(["t", "t"]), np.array(["t", "t"]),
                     np.array(["train", "train"]), ["m0", "m1", "m2"], perf, perf * 0, perf * np.nan, mask)
    t = PreferenceTable.from_scores(qm)
    got = {(int(q), t.models[a], t.models[b]): float(y) for q, a, b, y in zip(t.query, t.a, t.b, t.outcome, strict=True)}
    assert got == {(0, "m0", "m1"): 1.0, (0, "m0", "m2"): 0.5, (0, "m1", "m2"): 0.0, (1, "m0", "m1"): 1.0}
    assert t.pairs_from == "scores"
    assert float(PreferenceTable.from_scores(qm, tie_margin=0.1).outcome[-1]) == 0.5
    w = t.wins()
    assert w.shape == (2, 3, 3) and w[0, 0, 2] == w[0, 2, 0] == 0.5 and w[0].sum() == 3


def test_router_bt_on_a_score_log_trains_on_derived_pairs_and_says_so(tmp_path: Path) -> None:
    """The planted LLMRouter-format log: pairs from scores, the shared routing evaluation and the battles'."""
    summary = fit(compose_recipe("router_bt", planted_overrides(tmp_path, "logger=none")))
    assert summary["pairs_from"] == "scores" and summary["bt"]["variant"] == "sw"
    m = summary["metrics"]
    assert m["test/perf"] > m["test/best_single/perf"]  # reads the query: beats the best single model
    assert m["test/pairwise_acc"] > m["test/global/pairwise_acc"]
    assert summary["data"]["train_battles"] == summary["bt"]["train_battles"] > 0
    notes = json.loads((tmp_path / "run" / "data_report.json").read_text())["notes"]
    assert any("pairs_from: scores" in n for n in notes)
    assert (tmp_path / "run" / "routing_table.md").is_file()
