"""Off-policy estimators (fusion_lightning.query.ope): hand-computed values, unbiasedness on a planted
bandit, DR = DM when the reward model is exact, and cross-fitting that never lets a call score itself."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_lightning.data.bandit import draw, logging_probabilities
from fusion_lightning.query.metrics import RoutingArrays, per_query_reward, pseudo_values
from fusion_lightning.query.ope import (
    Bootstrap,
    cross_fit_rewards,
    effective_sample_size,
    estimate_all,
    one_hot,
    per_query_terms,
    support,
)

# three queries, two models; query 0 logged model 0 (p = 0.5), query 1 model 1 (p = 0.25), query 2 model 0 (p = 0.8)
MASK = np.array([[1, 0], [0, 1], [1, 0]], bool)
PROP = np.array([[0.5, np.nan], [np.nan, 0.25], [0.8, np.nan]])
Y = np.array([[1.0, np.nan], [np.nan, 1.0], [0.0, np.nan]])
Y_HAT = np.array([[0.6, 0.2], [0.4, 0.5], [0.3, 0.9]])
TARGET = one_hot(np.array([0, 1, 1]), 2)  # agrees with the logger on queries 0 and 1


def _value(terms):
    num, den = terms
    return num.sum() / (len(num) if den is None else den.sum())


def test_estimators_match_hand_computed_values():
    t = per_query_terms(TARGET, Y, Y_HAT, MASK, PROP)
    # IPS: (1/0.5 + 1/0.25 + 0) / 3 = 2
    assert _value(t["ips"]) == pytest.approx((1 / 0.5 + 1 / 0.25) / 3)
    # SNIPS: (2 + 4) / (2 + 4 + 0) = 1
    assert _value(t["snips"]) == pytest.approx(1.0)
    # naive: mean observed outcome where the target agrees with the logger: (1 + 1) / 2
    assert _value(t["naive"]) == pytest.approx(1.0)
    # DM: (0.6 + 0.5 + 0.9) / 3
    assert _value(t["dm"]) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    # DR: DM + ((1 - 0.6)/0.5 + (1 - 0.5)/0.25 + 0) / 3
    assert _value(t["dr"]) == pytest.approx((0.6 + 0.5 + 0.9 + 0.4 / 0.5 + 0.5 / 0.25) / 3)
    # the pseudo-value matrix gives the same DR estimate at the target's choices
    g = pseudo_values(Y, Y_HAT, MASK, PROP)
    assert g[[0, 1, 2], [0, 1, 1]].mean() == pytest.approx(_value(t["dr"]))
    # ESS: weights per query 2, 4, 0 -> 6² / (4 + 16)
    assert effective_sample_size(TARGET, MASK, PROP) == pytest.approx(36 / 20)


def test_stochastic_target_and_missing_propensity():
    uniform = np.full((3, 2), 0.5)
    t = per_query_terms(uniform, Y, None, MASK, PROP)
    assert _value(t["ips"]) == pytest.approx((0.5 / 0.5 + 0.5 / 0.25) / 3)
    assert "dr" not in t  # no reward model, no DR
    with pytest.raises(ValueError, match="propensity"):
        per_query_terms(TARGET, Y, None, MASK, np.where(MASK, np.nan, np.nan))


def test_dr_equals_dm_when_the_reward_model_is_exact_and_propensities_uniform():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 4))
    mask = one_hot(rng.integers(0, 4, 200), 4).astype(bool)
    prop = np.where(mask, 0.25, np.nan)
    target = one_hot(rng.integers(0, 4, 200), 4)
    t = per_query_terms(target, np.where(mask, truth, np.nan), truth, mask, prop)
    assert _value(t["dr"]) == pytest.approx(_value(t["dm"]))
    assert _value(t["dm"]) == pytest.approx((target * truth).sum(1).mean())


def _planted(n=1500, m=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    p_true = 1 / (1 + np.exp(-(x[:, :m] * np.array([1.5, -1.5, 0.3]))))
    return x, p_true


def test_unbiased_on_a_planted_bandit_under_a_skewed_logger():
    """Over many seeds IPS, SNIPS and DR average to the truth; the naive mean does not (the logger sends
    model 0 where it is good, so its observed mean flatters it)."""
    x, p_true = _planted()
    n, m = p_true.shape
    probs = logging_probabilities(np.stack([x[:, 0], -x[:, 0], np.zeros(n)], 1), np.ones((n, m), bool), epsilon=0.3)
    target = one_hot(np.zeros(n, int), m)  # always model 0
    truth = p_true[:, 0].mean()
    tasks = np.zeros(n, int)
    values = {k: [] for k in ("naive", "ips", "snips", "dr")}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        y_full = (rng.random((n, m)) < p_true).astype(float)
        mask = one_hot(draw(probs, rng), m).astype(bool)
        prop, y = np.where(mask, probs, np.nan), np.where(mask, y_full, np.nan)
        y_hat = cross_fit_rewards(x, tasks, {"perf": y}, mask, np.full(n, "test"), seed=seed)["perf"]
        est = estimate_all(target, y, y_hat, mask, prop, Bootstrap(n, 0))
        for k in values:
            values[k].append(est[k].value)
    mean = {k: float(np.mean(v)) for k, v in values.items()}
    se = {k: float(np.std(v, ddof=1) / np.sqrt(len(v))) for k, v in values.items()}
    for k in ("ips", "snips", "dr"):
        assert abs(mean[k] - truth) < 4 * se[k] + 0.005, (k, mean[k], truth)
    assert mean["naive"] - truth > 0.1  # selection bias, shown
    assert np.std(values["dr"]) < np.std(values["ips"])  # the reward model lowers the variance


def test_bootstrap_intervals_cover_and_are_paired():
    rng = np.random.default_rng(1)
    num = rng.random(500)
    boot = Bootstrap(500, 400, seed=0)
    e = boot.estimate(num)
    assert e.lo < num.mean() < e.hi and e.se == pytest.approx(num.std() / np.sqrt(500), rel=0.2)
    assert boot.estimate(num - num).lo == 0.0 == boot.estimate(num - num).hi  # same resamples for both


def test_cross_fitting_never_scores_a_call_with_a_model_that_saw_it():
    """Changing a query's own logged outcome leaves its prediction unchanged (it was not in the fit), and a
    train query's prediction ignores val and test outcomes (no split learns from a later one)."""
    rng = np.random.default_rng(0)
    n, m = 60, 2
    x, tasks = rng.normal(size=(n, 5)), rng.integers(0, 2, n)
    mask = np.ones((n, m), bool)
    y = rng.random((n, m))
    splits = np.array(["train"] * 30 + ["val"] * 15 + ["test"] * 15)
    base = cross_fit_rewards(x, tasks, {"perf": y}, mask, splits, folds=3)["perf"]
    for i in (3, 35, 50):
        y2 = y.copy()
        y2[i] += 10.0
        again = cross_fit_rewards(x, tasks, {"perf": y2}, mask, splits, folds=3)["perf"]
        assert again[i] == pytest.approx(base[i])  # its own outcome never reaches its prediction
        assert not np.allclose(again, base)  # but it does reach other queries' predictions
    y3 = y.copy()
    y3[30:] += 10.0  # val and test outcomes
    again = cross_fit_rewards(x, tasks, {"perf": y3}, mask, splits, folds=3)["perf"]
    assert np.allclose(again[:30], base[:30])


def test_support_flags_models_the_logger_never_chose():
    target = one_hot(np.array([0, 1, 1, 0]), 2)
    share = {("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 0.995, ("b", 1): 0.005}
    s = support(target, np.array(["a", "a", "b", "b"], dtype=object), share)
    assert s == {"unsupported": 0.25, "rare": 0.25}


def test_selection_on_a_bandit_split_reads_dr_terms_not_the_observed_mean():
    """per_query_reward (router_auto's and the residual router's selection) on a bandit split returns each
    query's DR term, whose mean is the DR estimate."""
    perf = np.nan_to_num(Y)
    a = RoutingArrays(perf, np.zeros_like(perf), perf, np.zeros_like(perf), MASK, np.zeros(3, int),
                      propensity=np.where(MASK, PROP, 1.0),
                      predicted={"perf": Y_HAT, "cost": np.zeros_like(Y_HAT), "perf_n": Y_HAT,
                                 "cost_n": np.zeros_like(Y_HAT)})
    scores = TARGET  # argmax: the target's choices
    r = per_query_reward(scores, a, "performance_first")
    assert r.mean() == pytest.approx(_value(per_query_terms(TARGET, Y, Y_HAT, MASK, PROP)["dr"]))
