"""pareto.png: cost against performance of the single models, the router's sweep and its hull, best single
and oracle (bars of mean performance when the log has no costs). Shared by the routing and bandit reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.io import atomic_open
from fusion_lightning.query.metrics import nondecreasing_hull


def save_plot(report: dict[str, Any], path: Path, stage: str) -> None:
    """pareto.png of a routing report (RoutingReport's; the bandit report draws its estimated curve with it)."""
    # the Agg canvas directly: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if not report["costs_known"]:
        _plot_performance(ax, report, stage)
        _save(fig, path)
        return
    singles, points = report["singles"], report["points"]
    hull = nondecreasing_hull(points)
    ax.scatter(singles[:, 0], singles[:, 1], c="tab:gray", s=25, label="single models", zorder=2)
    for (c, p), name in zip(singles, report["models"], strict=True):
        ax.annotate(name, (c, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot(points[:, 0], points[:, 1], "o", c="tab:blue", ms=3, alpha=0.5, label=report.get("sweep_label",
                                                                                           "router (λ and tolerance sweeps)"))
    ax.plot(hull[:, 0], hull[:, 1], "-", c="tab:blue", label=f"router hull (AIQ {report['scalars'].get('aiq', report['scalars'].get('ope/aiq')):.3f})")
    c_hi = float(singles[:, 0].max())
    if hull[-1, 0] < c_hi:  # AIQ extends the hull flat to the dearest single model
        ax.plot([hull[-1, 0], c_hi], [hull[-1, 1]] * 2, ":", c="tab:blue")
    ax.scatter(*report["best"], marker="s", s=60, c="tab:orange", label="best single", zorder=3)
    if report.get("oracle") is not None:  # not estimable on a bandit log
        ax.scatter(*report["oracle"], marker="*", s=120, c="tab:green", label="oracle", zorder=3)
    xs = np.concatenate([singles[:, 0], points[:, 0], [report["oracle"][0]] if report.get("oracle") else []])
    if (xs > 0).all() and xs.max() / xs.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD)")
    ax.set_ylabel("mean performance")
    ax.set_title(report.get("title") or f"cost vs performance on {stage}")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=120)


def _plot_performance(ax, report: dict[str, Any], stage: str) -> None:
    """Without costs there is no cost axis: each model's and the routers' mean performance as bars."""
    m = report["metrics"]
    names = [*report["models"], "best single", "task-best", "router", "oracle"]
    perfs = [*report["singles"][:, 1], m["best_single/perf"], m["task_best/perf"], m["perf"], m["oracle/perf"]]
    colors = ["tab:gray"] * len(report["models"]) + ["tab:orange", "tab:purple", "tab:blue", "tab:green"]
    if "task_blind/perf" in m:
        names.insert(-1, "router (task-blind)")
        perfs.insert(-1, m["task_blind/perf"])
        colors.insert(-1, "tab:cyan")
    y = np.arange(len(names))
    ax.barh(y, perfs, color=colors)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    lo = max(0.0, min(perfs) - 0.05)
    ax.set_xlim(lo, min(1.0, max(perfs) + 0.05) if max(perfs) <= 1 else max(perfs) * 1.05)
    for yi, p in zip(y, perfs, strict=True):
        ax.annotate(f"{p:.3f}", (p, yi), fontsize=7, xytext=(2, -2), textcoords="offset points")
    ax.set_xlabel("mean performance")
    ax.set_title(f"performance on {stage} (costs unknown: the log has no costs, so no cost axis)", fontsize=9)
