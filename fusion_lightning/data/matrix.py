"""Queries × models matrices, per-task normalisation and the paper's reward settings.

Routers, baselines and metrics all read these dense arrays; missing (query, model) pairs are NaN
and masked, never zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# (performance weight, cost weight) over per-task min-max normalised values, as in FusionFactory.
REWARD_SETTINGS: dict[str, tuple[float, float]] = {
    "performance_first": (1.0, 0.0),
    "balance": (0.5, 0.5),
    "cost_first": (0.2, 0.8),
}
ALL_SETTINGS = (*REWARD_SETTINGS, "judge")


@dataclass
class QueryMatrix:
    """One row per query, one column per model."""

    query_ids: np.ndarray
    queries: list[str]
    tasks: np.ndarray
    domains: np.ndarray
    splits: np.ndarray
    models: list[str]
    performance: np.ndarray  # float32 [Q, M], NaN where the log has no call
    cost: np.ndarray
    judge: np.ndarray
    mask: np.ndarray  # bool [Q, M]: the log has this call
    # [Q, M] probability with which the logging policy chose each logged call (NaN where unknown or not
    # logged); None when the log carries no propensities
    propensity: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.query_ids)

    def take(self, idx: np.ndarray) -> QueryMatrix:
        idx = np.asarray(idx)
        return QueryMatrix(self.query_ids[idx], [self.queries[i] for i in np.arange(len(self))[idx]],
                           self.tasks[idx], self.domains[idx], self.splits[idx], list(self.models),
                           self.performance[idx], self.cost[idx], self.judge[idx], self.mask[idx],
                           None if self.propensity is None else self.propensity[idx])

    def split(self, name: str) -> QueryMatrix:
        return self.take(self.splits == name)

    @property
    def full_information(self) -> bool:
        """Every query has a call to every model (a benchmark log), so oracle and random are defined."""
        return bool(self.mask.all())

    @property
    def binary(self) -> bool:
        """All scores are 0/1 (so a router should use a Bernoulli likelihood)."""
        p = self.performance[self.mask]
        return bool(np.isin(p, (0.0, 1.0)).all())


@dataclass
class TaskNormaliser:
    """Per-task min-max of performance and cost, fitted on train and stored in checkpoints."""

    perf_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    cost_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    GLOBAL = "__all__"

    @classmethod
    def fit(cls, qm: QueryMatrix) -> TaskNormaliser:
        norm = cls()
        for task in [*np.unique(qm.tasks).tolist(), cls.GLOBAL]:
            rows = np.ones(len(qm), bool) if task == cls.GLOBAL else qm.tasks == task
            for arr, out in ((qm.performance, norm.perf_range), (qm.cost, norm.cost_range)):
                v = arr[rows][qm.mask[rows]]
                v = v[~np.isnan(v)]
                out[task] = (float(v.min()), float(v.max())) if len(v) else (0.0, 0.0)
        return norm

    def _apply(self, values: np.ndarray, tasks: np.ndarray, stats: dict[str, tuple[float, float]]) -> np.ndarray:
        out = np.empty_like(values, dtype=np.float32)
        for task in np.unique(tasks):
            lo, hi = stats.get(task, stats[self.GLOBAL])
            rows = tasks == task
            out[rows] = (values[rows] - lo) / (hi - lo) if hi > lo else 0.0
        return out

    def performance(self, values: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return self._apply(values, tasks, self.perf_range)

    def cost(self, values: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        return self._apply(values, tasks, self.cost_range)

    def state_dict(self) -> dict:
        return {"perf": {k: list(v) for k, v in self.perf_range.items()},
                "cost": {k: list(v) for k, v in self.cost_range.items()}}

    @classmethod
    def from_state_dict(cls, d: dict) -> TaskNormaliser:
        return cls({k: tuple(v) for k, v in d["perf"].items()}, {k: tuple(v) for k, v in d["cost"].items()})


def reward(perf_n: np.ndarray, cost_n: np.ndarray, setting: str = "performance_first",
           judge: np.ndarray | None = None) -> np.ndarray:
    """Reward of each (query, model) under a setting: w_p·perf − w_c·cost over normalised values, or judge."""
    if setting == "judge":
        if judge is None or (np.size(judge) and np.isnan(judge).all()):  # no judge column: all NaN
            raise ValueError("the judge setting needs judge scores, and this log has none")
        return judge
    if setting not in REWARD_SETTINGS:
        raise ValueError(f"unknown reward setting {setting!r}; choose from: {', '.join(ALL_SETTINGS)}")
    wp, wc = REWARD_SETTINGS[setting]
    return wp * perf_n - wc * np.nan_to_num(cost_n, nan=0.0)


def lam_reward(perf_n: np.ndarray, cost_n: np.ndarray, lam: float) -> np.ndarray:
    """Cost-weighted reward for a sweep: perf − λ·cost (λ = 0 is performance-first)."""
    return perf_n - lam * np.nan_to_num(cost_n, nan=0.0)
