"""The routing report of a bandit log: off-policy estimates, never the full-information table.

On a bandit log the oracle, random-over-answers and gap closed need every model's answer on every
query, which the log does not have; printing them gives oracle = random = router. What is written
instead (`ope_report.md`, `ope_table.csv`, `pareto.png`):

- the router under every estimator (naive observed mean, DM, IPS, SNIPS, DR) and the baselines under
  DR, each with a 95% bootstrap interval, and which estimate to trust and why (support, effective
  sample size, estimated propensities);
- the router against the per-task lookup, paired;
- the cost–quality sweep estimated by DR (`ope/aiq`, `ope/cost_to_match_best`), and a per-task DR table.

The numbers come from `fusion_lightning.query.ope` (RouterModule puts them in `eval_outputs[stage]`);
this file only arranges them.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.callbacks.pareto import save_plot
from fusion_lightning.io import atomic_open, atomic_write
from fusion_lightning.query.metrics import (
    LAMBDAS,
    baseline_choices,
    choose,
    cost_quality_scalars,
    costs_known,
    decision_choices,
    model_points,
    per_task_rows,
    sweep_points,
)
from fusion_lightning.query.ope import ESTIMATORS

MAIN_SETTING = "performance_first"
POLICIES = ("router", "task_best", "best_single", "cheapest", "largest", "random")


def compute_bandit(out: dict[str, Any], hparams: Any, lambdas: np.ndarray = LAMBDAS) -> dict[str, Any]:
    """Scalars and tables of the bandit report, from one stage's eval outputs (no I/O)."""
    train, ev, m = out["train"], out["eval"], out["metrics"]
    dv = out["ope"]["estimable"]  # DR pseudo-values: the mean at a policy's choices is its DR estimate
    models = [str(x) for x in (getattr(hparams, "models", None) or range(ev.perf.shape[1]))]
    sizes = getattr(hparams, "model_sizes", None) or [None] * len(models)
    points = sweep_points(decision_choices(out["perf_hat"], out["cost_hat"], dv.mask, lambdas), dv)
    singles = model_points(dv)
    best = (m["ope/best_single/dr/cost"], m["ope/best_single/dr/perf"])
    known = costs_known(train, ev)
    scalars: dict[str, float] = {}
    if known:
        scalars = {f"ope/{k}": v for k, v in cost_quality_scalars(points, singles, best).items()}
    base = baseline_choices(train, dv, MAIN_SETTING, sizes)
    choices = {"router": choose(out["scores"][MAIN_SETTING], dv.mask),
               **{k: base[k] for k in ("best_single", "task_best")}}
    return {"scalars": scalars, "points": points, "singles": singles, "models": models, "best": best,
            "oracle": None, "costs_known": known, "metrics": m, "details": out["ope"],
            "rows": per_task_rows(choices, dv, getattr(hparams, "tasks", None)), "choices": list(choices),
            "title": "cost vs performance, estimated off-policy (DR) on a bandit log",
            "sweep_label": "router (λ and tolerance sweeps, DR estimates)"}


def _ci(est) -> str:
    return f"{est.value:.4f} [{est.lo:.4f}, {est.hi:.4f}]" if np.isfinite(est.lo) else f"{est.value:.4f}"


def table_rows(details: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (policy, estimator): value and interval of perf, cost and reward."""
    rows = []
    for policy in POLICIES:
        if (policy, "perf") not in details["estimates"]:
            continue
        for est in (ESTIMATORS if policy == "router" else ("dr",)):
            row: dict[str, Any] = {"policy": policy, "estimator": est}
            for metric in ("perf", "cost", "reward"):
                e = details["estimates"][(policy, metric)].get(est)
                if e is None:
                    continue
                row.update({metric: e.value, f"{metric}_lo": e.lo, f"{metric}_hi": e.hi})
            rows.append(row)
    return rows


def markdown(report: dict[str, Any], stage: str) -> str:
    d, s = report["details"], report["scalars"]
    lines = [f"# Off-policy routing report on {stage} ({MAIN_SETTING})", "",
             f"This is a bandit log: each of its {d['queries']} {stage} queries has the call(s) a logging policy "
             "chose, not every model's answer, so oracle, random-over-answers, gap closed and the "
             "full-information per-task table are undefined and not shown. Every number below is an "
             "off-policy estimate with its 95% bootstrap interval (queries resampled).", "",
             f"**Which estimate to trust**: {d['recommendation']}", "",
             "| policy | estimator | perf | cost | reward |", "|---|---|---:|---:|---:|"]
    for policy in POLICIES:
        for est in (ESTIMATORS if policy == "router" else ("dr",)):
            cells = []
            for metric in ("perf", "cost", "reward"):
                e = d["estimates"].get((policy, metric), {}).get(est)
                cells.append("—" if e is None else _ci(e) if metric != "cost" else f"{e.value:.4g}")
            if any(c != "—" for c in cells):
                name = policy.replace("_", " ") + (" (uniform)" if policy == "random" else "")
                lines.append(f"| {name} | {est} | " + " | ".join(cells) + " |")
    v = d["vs_task_best"]
    supp = d["support"]
    lines += ["", f"- router − task-best reward (DR, paired): {v.value:+.4f} [{v.lo:+.4f}, {v.hi:+.4f}]",
              f"- effective sample size of the router's weights: {d['ess']:.0f} of {d['queries']} queries",
              f"- support: {supp['unsupported']:.1%} of the router's decisions go to models the logger never "
              f"chose on that task, {supp['rare']:.1%} to models it chose for under 1% of that task's queries"]
    if report["costs_known"]:
        match = (f"{s['ope/cost_to_match_best']:.3g}× best single's cost" if "ope/cost_to_match_best" in s
                 else "never reached on the λ and tolerance grids")
        lines.append(f"- cost–quality (DR estimates): AIQ {s['ope/aiq']:.4f} (single models' hull "
                     f"{s['ope/single_models/aiq']:.4f}); cost to match best single: {match}")
    names = report["choices"]
    lines += ["", "Per task (DR estimates of performance; a few queries' pseudo-values can leave [0, 1], so a "
              "task's estimate is only as good as its query count):", "",
              "| task | queries | " + " | ".join(n.replace("_", " ") for n in names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for r in report["rows"]:
        task = f"**{r['task']}**" if r["task"] == "all" else str(r["task"])
        lines.append(f"| {task} | {r['queries']} | " + " | ".join(f"{r[f'{n}_perf']:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_bandit(report: dict[str, Any], run_dir: Path, stage: str) -> dict[str, str]:
    """ope_report.md, ope_table.csv and the estimated pareto.png in the run dir."""

    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"ope_report": run_dir / "ope_report.md", "ope_table": run_dir / "ope_table.csv",
             "pareto": run_dir / "pareto.png"}
    atomic_write(paths["ope_report"], markdown(report, stage))
    rows = table_rows(report["details"])
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(paths["ope_table"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if report["costs_known"]:
        save_plot(report, paths["pareto"], stage)
    else:
        paths.pop("pareto")
    return {k: str(v) for k, v in paths.items()}
