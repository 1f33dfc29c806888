"""The peers' routing metrics, computed for every router: RouteLLM's APGR and CPT(x%), RouterArena's score.

RouteLLM (lm-sys/RouteLLM) scores a router that sends each query to a *strong* or a *weak* model by
thresholding a per-query "strong win rate". Its sweep is in `routellm/evals/benchmarks.py`
(`Benchmark.evaluate`: thresholds are the bin edges of `pd.qcut(scores, 10)`, a query goes to the strong
model when its score is ≥ the threshold, > for the last edge) and its metrics in
`routellm/evals/evaluate.py` (`generate_results`: `pct_call_metric` is CPT, `auc_metric` and
`apgr_metric` give APGR). The functions below follow that code step by step.

N models. Our routers predict a score per model; the strong/weak pair is
strong = best single (highest mean score on train) and weak = the cheapest other model on train (the
worst-scoring other model when the log has no costs), and the router's strong win score for a query is
its predicted performance of strong minus that of weak. Queries where the log lacks either model are
left out. On a two-model log this is RouteLLM's setting exactly: the sweep's thresholds are quantiles
of the score, so any increasing transform of the score (e.g. a win probability) gives the same curve.

RouterArena (RouteWorks/RouterArena, `llm_evaluation/run.py`, `compute_arena_score` and
`compute_router_metrics`): S = (1+β)·A·C / (β·A + C) with β = 0.1, A the mean accuracy and
C = (log2 c_max − log2 c) / (log2 c_max − log2 c_min), c the mean cost per 1,000 queries in USD clamped
to [c_min, c_max] = [0.0044, 200] (the constants published in that file).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fusion_lightning.query.metrics import RoutingArrays, _masked_mean, costs_known

ARENA_BETA, ARENA_C_MAX, ARENA_C_MIN = 0.1, 200.0, 0.0044  # RouterArena llm_evaluation/run.py
ROUTELLM_NUM_RESULTS = 10  # routellm/evals/evaluate.py --num-results default: 10 qcut bins, 11 thresholds
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy ≥ 2 renamed np.trapz


def strong_weak_pair(train: RoutingArrays) -> tuple[int, int] | None:
    """(strong, weak) column indices: best mean train score; the cheapest other model on train (the
    worst-scoring other one when the log has no costs). None with fewer than two models."""
    m = train.perf.shape[1]
    if m < 2:
        return None
    perf = _masked_mean(train.perf, train.mask)
    strong = int(perf.argmax())
    others = np.array([j for j in range(m) if j != strong])
    key = _masked_mean(train.cost, train.mask) if costs_known(train) else perf
    return strong, int(others[key[others].argmin()])


def strong_win_score(perf_hat: np.ndarray, strong: int, weak: int) -> np.ndarray:
    """[N] the router's strong win score: predicted performance of strong minus that of weak."""
    return perf_hat[:, strong] - perf_hat[:, weak]


def routellm_thresholds(scores: np.ndarray, num_results: int = ROUTELLM_NUM_RESULTS) -> np.ndarray:
    """The bin edges of `pd.qcut(scores, num_results)`: quantiles at 0, 1/n, ..., 1 (linear interpolation,
    as pandas). RouteLLM's qcut raises on repeated edges; repeated edges here just repeat a point."""
    return np.quantile(np.asarray(scores, float), np.linspace(0.0, 1.0, num_results + 1))


def threshold_curve(scores: np.ndarray, strong_perf: np.ndarray, weak_perf: np.ndarray,
                    num_results: int = ROUTELLM_NUM_RESULTS) -> np.ndarray:
    """[K, 2] (share of strong calls, mean performance), one row per threshold, as
    routellm/evals/benchmarks.py `evaluate`: strong where score ≥ threshold (score > the last one)."""
    thresholds = routellm_thresholds(scores, num_results)
    rows = []
    for i, t in enumerate(thresholds):
        sel = scores >= t if i != len(thresholds) - 1 else scores > t
        rows.append((float(sel.mean()), float(np.where(sel, strong_perf, weak_perf).mean())))
    return np.array(rows)


def _sorted(curve: np.ndarray) -> np.ndarray:
    # evaluate.py sorts each method's rows by strong_percentage (equal shares are equal selections here)
    return curve[np.argsort(curve[:, 0], kind="stable")]


def apgr(curve: np.ndarray, strong_acc: float, weak_acc: float) -> float:
    """Average performance gap recovered: (AUC − weak AUC) / (strong AUC − weak AUC), each the trapezoid
    integral over the curve's strong shares (routellm/evals/evaluate.py `auc_metric`, `apgr_metric`)."""
    c = _sorted(curve)
    x = c[:, 0]
    auc = _trapezoid(c[:, 1], x)
    weak_auc = _trapezoid(np.full(len(x), weak_acc), x)
    strong_auc = _trapezoid(np.full(len(x), strong_acc), x)
    return float((auc - weak_auc) / (strong_auc - weak_auc))


def cpt(curve: np.ndarray, strong_acc: float, weak_acc: float, pct: float) -> float:
    """Call-performance threshold: the share of strong calls at which the curve reaches weak + pct·(strong −
    weak), by `np.interp` over the curve sorted by strong share (routellm/evals/evaluate.py
    `pct_call_metric`; like it, exact when performance rises with the share, np.interp's reading otherwise)."""
    c = _sorted(curve)
    return float(np.interp(pct * (strong_acc - weak_acc) + weak_acc, c[:, 1], c[:, 0]))


def arena_score(accuracy: float, cost_per_1k: float, beta: float = ARENA_BETA, c_max: float = ARENA_C_MAX,
                c_min: float = ARENA_C_MIN) -> float:
    """RouterArena's S = (1+β)·A·C / (β·A + C), C the log2-normalised cost per 1,000 queries clamped to
    [c_min, c_max] (RouteWorks/RouterArena llm_evaluation/run.py `compute_arena_score`; a cost of 0 is
    clamped to c_min where that code raises). 0 when A = C = 0."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"RouterArena's score needs an accuracy in [0, 1], got {accuracy}")
    c = min(max(cost_per_1k, c_min), c_max)
    norm = (np.log2(c_max) - np.log2(c)) / (np.log2(c_max) - np.log2(c_min))
    den = beta * accuracy + norm
    return float((1 + beta) * accuracy * norm / den) if den > 0 else 0.0


def strong_weak_metrics(perf_hat: np.ndarray, train: RoutingArrays, ev: RoutingArrays,
                        win_score: Callable[[int, int], np.ndarray] | None = None) -> dict[str, float]:
    """`apgr`, `cpt@50`, `cpt@80` (shares in [0, 1], RouteLLM prints percent) of the router's strong/weak
    threshold sweep, and `strong_weak/strong_perf|weak_perf|queries`. Empty when there is no pair or no
    query has both; APGR and CPT are left out when strong does not beat weak on these queries (no gap).
    `win_score(strong, weak)` -> [N] replaces the predicted-performance difference (the cascade's is how
    unlikely the weak model's logged answer is to be good)."""
    pair = strong_weak_pair(train)
    if pair is None:
        return {}
    s, w = pair
    rows = ev.mask[:, s] & ev.mask[:, w]
    if not rows.any():
        return {}
    sp, wp = ev.perf[rows, s], ev.perf[rows, w]
    out = {"strong_weak/strong_perf": float(sp.mean()), "strong_weak/weak_perf": float(wp.mean()),
           "strong_weak/queries": float(rows.sum())}
    if out["strong_weak/strong_perf"] - out["strong_weak/weak_perf"] <= 1e-12:
        return out
    score = strong_win_score(perf_hat, s, w) if win_score is None else np.asarray(win_score(s, w), float)
    curve = threshold_curve(score[rows], sp, wp)
    a, b = out["strong_weak/strong_perf"], out["strong_weak/weak_perf"]
    out.update({"apgr": apgr(curve, a, b), "cpt@50": cpt(curve, a, b, 0.5), "cpt@80": cpt(curve, a, b, 0.8)})
    return out


def arena_metrics(metrics: dict[str, float], train: RoutingArrays, ev: RoutingArrays) -> dict[str, float]:
    """`arena_score` of the router and `<baseline>/arena_score` of best single, cheapest and oracle, from
    the performance-first `perf` (A) and `cost` (USD per query; ×1000 per 1,000 queries). Left out when the
    log has no costs or a performance lies outside [0, 1]."""
    if not costs_known(train, ev):
        return {}
    out = {}
    for name in ("", "best_single/", "cheapest/", "oracle/"):
        a, c = metrics.get(f"{name}perf"), metrics.get(f"{name}cost")
        if a is not None and c is not None and 0.0 <= a <= 1.0:
            out[f"{name}arena_score"] = arena_score(a, 1000.0 * c)
    return out


def peer_metrics(perf_hat: np.ndarray, train: RoutingArrays, ev: RoutingArrays,
                 metrics: dict[str, float]) -> dict[str, float]:
    """Everything above for one split: RouteLLM's strong/weak metrics and RouterArena's scores."""
    return {**strong_weak_metrics(perf_hat, train, ev), **arena_metrics(metrics, train, ev)}
