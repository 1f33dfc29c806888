"""Off-policy evaluation: how a router would do, estimated from a bandit log it did not write.

On a bandit log each query has the call(s) a logging policy chose, each with its propensity p (the
probability the logger chose it). A target policy π (a router, the lookup, best single, random) is
[N, M] probabilities (one-hot for a deterministic router). With w = π·logged / p, per query i:

    naive   Σ_i Σ_m π·logged·y / Σ_i Σ_m π·logged   the mean observed outcome where π agrees with the logger
    DM      Σ_m π ŷ                                  a reward model's prediction (cross-fitted)
    IPS     Σ_m w y                                  unbiased when p > 0 wherever π goes
    SNIPS   Σ_i Σ_m w y / Σ_i Σ_m w                  IPS self-normalised: a little bias, less variance
    DR      Σ_m π ŷ + Σ_m w (y − ŷ)                  unbiased if either p or ŷ is right; the default

DR's per-query term is Σ_m π_im Γ_im with the pseudo-value Γ = ŷ + logged·(y − ŷ)/p, so a bandit log's
Γ matrices (`dr_view`) stand in for the full-information matrices: every deterministic policy's DR
estimate, per task or overall, is the mean of Γ at its choices, and the cost–quality sweep, the
per-task table and router_auto's paired selection all read them unchanged. The oracle is not
estimable this way (a max over noisy Γ is biased upward) and is never reported on a bandit log.

The reward model ŷ (`cross_fit_rewards`) is a ridge regression per model on the query's features and
task, cross-fitted by query so no call is scored by a model that saw it; split s may also learn from
the splits before it (val from train, test from train and val), never from a later one.
Confidence intervals are a percentile bootstrap over queries, paired across estimators and policies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_lightning.data.bandit import design_matrix, query_folds
from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.query.metrics import (
    RoutingArrays,
    baseline_choices,
    choose,
    routing_metrics,
)

ESTIMATORS = ("naive", "dm", "ips", "snips", "dr")
TRUST = {
    "dr": "DR: unbiased when either the propensities or the reward model is right, and the lowest variance "
          "of the unbiased ones here",
    "snips": "SNIPS: no reward model is fitted, so DR is not available; SNIPS trades a little bias for less "
             "variance than IPS",
}


@dataclass
class Estimate:
    value: float
    lo: float  # bootstrap percentile interval
    hi: float
    se: float  # bootstrap standard deviation

    def covers(self, truth: float) -> bool:
        return self.lo <= truth <= self.hi


class Bootstrap:
    """Resampling weights of N queries, drawn once so that every estimate shares them (paired)."""

    def __init__(self, n: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
        self.level = level
        self.counts = None
        if n_boot and n:  # [n_boot, n] how often each query is drawn in each resample
            idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
            flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
            self.counts = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)

    def estimate(self, num: np.ndarray, den: np.ndarray | None = None) -> Estimate:
        """Σ num / Σ den (den: one per query when None) with its bootstrap interval."""
        num = np.asarray(num, float)
        den = np.ones_like(num) if den is None else np.asarray(den, float)
        total = den.sum()
        value = float(num.sum() / total) if total > 0 else float("nan")
        if self.counts is None:
            return Estimate(value, float("nan"), float("nan"), float("nan"))
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (self.counts @ num) / (self.counts @ den)
        boot = boot[np.isfinite(boot)]
        if not len(boot):
            return Estimate(value, float("nan"), float("nan"), float("nan"))
        a = (1 - self.level) / 2
        lo, hi = np.quantile(boot, [a, 1 - a])
        return Estimate(value, float(lo), float(hi), float(boot.std(ddof=1)) if len(boot) > 1 else 0.0)


def weights(target: np.ndarray, mask: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """[N, M] importance weights π·logged / p (0 where not logged)."""
    p = np.where(mask, propensity, 1.0)
    if mask.any() and (np.isnan(p[mask]).any() or (p[mask] <= 0).any()):
        raise ValueError("a logged call has no propensity (or one ≤ 0): off-policy estimates need the probability "
                         "with which the logger chose every call (data.propensity=estimate estimates them)")
    return np.where(mask, target / p, 0.0)


def per_query_terms(target: np.ndarray, y: np.ndarray, y_hat: np.ndarray | None, mask: np.ndarray,
                    propensity: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each estimator as (numerator [N], denominator [N] or None for one per query): its value is
    Σ num / Σ den, so a bootstrap over queries resamples both together."""
    target, mask = np.asarray(target, float), np.asarray(mask, bool)
    y0 = np.where(mask, np.nan_to_num(np.asarray(y, float)), 0.0)
    w = weights(target, mask, propensity)
    agree = np.where(mask, target, 0.0)
    out = {"naive": ((agree * y0).sum(1), agree.sum(1)), "ips": ((w * y0).sum(1), None),
           "snips": ((w * y0).sum(1), w.sum(1))}
    if y_hat is not None:
        dm = (target * y_hat).sum(1)
        out["dm"] = (dm, None)
        out["dr"] = (dm + (w * (y0 - np.where(mask, y_hat, 0.0))).sum(1), None)
    return out


def effective_sample_size(target: np.ndarray, mask: np.ndarray, propensity: np.ndarray) -> float:
    """(Σ_i W_i)² / Σ_i W_i² with W_i = Σ_m π·logged/p: how many queries the weighted estimate is worth."""
    wq = weights(np.asarray(target, float), np.asarray(mask, bool), propensity).sum(1)
    s2 = float((wq ** 2).sum())
    return float(wq.sum() ** 2 / s2) if s2 > 0 else 0.0


def support(target: np.ndarray, tasks: np.ndarray, logged_share: dict, rare: float = 0.01) -> dict[str, float]:
    """Share of the target's decisions going to models the logger never chose (`unsupported`) or chose for
    fewer than `rare` of that task's queries (`rare`). `logged_share[(task, model_index)]` is the logger's
    share of that task's queries given to that model (from the whole log). No estimator sees such
    decisions: their estimate is the reward model's alone (DR, DM) or 0 (IPS)."""
    target = np.asarray(target, float)
    share = np.array([[logged_share.get((t, j), 0.0) for j in range(target.shape[1])] for t in tasks]) \
        if len(tasks) else np.zeros_like(target)
    n = max(len(target), 1)
    return {"unsupported": float((target * (share <= 0)).sum() / n),
            "rare": float((target * ((share > 0) & (share < rare))).sum() / n)}


def logged_shares(tasks: np.ndarray, mask: np.ndarray) -> dict:
    """(task, model index) -> share of that task's queries the logger gave that model."""
    out = {}
    tasks = np.asarray(tasks)
    for t in np.unique(tasks):
        rows = tasks == t
        for j, s in enumerate(mask[rows].mean(0)):
            out[(t.item() if hasattr(t, "item") else t, j)] = float(s)
    return out


def estimate_all(target: np.ndarray, y: np.ndarray, y_hat: np.ndarray | None, mask: np.ndarray,
                 propensity: np.ndarray, boot: Bootstrap) -> dict[str, Estimate]:
    """Every estimator of the target's mean outcome, with intervals from the shared bootstrap."""
    return {k: boot.estimate(num, den) for k, (num, den) in per_query_terms(target, y, y_hat, mask, propensity).items()}


def one_hot(choice: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((len(choice), m))
    out[np.arange(len(choice)), np.asarray(choice, np.int64)] = 1.0
    return out


def recommendation(ess: float, n: int, supp: dict[str, float], has_model: bool, estimated: bool) -> str:
    """Which estimate to trust, and what limits it, in one paragraph for the report."""
    text = TRUST["dr" if has_model else "snips"]
    warnings = []
    if supp["unsupported"] > 0:
        warnings.append(f"{supp['unsupported']:.1%} of its decisions go to models the logger never chose on that "
                        "task: no estimator observes them, DR's value there is the reward model's guess")
    if supp["rare"] > 0.05:
        warnings.append(f"{supp['rare']:.1%} of its decisions go to models the logger rarely chose: large weights, "
                        "wide intervals")
    if n and ess < 0.1 * n:
        warnings.append(f"effective sample size {ess:.0f} of {n} queries: the weighted estimates rest on few calls")
    if estimated:
        warnings.append("the propensities are estimated (data.propensity=estimate), not logged: IPS and SNIPS "
                        "are only as right as that classifier")
    return text + (". Caution: " + "; ".join(warnings) + "." if warnings else ".")


# -- the reward model -----------------------------------------------------------------------------------
def cross_fit_rewards(features: np.ndarray, tasks: np.ndarray, targets: dict[str, np.ndarray], mask: np.ndarray,
                      splits: np.ndarray, order: tuple[str, ...] = ("train", "val", "test"), folds: int = 5,
                      seed: int = 0, alpha: float = 1.0,
                      bounds: dict[str, tuple[float, float | None]] | None = None) -> dict[str, np.ndarray]:
    """Cross-fitted reward-model predictions ŷ [N, M] for each target ([N, M], NaN where not logged).

    Per model, a ridge regression of the logged outcomes on the query's features and a task one-hot. The
    queries of each split in `order` are cut into `folds` folds; a fold is predicted by a model fitted on
    the other folds plus every earlier split, so no call is scored by a model that saw it and no split
    learns from a later one (test never shapes a training target). `bounds` clips each target's
    predictions (scores to [0, 1], costs to ≥ 0)."""
    from sklearn.linear_model import Ridge

    mask = np.asarray(mask, bool)
    x = design_matrix(features, tasks)
    names = list(targets)
    y_all = np.stack([np.asarray(targets[k], float) for k in names], axis=-1)  # [N, M, K]
    out = np.full(y_all.shape, np.nan)
    splits = np.asarray(splits)
    earlier = np.zeros(len(x), bool)
    for s in order:
        rows = np.flatnonzero(splits == s)
        if len(rows):
            fold = query_folds(len(rows), min(folds, len(rows)), seed) if len(rows) > 1 else np.zeros(1, np.int64)
            for k in range(fold.max() + 1):
                fit = earlier.copy()
                fit[rows[fold != k]] = True
                pred = rows[fold == k]
                for j in range(mask.shape[1]):
                    obs = fit & mask[:, j]
                    if obs.sum() < 2:
                        seen = mask[:, j] & fit
                        fallback = np.nanmean(y_all[seen, j], axis=0) if seen.any() else np.nanmean(
                            np.where(mask[..., None], y_all, np.nan)[fit].reshape(-1, len(names)), axis=0)
                        out[pred, j] = np.nan_to_num(fallback)
                        continue
                    reg = Ridge(alpha=alpha).fit(x[obs], y_all[obs, j])
                    out[pred, j] = reg.predict(x[pred]).reshape(len(pred), len(names))
        earlier[rows] = True
    result = {}
    for i, k in enumerate(names):
        lo, hi = (bounds or {}).get(k, (None, None))
        result[k] = np.clip(out[..., i], lo, hi) if lo is not None or hi is not None else out[..., i]
    return result


# -- routing metrics on a bandit log --------------------------------------------------------------------
OPE_BASELINES = ("best_single", "task_best", "cheapest", "largest", "random")


def _outcomes(ev: RoutingArrays, setting: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (logged values, reward-model predictions) of perf, cost and the setting's reward."""
    wp, wc = REWARD_SETTINGS[setting]
    pred = ev.predicted
    return {"perf": (ev.perf, pred["perf"]), "cost": (ev.cost, pred["cost"]),
            "reward": (wp * ev.perf_n - wc * ev.cost_n, wp * pred["perf_n"] - wc * pred["cost_n"])}


def ope_routing_metrics(router_scores: dict[str, np.ndarray], train: RoutingArrays, ev: RoutingArrays,
                        sizes: list[float | None], main_setting: str = "performance_first",
                        task_names: list[str] | None = None, logged_share: dict | None = None,
                        estimated: bool = False, n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, float], dict]:
    """A router and the baselines on a bandit log's split: off-policy estimates instead of the
    full-information metrics (which need every model's answer).

    Keys (main setting): `ope/<estimator>/<perf|cost|reward>` (+ `_lo`, `_hi`) of the router for every
    estimator, and its DR estimates as `perf`, `cost`, `reward` (what a checkpoint monitor watches); `ope/<baseline>/dr/<metric>` (+ `_lo`, `_hi`) for best single, task-best (both learnt from
    `train`), cheapest, largest and random (uniform); `ope/dr/reward_vs_task_best` (+ interval, paired);
    `ope/ess`, `ope/queries`, `ope/support/unsupported|rare`. Other settings: `ope/<setting>/dr/reward`.
    Also returns the report's details (every estimate, the recommendation)."""
    dv = ev.estimable()
    n, m = ev.perf.shape
    boot = Bootstrap(n, n_boot, seed)
    out: dict[str, float] = {"ope/queries": float(n)}
    details: dict = {"estimates": {}, "queries": n, "setting": main_setting, "estimable": dv}
    for setting in REWARD_SETTINGS:
        if setting not in router_scores:
            continue
        router = one_hot(choose(router_scores[setting], dv.mask), m)
        ys = _outcomes(ev, setting)
        if setting != main_setting:
            y, y_hat = ys["reward"]
            out[f"ope/{setting}/dr/reward"] = estimate_all(router, y, y_hat, ev.mask, ev.propensity, Bootstrap(n, 0))[
                "dr"].value
            continue
        policies = {"router": router}
        base = baseline_choices(train, dv, setting, sizes)
        policies.update({k: one_hot(base[k], m) for k in OPE_BASELINES if k in base})
        policies["random"] = np.full((n, m), 1.0 / m)
        terms = {}
        for name, pi in policies.items():
            prefix = "ope" if name == "router" else f"ope/{name}"
            for metric, (y, y_hat) in ys.items():
                t = per_query_terms(pi, y, y_hat, ev.mask, ev.propensity)
                terms[(name, metric)] = t
                est = {k: boot.estimate(num, den) for k, (num, den) in t.items()}
                details["estimates"][(name, metric)] = est
                for k in (ESTIMATORS if name == "router" else ("dr",)):
                    out[f"{prefix}/{k}/{metric}"] = est[k].value
                    out[f"{prefix}/{k}/{metric}_lo"], out[f"{prefix}/{k}/{metric}_hi"] = est[k].lo, est[k].hi
        for metric in ys:  # the router's DR estimates also under the plain keys checkpointing may watch
            out[metric] = out[f"ope/dr/{metric}"]
        diff = boot.estimate(terms[("router", "reward")]["dr"][0] - terms[("task_best", "reward")]["dr"][0])
        out["ope/dr/reward_vs_task_best"] = diff.value
        out["ope/dr/reward_vs_task_best_lo"], out["ope/dr/reward_vs_task_best_hi"] = diff.lo, diff.hi
        details["vs_task_best"] = diff
        ess = effective_sample_size(router, ev.mask, ev.propensity)
        names = [task_names[int(t)] if task_names is not None else t for t in ev.tasks]
        supp = support(router, np.asarray(names, dtype=object), logged_share) if logged_share is not None else \
            {"unsupported": float("nan"), "rare": float("nan")}
        out["ope/ess"] = ess
        out.update({f"ope/support/{k}": v for k, v in supp.items()})
        details.update(ess=ess, support=supp, recommendation=recommendation(
            ess, n, {k: (0.0 if np.isnan(v) else v) for k, v in supp.items()}, True, estimated))
    return out, details


def truth_metrics(router_scores: dict[str, np.ndarray], train: RoutingArrays, truth: RoutingArrays,
                  sizes: list[float | None], main_setting: str = "performance_first") -> dict[str, float]:
    """On a simulated bandit log, what the full log says the router and the baselines actually score:
    `truth/<perf|cost|reward|gap_closed>` and `truth/<baseline>/<perf|cost|reward>` (main setting)."""
    full = routing_metrics({main_setting: router_scores[main_setting]}, train, truth, sizes, main_setting)
    return {f"truth/{k}": v for k, v in full.items() if not k.startswith(tuple(f"{s}/" for s in REWARD_SETTINGS))
            and not k.startswith("judge/")}
