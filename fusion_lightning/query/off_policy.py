"""Off-policy learning: what a router trains on when its log is a bandit log.

A router retrained on served traffic sees only the outcomes of the models its predecessor chose, in the
proportions that predecessor chose them: the naive per-(query, model) regression (`direct`, today's
masked loss) learns each model where the logger sent it, a biased sample when the logger was skewed.
`datamodule.off_policy` picks how the train split's targets are built:

    direct  the logged calls only (masked regression; the direct method)
    dr      every (query, model) gets its doubly robust pseudo-reward Γ = ŷ + logged·(y − ŷ)/p, an
            unbiased target whose expectation is the model's true outcome on that query (1/p clipped at
            `max_weight`, default 10: a little bias for much less variance; evaluation never clips)
    ips     the same with ŷ = 0 (inverse propensity pseudo-rewards: unbiased, higher variance)
    auto    dr on a bandit log, direct on a full-information log (where all three coincide)

The targets are a data transform, so every router (the MLP and its kin, kNN's index, the lookup's task
means, router_auto's candidates) learns the same way; pseudo-rewards are not 0/1, so they are fitted
with squared error. Val and test keep the logged calls, their propensities and the cross-fitted reward
model's predictions: routers are evaluated off-policy there (fusion_lightning.query.ope).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fusion_lightning.data.bandit import PROPENSITY_SOURCES, estimate_propensities
from fusion_lightning.data.matrix import QueryMatrix, TaskNormaliser
from fusion_lightning.query.metrics import pseudo_values
from fusion_lightning.query.ope import cross_fit_rewards, logged_shares

OFF_POLICY = ("auto", "direct", "dr", "ips")
LOGGED_KEYS = ("perf", "cost", "perf_n", "cost_n", "mask")  # train under dr/ips also carries logged_<key>


def logged_view(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A train batch (or split) as the direct method sees it: its logged calls in place of the pseudo-rewards
    (unchanged when it carries no logged copy: a full log, or off_policy=direct)."""
    if "logged_mask" not in tensors:
        return tensors
    return {**tensors, **{k: tensors[f"logged_{k}"] for k in LOGGED_KEYS}}


@dataclass
class BanditTargets:
    """A bandit log's propensities and cross-fitted reward-model predictions, [Q, M] over all queries."""

    method: str  # direct | dr | ips (auto resolved)
    mask: np.ndarray
    propensity: np.ndarray
    predicted: dict[str, np.ndarray]  # perf, cost, perf_n, cost_n
    observed: dict[str, np.ndarray]  # the same, logged (NaN elsewhere)
    logged_share: dict  # (task, model index) -> the logger's share of that task's queries
    estimated: bool
    notes: list[str] = field(default_factory=list)
    max_weight: float | None = 10.0  # training targets' largest importance weight (evaluation is never clipped)

    @property
    def pseudo(self) -> bool:
        """Train targets are pseudo-rewards for every pair (not the logged calls)."""
        return self.method in ("dr", "ips")

    def tensors(self, rows: np.ndarray, split: str) -> dict[str, torch.Tensor]:
        """What a split's batches carry beyond the logged targets: on train under dr/ips the pseudo-rewards
        replace them (mask: every pair); on val/test (and train under direct) the propensities and the
        reward model's predictions, for the off-policy estimates."""
        mask = self.mask[rows]
        if split == "train" and self.pseudo:
            out = {}
            # training targets weight a call by at most max_weight: a rarely explored call (p = 0.011 at ε = 0.1
            # over 9 models) would otherwise carry 90× its residual and dominate the fit (bench/bandit.py's loop)
            p = self.propensity[rows] if self.max_weight is None else np.maximum(self.propensity[rows],
                                                                                1.0 / self.max_weight)
            for k in ("perf", "cost", "perf_n", "cost_n"):
                y_hat = self.predicted[k][rows] if self.method == "dr" else None
                out[k] = torch.from_numpy(pseudo_values(self.observed[k][rows], y_hat, mask, p).astype(np.float32))
            out["mask"] = torch.ones(mask.shape, dtype=torch.bool)
            # the logged calls too, for learners that train on them (router_auto's `off_policy: direct` candidates)
            for k in ("perf", "cost", "perf_n", "cost_n"):
                out[f"logged_{k}"] = torch.from_numpy(np.nan_to_num(self.observed[k][rows]).astype(np.float32))
            out["logged_mask"] = torch.from_numpy(mask)
            return out
        out = {"prop": torch.from_numpy(np.where(mask, self.propensity[rows], 1.0).astype(np.float32))}
        for k in ("perf", "cost", "perf_n", "cost_n"):
            out[f"{k}_dm"] = torch.from_numpy(self.predicted[k][rows].astype(np.float32))
        return out


def bandit_targets(qm: QueryMatrix, features: np.ndarray, normaliser: TaskNormaliser, propensity: str = "logged",
                   off_policy: str = "auto", folds: int = 5, seed: int = 0,
                   max_weight: float | None = 10.0) -> BanditTargets:
    """Propensities (logged, or estimated by a cross-fitted classifier) and the cross-fitted reward model
    of a bandit log's matrix; errors say what is missing and how to supply it."""
    if propensity not in PROPENSITY_SOURCES:
        raise ValueError(f"data.propensity={propensity!r}; choose from: {', '.join(PROPENSITY_SOURCES)}")
    notes = []
    estimated = propensity == "estimate"
    if estimated:
        prop = estimate_propensities(features, qm.tasks, qm.mask, folds=folds, seed=seed)
        notes.append("propensities estimated (data.propensity=estimate): a logistic regression of the logged "
                     f"choice on the query embedding and task, cross-fitted over {folds} folds; clipped at 0.01")
        if qm.propensity is not None:
            notes.append("the log's own propensities are ignored (data.propensity=estimate)")
    elif qm.propensity is None:
        raise ValueError("this is a bandit log (a subset of models per query) without propensities: off-policy "
                         "evaluation and learning weight each call by the probability the logger chose it. Give "
                         "a `propensity` column, or set data.propensity=estimate to estimate them from the logged "
                         "choices (or data.log_kind=full to treat it as full-information, at your own risk)")
    else:
        prop = qm.propensity.astype(np.float64)
    mask = qm.mask
    perf = np.where(mask, qm.performance, np.nan).astype(np.float64)
    cost = np.where(mask, np.nan_to_num(qm.cost), np.nan).astype(np.float64)
    pred = cross_fit_rewards(features, qm.tasks, {"perf": perf, "cost": cost}, mask, qm.splits, folds=folds,
                             seed=seed, bounds={"perf": (0.0, 1.0), "cost": (0.0, None)})
    predicted = {"perf": pred["perf"], "cost": pred["cost"],
                 "perf_n": normaliser.performance(pred["perf"], qm.tasks).astype(np.float64),
                 "cost_n": normaliser.cost(pred["cost"], qm.tasks).astype(np.float64)}
    observed = {"perf": perf, "cost": cost,
                "perf_n": np.where(mask, normaliser.performance(np.nan_to_num(perf), qm.tasks), np.nan),
                "cost_n": np.where(mask, normaliser.cost(np.nan_to_num(cost), qm.tasks), np.nan)}
    method = ("dr" if off_policy == "auto" else off_policy)
    if max_weight is not None and max_weight < 1:
        raise ValueError(f"datamodule.max_weight must be >= 1 (or null: no clipping), got {max_weight}")
    clip = f", importance weights clipped at {max_weight:g}" if max_weight is not None and method != "direct" else ""
    notes.append(f"off-policy learning: datamodule.off_policy={off_policy} ({method}{clip}); reward model: ridge "
                 f"per model on the query embedding and task, cross-fitted over {folds} folds per split (val also "
                 "learns from train, test from train and val)")
    return BanditTargets(method, mask, prop, predicted, observed, logged_shares(qm.tasks, mask), estimated, notes,
                         max_weight)


def router_scores(checkpoint: str, qm: QueryMatrix) -> np.ndarray:
    """[Q, M] a router checkpoint's predicted reward for each query of `qm`, in `qm.models`' order: how a
    router logger (data.bandit.logger=router) chooses. A model the router does not know gets −inf."""
    from fusion_lightning.query.router import Router

    try:
        return Router.load(checkpoint).scores_over(qm.queries, [str(t) for t in qm.tasks], qm.models)[0]
    except ValueError as e:
        raise ValueError(f"router {checkpoint}: {e}") from None
