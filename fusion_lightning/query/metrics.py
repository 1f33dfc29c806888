"""Routing metrics: what a choice of model per query yields, for a router and the usual baselines.

Inputs are per-query arrays [N, M] of actual performance, cost, normalised performance/cost, an
availability mask and (optionally) judge scores. Baselines that learn (best single, task-best) see
train arrays only. The cost–quality sweep (λ), AIQ and cost-to-match live here too, as pure numpy,
so the report callback only does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_lightning.data.matrix import ALL_SETTINGS, reward


def pseudo_values(y: np.ndarray, y_hat: np.ndarray | None, mask: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """[N, M] Γ = ŷ + logged·(y − ŷ)/p: DR's unbiased stand-in for every model's outcome on every query
    (IPS's when there is no reward model: ŷ = 0)."""
    y_hat = np.zeros(mask.shape) if y_hat is None else np.asarray(y_hat, float)
    p = np.where(mask, propensity, 1.0)
    return y_hat + np.where(mask, (np.nan_to_num(y) - y_hat) / p, 0.0)


@dataclass
class RoutingArrays:
    perf: np.ndarray
    cost: np.ndarray
    perf_n: np.ndarray
    cost_n: np.ndarray
    mask: np.ndarray
    tasks: np.ndarray  # [N] task index or name
    judge: np.ndarray | None = None  # [N, M] judge score, NaN where the log has none
    # a bandit log's split: [N, M] the logger's propensity of each logged call, and the cross-fitted reward
    # model's predictions of perf, cost, perf_n, cost_n (fusion_lightning.query.ope); None on full logs
    propensity: np.ndarray | None = None
    predicted: dict[str, np.ndarray] | None = None

    @property
    def bandit(self) -> bool:
        return self.propensity is not None

    def reward(self, setting: str) -> np.ndarray:
        return reward(self.perf_n, self.cost_n, setting, self.judge)

    def rows(self, keep: np.ndarray, mask: np.ndarray | None = None) -> RoutingArrays:
        m = self.mask if mask is None else mask
        j = None if self.judge is None else self.judge[keep]
        prop = None if self.propensity is None else self.propensity[keep]
        pred = None if self.predicted is None else {k: v[keep] for k, v in self.predicted.items()}
        return RoutingArrays(self.perf[keep], self.cost[keep], self.perf_n[keep], self.cost_n[keep], m[keep],
                             self.tasks[keep], j, prop, pred)

    def estimable(self) -> RoutingArrays:
        """What a policy's outcome is read from: these arrays on a full-information log; on a bandit log its
        doubly robust pseudo-values for every (query, model), so the mean at a policy's choices is that
        policy's DR estimate (see fusion_lightning.query.ope)."""
        if not self.bandit:
            return self
        pred = self.predicted or {}
        g = {k: pseudo_values(getattr(self, k), pred.get(k), self.mask, self.propensity)
             for k in ("perf", "cost", "perf_n", "cost_n")}
        return RoutingArrays(g["perf"], g["cost"], g["perf_n"], g["cost_n"], np.ones_like(self.mask, bool),
                             self.tasks, None)


def judged(a: RoutingArrays) -> tuple[RoutingArrays, np.ndarray] | None:
    """The judge setting's view: queries with at least one judged call, masked to judged calls.

    Unjudged calls are left out rather than scored 0; None when the arrays hold no judge score.
    """
    if a.judge is None:
        return None
    m = a.mask & ~np.isnan(a.judge)
    keep = m.any(axis=1)
    return (a.rows(keep, m), keep) if keep.any() else None


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


def costs_known(*arrays: RoutingArrays) -> bool:
    """Whether the log has costs: some logged call costs more than 0 (missing costs are read as 0)."""
    return any(bool((a.cost[a.mask] > 0).any()) for a in arrays)


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

    `router_scores[setting]` holds the router's predicted reward [N, M] under that setting; the judge
    setting is scored only where the arrays carry judge scores (see `judged`).
    Keys: `perf`, `cost`, `reward`, `gap_closed` (main setting), `<setting>/<perf|cost|reward>`,
    `<baseline>/<perf|cost|reward>`, `<setting>/<baseline>/reward`.
    """
    out: dict[str, float] = {}
    for setting in ALL_SETTINGS:
        if setting not in router_scores:
            continue
        tr, e, scores = train, ev, router_scores[setting]
        if setting == "judge":  # only where both splits carry judge scores
            tj, ej = judged(train), judged(ev)
            if tj is None or ej is None:
                continue
            (tr, _), (e, keep) = tj, ej
            scores = scores[keep]
        for k, v in outcome(choose(scores, e.mask), e, setting).items():
            out[f"{setting}/{k}"] = v
        for name, c in baseline_choices(tr, e, setting, sizes).items():
            for k, v in outcome(c, e, setting).items():
                out[f"{setting}/{name}/{k}"] = v
        for k, arr in (("perf", e.perf), ("cost", e.cost), ("reward", e.reward(setting))):
            out[f"{setting}/random/{k}"] = float((_masked_mean(arr.T, e.mask.T)).mean())
    m = main_setting
    for k in ("perf", "cost", "reward"):
        out[k] = out[f"{m}/{k}"]
        for name in ("best_single", "task_best", "oracle", "random", "cheapest", "largest"):
            out[f"{name}/{k}"] = out[f"{m}/{name}/{k}"]
    out["gap_closed"] = gap_closed(out["perf"], out["best_single/perf"], out["oracle/perf"])
    return out


# cost–quality trade-off: λ sweep, non-decreasing convex hull, AIQ, cost to match best single -------
LAMBDAS = np.concatenate([[0.0], np.logspace(-3, 4, 29)])  # 30 values; 1e4 ≫ any perf gap: cheapest


def sweep_choices(perf_hat: np.ndarray, cost_hat: np.ndarray, mask: np.ndarray,
                  lambdas: np.ndarray = LAMBDAS) -> np.ndarray:
    """[L, N] choices of routing by argmax(perf_hat − λ·cost_hat): one router checkpoint serves every λ."""
    return np.stack([choose(perf_hat - lam * cost_hat, mask) for lam in lambdas])


# the cheapest model predicted within τ of the best: where costs differ by orders of magnitude and the
# predictions are close, λ (a price per unit of score) jumps from the best model to the cheapest; a
# tolerance on the score itself reaches the cheap-but-nearly-as-good operating points in between
TOLERANCES = np.array([0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0])


def tolerance_choices(perf_hat: np.ndarray, cost_hat: np.ndarray, mask: np.ndarray,
                      tolerances: np.ndarray = TOLERANCES) -> np.ndarray:
    """[T, N] per τ, the model of lowest predicted cost among those whose predicted performance is within τ
    of the query's best prediction (ties in cost: the better prediction)."""
    p = np.where(mask, perf_hat, -np.inf)
    best = p.max(axis=1, keepdims=True)
    # lexicographic (cost, -perf) through one key: the cost, nudged by the prediction far below any cost step
    key = np.asarray(cost_hat, float) - 1e-9 * np.nan_to_num(perf_hat)
    return np.stack([np.where(p >= best - t, key, np.inf).argmin(axis=1) for t in tolerances])


def check_decision(lam: float, tolerance: float | None) -> None:
    """One decision rule at a time: λ trades score for cost by a price, τ by a margin; both at once
    would mean two different operating points."""
    if tolerance is None:
        return
    if not (tolerance >= 0 and np.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0 (in the score's units), got {tolerance!r}")
    if lam:
        raise ValueError(f"give lam (a price per unit of score) or tolerance (a margin of score), not both: "
                         f"lam={lam:g}, tolerance={tolerance:g}")


def tolerance_decision(perf: np.ndarray, cost: np.ndarray, tolerance: float,
                       available: np.ndarray | None = None) -> np.ndarray:
    """[N] per query, the model of lowest predicted cost among the `available` ones (default: all)
    predicted within `tolerance` of the best available prediction."""
    mask = np.ones(perf.shape, bool) if available is None else np.broadcast_to(available, perf.shape)
    return tolerance_choices(perf, cost, mask, np.array([float(tolerance)]))[0]


def decision_labels(lambdas: np.ndarray = LAMBDAS, tolerances: np.ndarray = TOLERANCES) -> list[str]:
    """The names of `decision_choices`' rows, as `route` and `serve` take them: 'lam=0.5', 'tolerance=0.02'."""
    return [f"lam={v:g}" for v in lambdas] + [f"tolerance={v:g}" for v in tolerances]


def cheapest_matching(points: np.ndarray, best_perf: float) -> int | None:
    """The row of the cheapest operating point whose mean perf reaches `best_perf` (None when none does):
    one deployable decision, where `cost_to_match` may interpolate between two."""
    ok = np.flatnonzero(points[:, 1] >= best_perf - 1e-12)
    return int(ok[np.argmin(points[ok, 0])]) if len(ok) else None


def decision_choices(perf_hat: np.ndarray, cost_hat: np.ndarray, mask: np.ndarray,
                     lambdas: np.ndarray = LAMBDAS, tolerances: np.ndarray = TOLERANCES) -> np.ndarray:
    """[L + T, N] every operating point one router checkpoint offers: the λ sweep and the tolerance sweep."""
    return np.concatenate([sweep_choices(perf_hat, cost_hat, mask, lambdas),
                           tolerance_choices(perf_hat, cost_hat, mask, tolerances)])


def calibration_errors(perf_hat: np.ndarray, ev: RoutingArrays, bins: int = 10) -> np.ndarray | None:
    """[M] expected calibration error of each model's predicted success probability on its logged 0/1
    scores: the query-weighted mean |mean prediction − success rate| over `bins` equal-width bins. None
    when the scores are not 0/1 (a probability has nothing to be calibrated against) or nothing is logged.

    Why it matters: the tolerance and λ rules compare predictions across models, so a model whose
    predictions run high takes queries from a cheaper one that is as good."""
    logged = ev.mask
    y = ev.perf[logged]
    if y.size == 0 or not np.isin(y, (0.0, 1.0)).all():
        return None
    out = np.full(perf_hat.shape[1], np.nan)
    for m in range(perf_hat.shape[1]):
        rows = logged[:, m]
        if not rows.any():
            continue
        p, t = np.clip(perf_hat[rows, m], 0.0, 1.0), ev.perf[rows, m]
        b = np.minimum((p * bins).astype(int), bins - 1)
        n = np.bincount(b, minlength=bins)
        gap = np.abs(np.bincount(b, p, bins) - np.bincount(b, t, bins))  # per bin |Σp − Σy| = n·|mean p − rate|
        out[m] = float(gap.sum() / n.sum())
    return out


def sweep_points(choices: np.ndarray, ev: RoutingArrays) -> np.ndarray:
    """[L, 2] (mean actual cost, mean actual performance) of each row of choices."""
    rows = np.arange(choices.shape[1])
    return np.stack([[ev.cost[rows, c].mean(), ev.perf[rows, c].mean()] for c in choices])


def model_points(ev: RoutingArrays) -> np.ndarray:
    """[M, 2] (mean cost, mean performance) of always routing to each model, over the queries it has."""
    return np.stack([_masked_mean(ev.cost, ev.mask), _masked_mean(ev.perf, ev.mask)], axis=1)


def nondecreasing_hull(points: np.ndarray) -> np.ndarray:
    """Vertices [K, 2] of the upper convex hull of (cost, perf) points up to its highest point.

    The upper hull is what mixing operating points achieves (RouterBench); past its maximum it
    only falls, so that part is dropped and the curve stays non-decreasing in cost.
    """
    p = np.asarray(points, float)
    p = p[np.lexsort((-p[:, 1], p[:, 0]))]
    p = p[np.r_[True, np.diff(p[:, 0]) > 0]]  # one point per cost: the best
    hull: list[np.ndarray] = []
    for q in p:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (q[1] - y1) - (y2 - y1) * (q[0] - x1) >= 0:  # hull[-1] on or below the chord
                hull.pop()
            else:
                break
        hull.append(q)
    h = np.array(hull)
    return h[: int(h[:, 1].argmax()) + 1]


def aiq(points: np.ndarray, c_lo: float, c_hi: float) -> float:
    """Average quality over [c_lo, c_hi]: area under the non-decreasing hull of `points` / (c_hi − c_lo).

    As RouterBench: the hull is linear between vertices and extended flat past its most expensive
    vertex; points outside the range shape the hull but only [c_lo, c_hi] counts. Below the
    router's cheapest point it offers no operating point, so that stretch counts 0 (RouterBench
    integrates from its first point too). A zero-width range gives the hull's value there.
    """
    h = nondecreasing_hull(points)
    x0 = h[0, 0]
    if c_hi - c_lo <= 1e-12 * max(abs(c_hi), 1.0):
        return float(np.interp(c_hi, h[:, 0], h[:, 1])) if x0 <= c_hi else 0.0
    a = max(c_lo, x0)
    if a >= c_hi:
        return 0.0
    xs = np.concatenate([[a], h[(h[:, 0] > a) & (h[:, 0] < c_hi), 0], [c_hi]])
    ys = np.interp(xs, h[:, 0], h[:, 1])
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / (c_hi - c_lo))


def cost_to_match(points: np.ndarray, perf: float, cost: float, tol: float = 1e-9) -> float | None:
    """Lowest cost of a router point with performance ≥ `perf`, as a fraction of `cost`.

    Realised sweep points only (no mixtures). None when no point reaches `perf` or `cost` ≤ 0, so
    callers report "never reached" instead of an infinite ratio.
    """
    p = np.asarray(points, float)
    ok = p[:, 1] >= perf - tol
    if not ok.any() or cost <= 0:
        return None
    return float(p[ok, 0].min() / cost)


def cost_quality_scalars(points: np.ndarray, singles: np.ndarray, best: tuple[float, float]) -> dict[str, float]:
    """AIQ of the router's sweep and of the single models over the single models' cost range, whether the
    sweep reaches best single's (cost, perf) `best`, and at what fraction of its cost (when it does)."""
    c_lo, c_hi = float(singles[:, 0].min()), float(singles[:, 0].max())
    match = cost_to_match(points, best[1], best[0])
    out = {"aiq": aiq(points, c_lo, c_hi), "single_models/aiq": aiq(singles, c_lo, c_hi),
           "reaches_best_single": float(match is not None)}
    if match is not None:
        out["cost_to_match_best"] = match
    return out


def per_task_rows(choices: dict[str, np.ndarray], ev: RoutingArrays, task_names: list[str] | None = None,
                  costs: dict[str, np.ndarray] | None = None) -> list[dict[str, float | int | str]]:
    """One row per task (sorted by name) and a final `all` row: query count, then perf and cost of each
    named choice (e.g. router, best_single, task_best, oracle). `costs[name]` [N]: that choice's actual
    cost per query where it is not the chosen model's (a cascade pays every call it made)."""
    names = [str(task_names[int(t)]) if task_names is not None else str(t) for t in ev.tasks.tolist()]
    names_arr = np.array(names, dtype=object)
    groups = [(t, names_arr == t) for t in sorted(set(names))] + [("all", np.ones(len(names), bool))]
    rows_idx = np.arange(len(names))
    out: list[dict[str, float | int | str]] = []
    for task, sel in groups:
        row: dict[str, float | int | str] = {"task": task, "queries": int(sel.sum())}
        for name, c in choices.items():
            row[f"{name}_perf"] = float(ev.perf[rows_idx[sel], c[sel]].mean())
            cost = costs[name][sel] if costs and name in costs else ev.cost[rows_idx[sel], c[sel]]
            row[f"{name}_cost"] = float(cost.mean())
        out.append(row)
    return out


# selection on val and task-blind evaluation ------------------------------------------------------
def per_query_reward(scores: np.ndarray, a: RoutingArrays, setting: str) -> np.ndarray:
    """[N] actual reward of routing each query to the argmax of `scores` (what selection compares); on a
    bandit log its DR term, never the observed mean (see `RoutingArrays.estimable`)."""
    a = a.estimable()
    c = choose(scores, a.mask)
    return a.reward(setting)[np.arange(len(c)), c]


def select_over_reference(rewards: dict[str, np.ndarray], reference: str, se_factor: float = 1.0) -> str:
    """The candidate with the best mean val reward among those whose paired gain over `reference` is more
    than `se_factor` standard errors; `reference` (the simpler choice, e.g. the per-task lookup) when none is.

    Val sets are small and rewards mostly 0/1, so the top of a leaderboard is often noise; the paired
    standard error of the per-query difference says how much of a gain is real (the one-SE rule).
    Ties go to the earlier candidate in `rewards`' order.
    """
    if reference not in rewards:
        names = list(rewards)
        return max(names, key=lambda n: (float(np.mean(rewards[n])), -names.index(n)))
    ref = np.asarray(rewards[reference], float)
    clear = []
    for name, r in rewards.items():
        diff = np.asarray(r, float) - ref
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
        if name != reference and diff.mean() > se_factor * se:
            clear.append(name)
    if not clear:
        return reference
    return max(clear, key=lambda n: (float(np.mean(rewards[n])), -clear.index(n)))


def task_blind_metrics(scores: np.ndarray, task_hat: np.ndarray, task_p: np.ndarray, train: RoutingArrays,
                       ev: RoutingArrays, sizes: list[float | None], setting: str = "performance_first"
                       ) -> dict[str, float]:
    """The router as production traffic sees it: every query's task inferred from its text, never read
    from the log. `scores` are the router's predicted rewards averaged over the inferred tasks
    `task_hat` [N, k] (best first) with weights `task_p` [N, k].

    Keys: `perf`, `cost`, `reward`, `gap_closed` (vs the same best single and oracle, which need no
    task), `task_accuracy` (most probable task = logged task), `task_best/perf|gap_closed` (the per-task
    lookup under the same inferred tasks: each model's train mean reward averaged over them).
    """
    task_hat, task_p = np.asarray(task_hat).reshape(len(ev.perf), -1), np.asarray(task_p).reshape(len(ev.perf), -1)
    out = dict(outcome(choose(scores, ev.mask), ev, setting))
    base = baseline_choices(train, ev, setting, sizes)
    single = outcome(base["best_single"], ev, setting)["perf"]
    oracle = outcome(base["oracle"], ev, setting)["perf"]
    out["gap_closed"] = gap_closed(out["perf"], single, oracle)
    out["task_accuracy"] = float(np.mean(task_hat[:, 0] == np.asarray(ev.tasks)))
    r_train = train.reward(setting)
    overall = _masked_mean(r_train, train.mask)
    table = {t: _masked_mean(r_train[train.tasks == t], train.mask[train.tasks == t]) if (train.tasks == t).any()
             else overall for t in np.unique(task_hat)}
    lookup_scores = sum(task_p[:, [j]] * np.stack([table[t] for t in task_hat[:, j]]) for j in range(task_hat.shape[1]))
    lookup = outcome(choose(lookup_scores, ev.mask), ev, setting)["perf"]
    out["task_best/perf"] = lookup
    out["task_best/gap_closed"] = gap_closed(lookup, single, oracle)
    return out
