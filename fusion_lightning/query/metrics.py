"""Routing metrics: what a choice of model per query yields, for a router and the usual baselines.

Inputs are per-query arrays [N, M] of actual performance, cost, normalised performance/cost and an
availability mask. Baselines that learn (best single, task-best) see train arrays only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_lightning.data.matrix import REWARD_SETTINGS, reward


@dataclass
class RoutingArrays:
    perf: np.ndarray
    cost: np.ndarray
    perf_n: np.ndarray
    cost_n: np.ndarray
    mask: np.ndarray
    tasks: np.ndarray  # [N] task index or name

    def reward(self, setting: str) -> np.ndarray:
        return reward(self.perf_n, self.cost_n, setting)


def choose(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Argmax over the models each query has; ties go to the lower column (catalog order)."""
    s = np.where(mask, scores, -np.inf)
    return s.argmax(axis=1)


def outcome(choice: np.ndarray, a: RoutingArrays, setting: str) -> dict[str, float]:
    rows = np.arange(len(choice))
    return {"perf": float(a.perf[rows, choice].mean()), "cost": float(a.cost[rows, choice].mean()),
            "reward": float(a.reward(setting)[rows, choice].mean())}


def _masked_mean(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, v, 0).sum(0) / np.maximum(mask.sum(0), 1)


def baseline_choices(train: RoutingArrays, ev: RoutingArrays, setting: str,
                     sizes: list[float | None]) -> dict[str, np.ndarray]:
    """Per-query model choices of the baselines on `ev` (random is handled as an expectation)."""
    n = len(ev.perf)
    r_train = train.reward(setting)
    mean_r = _masked_mean(r_train, train.mask)
    best = int(mean_r.argmax())
    task_best = np.full(n, best)
    for t in np.unique(ev.tasks):
        rows = train.tasks == t
        if rows.any():
            task_best[ev.tasks == t] = int(_masked_mean(r_train[rows], train.mask[rows]).argmax())
    # oracle: best actual reward per query, cheaper model on ties
    oracle = choose(ev.reward(setting) - 1e-6 * ev.cost_n, ev.mask)
    mean_cost = _masked_mean(train.cost, train.mask)
    size = np.array([s if s is not None else -1.0 for s in sizes], float)
    largest = int(size.argmax()) if (size > 0).any() else int(mean_cost.argmax())
    fixed = {"best_single": np.full(n, best), "task_best": task_best,
             "cheapest": np.full(n, int(mean_cost.argmin())), "largest": np.full(n, largest)}
    # a query without a call to the fixed model falls back to the best available one on train
    fallback = choose(np.broadcast_to(mean_r, ev.mask.shape), ev.mask)
    rows = np.arange(n)
    for name, c in fixed.items():
        fixed[name] = np.where(ev.mask[rows, c], c, fallback)
    return {**fixed, "oracle": oracle}


def gap_closed(router: float, best_single: float, oracle: float) -> float:
    """(router − best single) / (oracle − best single); 0 when the oracle gains nothing."""
    gap = oracle - best_single
    return float((router - best_single) / gap) if gap > 1e-12 else 0.0


def routing_metrics(router_scores: dict[str, np.ndarray], train: RoutingArrays, ev: RoutingArrays,
                    sizes: list[float | None], main_setting: str = "performance_first") -> dict[str, float]:
    """Flat metrics for one split: router and baselines under every reward setting.

    `router_scores[setting]` holds the router's predicted reward [N, M] under that setting.
    Keys: `perf`, `cost`, `reward`, `gap_closed` (main setting), `<setting>/<perf|cost|reward>`,
    `<baseline>/<perf|cost|reward>`, `<setting>/<baseline>/reward`.
    """
    out: dict[str, float] = {}
    for setting in REWARD_SETTINGS:
        if setting not in router_scores:
            continue
        r = outcome(choose(router_scores[setting], ev.mask), ev, setting)
        for k, v in r.items():
            out[f"{setting}/{k}"] = v
        base = baseline_choices(train, ev, setting, sizes)
        for name, c in base.items():
            for k, v in outcome(c, ev, setting).items():
                out[f"{setting}/{name}/{k}"] = v
        for k, arr in (("perf", ev.perf), ("cost", ev.cost), ("reward", ev.reward(setting))):
            out[f"{setting}/random/{k}"] = float((_masked_mean(arr.T, ev.mask.T)).mean())
    m = main_setting
    for k in ("perf", "cost", "reward"):
        out[k] = out[f"{m}/{k}"]
        for name in ("best_single", "task_best", "oracle", "random", "cheapest", "largest"):
            out[f"{name}/{k}"] = out[f"{m}/{name}/{k}"]
    out["gap_closed"] = gap_closed(out["perf"], out["best_single/perf"], out["oracle/perf"])
    return out
