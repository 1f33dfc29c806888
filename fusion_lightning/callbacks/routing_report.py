"""RoutingReport: the cost–quality side of routing evaluation, written into the run dir.

Reads what `RouterModule` left in `eval_outputs[stage]` (its epoch-end hook runs before
`on_*_end`), sweeps λ over the router's predictions, and adds `<stage>/aiq`,
`<stage>/single_models/aiq`, `<stage>/reaches_best_single` and (when reached)
`<stage>/cost_to_match_best` to `trainer.callback_metrics` and the loggers. After test it also
writes `routing_table.md`, `routing_table.csv` and `pareto.png`.

A curve point is not a setting one can deploy when it interpolates, and a point picked on test is a
result read off the answers. So on val the report also picks one decision — the cheapest single λ or
τ whose mean performance reaches best single's on val — and on test says what that decision gives
(`test/decision/cost_ratio`, `test/decision/perf_delta`): the setting to put in `route tolerance=`
or `serve`'s `router.tolerance`, with its out-of-sample result. The math is in
`fusion_lightning.query.metrics`; this file only does I/O. Modules without routing outputs
(other levels) are left alone.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from fusion_lightning.callbacks.ope_report import compute_bandit, write_bandit
from fusion_lightning.callbacks.pareto import save_plot
from fusion_lightning.io import atomic_open, atomic_write
from fusion_lightning.query.metrics import (
    LAMBDAS,
    baseline_choices,
    calibration_errors,
    cheapest_matching,
    choose,
    cost_quality_scalars,
    costs_known,
    decision_choices,
    decision_labels,
    model_points,
    per_task_rows,
    sweep_points,
)
from fusion_lightning.query.peer_metrics import strong_weak_pair

MAIN_SETTING = "performance_first"
TABLE_CHOICES = ("router", "router_task_blind", "best_single", "task_best", "oracle")


class RoutingReport(Callback):
    """λ and tolerance sweeps, AIQ, cost to match best single and the per-task table, on val (scalars) and test (files)."""

    def __init__(self, out_dir: str | None = None, lambdas: list[float] | None = None, on_validation: bool = True):
        self.out_dir = out_dir
        self.lambdas = np.asarray(lambdas, float) if lambdas is not None else LAMBDAS
        self.on_validation = on_validation
        self.artifacts: dict[str, str] = {}
        self.val_decision: int | None = None  # the row of decision_choices picked on the last val report
        self.val_decision_note: str | None = None  # why there is none

    # hooks ------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._report(trainer, pl_module, "val", write=False)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test", write=True)

    # work -------------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, write: bool) -> None:
        out = getattr(pl_module, "eval_outputs", {}).get(stage)
        if not out:
            return
        bandit = "ope" in out  # a bandit log: every number is an off-policy estimate (callbacks/ope_report.py)
        report = compute_bandit(out, pl_module.hparams, self.lambdas) if bandit else self.compute(out, pl_module.hparams)
        if not bandit:
            fits = getattr(pl_module, "platt_fits", None) or []
            report["calibrated"] = [f.model for f in fits if f.kept]
            # router_auto's cross-validated refit trains on val too: a pick there would be read off its training data
            in_sample = getattr(pl_module, "refit_epochs", None) is not None
            self._val_decision(report, stage, in_sample)
        scalars = {f"{stage}/{k}": v for k, v in report["scalars"].items()}
        for k in ("cost_to_match_best", "aiq", "single_models/aiq", "reaches_best_single"):
            k = f"ope/{k}" if bandit else k
            trainer.callback_metrics.pop(f"{stage}/{k}", None)  # no stale value when unreached or costs unknown
        for k, v in scalars.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            logger.save()
        if write and trainer.is_global_zero:
            run_dir = Path(self.out_dir or trainer.default_root_dir)
            self.artifacts = write_bandit(report, run_dir, stage) if bandit else self.write(report, run_dir, stage)

    def _val_decision(self, report: dict[str, Any], stage: str, in_sample: bool = False) -> None:
        """On val: remember the cheapest decision reaching best single (None when none does, or when val was
        trained on); on test: what it gives there, reached or not."""
        if not report.get("decision_points"):
            return
        if stage == "val":
            self.val_decision = None if in_sample else report.get("match")
            self.val_decision_note = ("val is in the refit's training data (router_auto, selection: cv)" if in_sample
                                      else None if report.get("match") is not None
                                      else "no single λ or τ reaches best single on val")
            return
        if self.val_decision is None:
            if self.val_decision_note:
                report["decision_note"] = self.val_decision_note
            return
        cost, perf = report["points"][self.val_decision]
        best_cost, best_perf = report["best"]
        report["decision"] = {"label": decision_labels(self.lambdas)[self.val_decision], "cost": float(cost),
                              "perf": float(perf)}
        report["scalars"]["decision/perf_delta"] = float(perf - best_perf)
        if best_cost > 0:
            report["scalars"]["decision/cost_ratio"] = float(cost / best_cost)

    def compute(self, out: dict[str, Any], hparams: Any) -> dict[str, Any]:
        """Everything the report shows, from one stage's eval outputs (no I/O)."""
        train, ev, metrics = out["train"], out["eval"], out["metrics"]
        models = list(getattr(hparams, "models", None) or range(ev.perf.shape[1]))
        tasks = getattr(hparams, "tasks", None)
        sizes = getattr(hparams, "model_sizes", None) or [None] * len(models)
        points = out["points"] if "points" in out else sweep_points(  # a router's own sweep (the cascade's
            decision_choices(out["perf_hat"], out["cost_hat"], ev.mask, self.lambdas), ev)  # thresholds), else λ and τ
        singles = model_points(ev)
        best = (metrics["best_single/cost"], metrics["best_single/perf"])
        known = costs_known(train, ev)
        scalars: dict[str, float] = {}
        match = None
        if known:  # without costs there is no cost axis: no sweep, AIQ or cost to match
            scalars = cost_quality_scalars(points, singles, best)
            match = cheapest_matching(points, best[1]) if "points" not in out else None
        ece = calibration_errors(out["perf_hat"], ev) if "perf_hat" in out else None
        if ece is not None and np.isfinite(ece).any():
            scalars["ece"] = float(np.nanmean(ece))
        base = baseline_choices(train, ev, MAIN_SETTING, sizes)
        choices = {"router": choose(out["scores"][MAIN_SETTING], ev.mask)}
        if "blind_scores" in out:
            choices["router_task_blind"] = choose(out["blind_scores"], ev.mask)
        choices.update({k: base[k] for k in TABLE_CHOICES[2:]})
        pair = strong_weak_pair(train)
        return {"scalars": scalars, "points": points, "singles": singles, "models": [str(m) for m in models],
                "pair": None if pair is None else tuple(str(models[i]) for i in pair),
                "best": best, "oracle": (metrics["oracle/cost"], metrics["oracle/perf"]), "costs_known": known,
                "rows": per_task_rows(choices, ev, tasks, out.get("choice_costs")), "choices": list(choices),
                "metrics": metrics, "sweep_rows": out.get("sweep_rows"), "ece": ece,
                "sweep_label": out.get("sweep_label", "router (λ and tolerance sweeps)"),
                "decision_points": known and "points" not in out,
                **({"match": match} if match is not None else {})}

    def write(self, report: dict[str, Any], run_dir: Path, stage: str) -> dict[str, str]:
        run_dir.mkdir(parents=True, exist_ok=True)
        paths = {"routing_table_md": run_dir / "routing_table.md", "routing_table_csv": run_dir / "routing_table.csv",
                 "pareto": run_dir / "pareto.png"}
        rows = report["rows"]
        with atomic_open(paths["routing_table_csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        atomic_write(paths["routing_table_md"], _markdown(report, stage))
        save_plot(report, paths["pareto"], stage)
        if report.get("sweep_rows"):  # the router's own operating points (the cascade's threshold sweep)
            paths["threshold_sweep"] = run_dir / "threshold_sweep.csv"
            with atomic_open(paths["threshold_sweep"], "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(report["sweep_rows"][0]))
                w.writeheader()
                w.writerows(report["sweep_rows"])
        return {k: str(v) for k, v in paths.items()}


def _markdown(report: dict[str, Any], stage: str) -> str:
    s, m, names = report["scalars"], report["metrics"], report["choices"]
    lines = [f"# Routing on {stage} ({MAIN_SETTING})", ""]
    if report["costs_known"]:
        match = (f"{s['cost_to_match_best']:.3g}× best single's cost" if "cost_to_match_best" in s
                 else "never reached on the λ and tolerance grids")
        lines += [f"- AIQ: {s['aiq']:.4f} (single models' hull: {s['single_models/aiq']:.4f})",
                  f"- cost to match best single: {match}"]
        d = report.get("decision")
        if report.get("decision_note"):
            lines.append(f"- no decision picked on val: {report['decision_note']}")
        if d:
            best_cost, best_perf = report["best"]
            ratio = f"{d['cost'] / best_cost:.3g}× its cost" if best_cost > 0 else f"cost {d['cost']:.4g}"
            lines.append(f"- decision picked on val (the cheapest λ or τ reaching best single there): `{d['label']}`; "
                         f"on {stage}: perf {d['perf']:.4f} (best single {best_perf:.4f}, "
                         f"{d['perf'] - best_perf:+.4f}) at {ratio}")
    else:
        lines += ["- costs unknown: the log has no costs (all zero or missing), so there is no cost–quality "
                  "sweep, AIQ or cost to match best single"]
    lines.append(f"- gap closed: {m['gap_closed']:.4f}")
    if "cascade/threshold" in m:
        lines.append(f"- cascade: accept threshold {m['cascade/threshold']:.2f} (1.01: always the last model), "
                     f"{m['cascade/calls']:.2f} calls per query, {m['cascade/first_accepted']:.1%} answered by the "
                     "cheapest; its cost counts every call, the rejected ones too")
    if "task_blind/perf" in m:
        lines.append(f"- task-blind (each query's task inferred from its text, {m['task_blind/task_accuracy']:.1%} "
                     f"correct): perf {m['task_blind/perf']:.4f}, gap closed {m['task_blind/gap_closed']:.4f} "
                     f"(the lookup keyed by the inferred task: {m['task_blind/task_best/gap_closed']:.4f})")
    lines += _peer_lines(report)
    if report.get("ece") is not None:
        cal = set(report.get("calibrated") or [])
        per = ", ".join(f"{n} {e:.3f}{' (Platt)' if n in cal else ''}"
                        for n, e in zip(report["models"], report["ece"], strict=True) if e == e)
        lines.append(f"- calibration error of the predicted success probabilities (ECE, 10 bins): mean "
                     f"{report['scalars']['ece']:.3f}; {per}"
                     + ("; (Platt): scaled on val where cross-fitted log loss improved" if cal else ""))
    cols = [k for c in names for k in ("perf", "cost") if report["costs_known"] or k == "perf"]
    head = [f"{c} {k}" for c in names for k in ("perf", "cost") if report["costs_known"] or k == "perf"]
    lines += ["", "| task | queries | " + " | ".join(h.replace("_", " ") for h in head) + " |",
              "|---|---:|" + "---:|" * len(cols)]
    for r in report["rows"]:
        cells = [f"{r[f'{c}_{k}']:.4f}" if k == "perf" else f"{r[f'{c}_{k}']:.4g}"
                 for c in names for k in ("perf", "cost") if report["costs_known"] or k == "perf"]
        task = f"**{r['task']}**" if r["task"] == "all" else str(r["task"])
        lines.append(f"| {task} | {r['queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _peer_lines(report: dict[str, Any]) -> list[str]:
    """RouteLLM's strong/weak metrics and RouterArena's score (fusion_lightning/query/peer_metrics.py)."""
    m, pair, out = report["metrics"], report.get("pair"), []
    if pair and "strong_weak/strong_perf" in m:
        head = (f"- strong/weak threshold sweep (RouteLLM; strong = {pair[0]}, perf "
                f"{m['strong_weak/strong_perf']:.4f}; weak = {pair[1]}, perf {m['strong_weak/weak_perf']:.4f})")
        if "apgr" in m:
            out.append(f"{head}: APGR {m['apgr']:.4f}, CPT(50%) {m['cpt@50']:.1%}, CPT(80%) {m['cpt@80']:.1%} "
                       "strong calls")
        else:
            out.append(f"{head}: no APGR or CPT, strong does not beat weak here")
    if "arena_score" in m:
        base = ", ".join(f"{n.replace('_', ' ')} {m[f'{n}/arena_score']:.4f}" for n in ("best_single", "cheapest", "oracle")
                         if f"{n}/arena_score" in m)
        out.append(f"- RouterArena score (β = 0.1): {m['arena_score']:.4f}" + (f" ({base})" if base else ""))
    return out
