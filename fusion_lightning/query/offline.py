"""Offline evaluation of router checkpoints on a bandit log: how would this router do, before it serves?

`evaluate_offline(logs, {name: ckpt})` routes the log's queries with each checkpoint and estimates its
performance, cost and reward from the logged calls (fusion_lightning.query.ope: naive, DM, IPS, SNIPS,
DR with bootstrap intervals), beside the per-task lookup and best single learnt from the log's train
split by DR, and uniform random. The reward model reads the same query embeddings the routers read
(`encoder`), cross-fitted by query. `python -m fusion_lightning.evaluate` (on a bandit log) and
`python -m fusion_lightning.route ope=LOG` are its command lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusion_lightning.data.embeddings import build_encoder, embed_texts
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.matrix import TaskNormaliser
from fusion_lightning.query.metrics import RoutingArrays, baseline_choices, choose, pseudo_values
from fusion_lightning.query.off_policy import bandit_targets
from fusion_lightning.query.ope import (
    ESTIMATORS,
    Bootstrap,
    Estimate,
    effective_sample_size,
    one_hot,
    per_query_terms,
    recommendation,
    support,
)
from fusion_lightning.query.router import Router

METRICS = ("perf", "cost")


@dataclass
class OfflineReport:
    """Every policy's estimates on the evaluated queries, and what limits them."""

    split: str
    queries: int
    estimates: dict[str, dict[str, dict[str, Estimate]]] = field(default_factory=dict)  # policy -> metric -> est
    ess: dict[str, float] = field(default_factory=dict)  # router -> effective sample size
    support: dict[str, dict[str, float]] = field(default_factory=dict)
    recommendation: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat `ope/<policy>/<estimator>/<metric>` (+ `_lo`, `_hi`) for summary.json."""
        out = {}
        for policy, per_metric in self.estimates.items():
            for metric, ests in per_metric.items():
                for name, e in ests.items():
                    key = f"ope/{policy}/{name}/{metric}"
                    out.update({key: e.value, f"{key}_lo": e.lo, f"{key}_hi": e.hi})
        for policy, v in self.ess.items():
            out[f"ope/{policy}/ess"] = v
        return out

    def markdown(self) -> str:
        lines = [f"# Off-policy evaluation on a bandit log ({self.split}, {self.queries} queries)", "",
                 "Each estimate with its 95% bootstrap interval (queries resampled). A bandit log has only the "
                 "calls its logging policy chose, so single-model columns, oracle and gap closed are undefined "
                 "here; the baselines are learnt from the log by DR.", "",
                 "| policy | estimator | perf | cost |", "|---|---|---:|---:|"]
        for policy, per_metric in self.estimates.items():
            for name in per_metric["perf"]:
                p, c = per_metric["perf"][name], per_metric["cost"].get(name)
                cost = "—" if c is None else f"{c.value:.4g}"
                lines.append(f"| {policy} | {name} | {p.value:.4f} [{p.lo:.4f}, {p.hi:.4f}] | {cost} |")
        for policy, text in self.recommendation.items():
            s = self.support[policy]
            lines += ["", f"**{policy}**: effective sample size {self.ess[policy]:.0f} of {self.queries}; "
                      f"{s['unsupported']:.1%} of its decisions unsupported, {s['rare']:.1%} rare. {text}"]
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def evaluate_offline(logs: LogTable, routers: Mapping[str, Any], split: str = "test", lam: float = 0.0,
                     encoder: str | None = None, embedding_cache: str | None = None, propensity: str = "logged",
                     n_boot: int = 1000, seed: int = 0) -> OfflineReport:
    """Estimate each router (name -> checkpoint path or Router) on `split` of a bandit log (`split="all"`:
    every query, e.g. a whole request log), beside best single, the per-task lookup and random. `encoder`: the
    reward model's query encoder (default: the first router's)."""
    if not logs.bandit:
        raise ValueError("evaluate_offline is for bandit logs; on a full-information log every router is scored "
                         "exactly (python -m fusion_lightning.evaluate)")
    qm = logs.matrix()
    if split != "all" and not (qm.splits == split).any():
        raise ValueError(f"the log has no {split} queries (splits: {sorted(set(qm.splits.tolist()))})")
    splits = np.where(qm.splits == split, "test", "train") if split != "all" else np.full(len(qm), "test")
    loaded = {n: r if isinstance(r, Router) else Router.load(r) for n, r in routers.items()}
    encoder = encoder or next((str(r.module.hparams.encoder) for r in loaded.values()), "minilm")
    feats = embed_texts(qm.queries, build_encoder(encoder), embedding_cache)
    train_rows = splits == "train"
    norm = TaskNormaliser.fit(qm.take(train_rows) if train_rows.any() else qm)
    qm.splits = splits  # reward model: the evaluated queries cross-fitted, learning from the rest too
    bt = bandit_targets(qm, feats, norm, propensity)
    ev = np.flatnonzero(splits == "test")
    m = len(qm.models)
    mask, prop = bt.mask[ev], bt.propensity[ev]
    y = {k: bt.observed[k][ev] for k in METRICS}
    y_hat = {k: bt.predicted[k][ev] for k in METRICS}
    boot = Bootstrap(len(ev), n_boot, seed)
    report = OfflineReport(split, len(ev), notes=list(bt.notes))
    policies: dict[str, np.ndarray] = {}
    for name, router in loaded.items():
        scores, _ = router.scores_over([qm.queries[i] for i in ev], [str(t) for t in qm.tasks[ev]], qm.models, lam)
        policies[name] = one_hot(choose(scores, np.isfinite(scores)), m)
    # baselines learnt by DR from the other queries (all of them when split=all: then they saw the evaluated
    # queries, said in a note)
    learn = np.flatnonzero(train_rows) if train_rows.any() else ev
    if not train_rows.any():
        report.notes.append("split=all: best single and the lookup are learnt from the evaluated queries themselves")
    g = {k: pseudo_values(bt.observed[k][learn], bt.predicted[k][learn], bt.mask[learn], bt.propensity[learn])
         for k in ("perf", "cost", "perf_n", "cost_n")}
    train_a = RoutingArrays(g["perf"], g["cost"], g["perf_n"], g["cost_n"], np.ones((len(learn), m), bool),
                            qm.tasks[learn])
    ev_a = RoutingArrays(np.zeros((len(ev), m)), np.zeros((len(ev), m)), np.zeros((len(ev), m)),
                         np.zeros((len(ev), m)), np.ones((len(ev), m), bool), qm.tasks[ev])
    base = baseline_choices(train_a, ev_a, "performance_first", [None] * m)
    policies.update({"task_best": one_hot(base["task_best"], m), "best_single": one_hot(base["best_single"], m),
                     "random": np.full((len(ev), m), 1.0 / m)})
    for name, pi in policies.items():
        keep = ESTIMATORS if name in routers else ("dr",)
        report.estimates[name] = {}
        for metric in METRICS:
            terms = per_query_terms(pi, y[metric], y_hat[metric], mask, prop)
            report.estimates[name][metric] = {k: boot.estimate(*terms[k]) for k in keep}
        if name in routers:
            report.ess[name] = effective_sample_size(pi, mask, prop)
            report.support[name] = support(pi, qm.tasks[ev], bt.logged_share)
            report.recommendation[name] = recommendation(report.ess[name], len(ev), report.support[name], True,
                                                         bt.estimated)
    return report
