"""`python -m fusion_lightning.evaluate data=NAME [data.path=...] [routers={mlp:CKPT}] [thought={...}] [student={...}] [out=DIR]`

On a bandit log (one model, or a few, per query: served traffic), the routers' off-policy estimates
instead (fusion_lightning/query/offline.py: `ope_table.md`, `summary.json` with `ope/<router>/<estimator>/<metric>`).

The paper-style fusion table (fusion_lightning/fusion_table.py): rows = tasks grouped by domain with
domain and overall averages; columns = every single model in the log, best single (chosen on
train), each fusion level given, and oracle; performance and cost. Writes to the run dir
(`out=DIR`, default checkpoints/runs/evaluate/<timestamp>):

  fusion_table.md    performance table (best non-oracle value per row in bold), the difference from best
                     single, each cell with its 95 % paired bootstrap interval, and the cost table
  fusion_table.csv   one row per table row: <column>_perf, _cost, _perf_lo, _perf_hi, _n, _diff, _diff_lo, _diff_hi
  fusion_bars.png    overall (task-average) performance per column with its interval, coloured by level
  summary.json       {"split", "data", "columns", "kinds", "overall", "gap_closed", "info", "notes", "artifacts"}

Keys: split=test, lam=0 (router cost weight), tasks=[...], max_per_task=N (seeded sample, all
columns), seed=0 (also the bootstrap's), bootstrap=1000 (resamples; 0: no intervals), ci_level=0.95,
sampling={max_new_tokens: 256}; live levels:
  thought={backend:{type:openai_compatible,base_url:...,model:...}, shots:3, library:DIR, retriever_ckpt:CKPT, k:3,
           modes:[zero_shot,few_shot,templates,exemplars,both,selected], budget_tokens:1024}
  (selected: the mode and k recipe=thought_auto chose for this backend on val, from the library's
  thought_selection.json; few_shot: `shots` (default k) random examples in the exemplars' prompt and
  budget, from the library's exemplar pool when there is a library, few_shot_pool=solved for the
  train questions some model solved)
  student={model:STUDENT_DIR, name:student}
The keys and their defaults are recipes/evaluate.yaml (composed by Hydra, as `fit` is; `data=NAME`
picks a recipes/data/ entry).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from fusion_lightning.config import ConfigError, compose_command, recipes_dir, run_dir_for
from fusion_lightning.fusion_table import Evaluation, add_confidence, evaluate, table_rows
from fusion_lightning.io import atomic_open, atomic_write

FILE_KEYS = ("routers", "thought", "student", "sampling")  # a .yaml/.json file name as their value: its content
COLORS = {"single": "#9aa5b1", "best_single": "#3e4c59", "query": "#2f80ed", "thought": "#27ae60",
          "model": "#f2994a", "oracle": "#bb6bd9"}


def _fmt(v: float, cost: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"${v:.3g}" if cost else f"{v:.3f}"


CSV_STATS = ("perf", "cost", "perf_lo", "perf_hi", "n", "diff", "diff_lo", "diff_hi")


def _ci(r: dict[str, Any], c: str, s: str) -> str:
    """A cell's interval, ` [lo, hi]`, and its question count when it differs from the row's."""
    lo, hi = r.get(f"{c}_{s}_lo"), r.get(f"{c}_{s}_hi")
    ci = "" if lo is None or math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]" if s == "perf" else f" [{lo:+.3f}, {hi:+.3f}]"
    n = r.get(f"{c}_n")
    return ci + (f" (n={n})" if n is not None and n != r["queries"] else "")


def write_report(ev: Evaluation, run_dir: Path, data_counts: dict[str, Any] | None = None, *,
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Markdown, CSV, bar plot and summary.json of an evaluation, every performance cell with a paired
    bootstrap CI (`add_confidence`; `n_boot=0`: none); returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = table_rows(ev), list(ev.columns)
    if n_boot:
        add_confidence(ev, rows, n_boot=n_boot, level=level, seed=seed)
    stats = CSV_STATS if n_boot else ("perf", "cost")
    with atomic_open(run_dir / "fusion_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["row", "kind", "domain", "queries"] + [f"{c}_{s}" for c in cols for s in stats])
        w.writeheader()
        w.writerows(rows)
    ci_note = (f" Brackets: {level:.0%} paired bootstrap interval ({n_boot} resamples of the questions within "
               "each task, the same for every column); `n=` where a column scored fewer questions than the row has."
               if n_boot else "")
    lines = [f"# Fusion table ({ev.split} split, {len(ev.tasks)} queries)", "",
             f"Best single (chosen on train): **{ev.info.get('best_single_model')}**. Averages are over tasks "
             f"(domain, overall) or over queries (`all queries`).{ci_note}", "", "## Performance", ""]
    sections = [("perf", ""), ("cost", "## Cost (USD per query)")]
    if n_boot:
        sections.insert(1, ("diff", "## Difference vs best single (paired)"))
    for s, title in sections:
        if title:
            lines += ["", title, ""]
        lines.append("| task | domain | n | " + " | ".join(cols) + " |")
        lines.append("|---|---|---:|" + "---:|" * len(cols))
        for r in rows:
            vals = [r[f"{c}_{s}"] for c in cols]
            cells = [_fmt(v, s == "cost") for v in vals]
            if s == "diff":
                cells = [x if x == "n/a" else f"{v:+.3f}" for v, x in zip(vals, cells, strict=True)]
            if s != "cost" and n_boot:
                cells = [x + _ci(r, c, s) for c, x in zip(cols, cells, strict=True)]
            if s == "perf":
                cand = [v for c, v in zip(cols, vals, strict=True) if ev.kinds[c] != "oracle" and not math.isnan(v)]
                top = max(cand) if cand else None
                cells = [f"**{x}**" if top is not None and not math.isnan(v) and ev.kinds[c] != "oracle" and v == top else x
                         for c, v, x in zip(cols, vals, cells, strict=True)]
            label = f"**{r['row']}**" if r["kind"] != "task" else r["row"]
            lines.append(f"| {label} | {r['domain']} | {r['queries']} | " + " | ".join(cells) + " |")
    if ev.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in ev.notes]]
    atomic_write(run_dir / "fusion_table.md", "\n".join(lines) + "\n")

    overall = next(r for r in rows if r["kind"] == "overall")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(cols) + 2), 4.5))
    ys = [overall[f"{c}_perf"] for c in cols]
    err = None
    if n_boot:  # asymmetric error bars: the bootstrap interval around the point estimate
        lo = [0 if math.isnan(y) or math.isnan(overall[f"{c}_perf_lo"]) else y - overall[f"{c}_perf_lo"]
              for c, y in zip(cols, ys, strict=True)]
        hi = [0 if math.isnan(y) or math.isnan(overall[f"{c}_perf_hi"]) else overall[f"{c}_perf_hi"] - y
              for c, y in zip(cols, ys, strict=True)]
        err = [[max(v, 0) for v in lo], [max(v, 0) for v in hi]]
    ax.bar(range(len(cols)), [0 if math.isnan(y) else y for y in ys], color=[COLORS[ev.kinds[c]] for c in cols],
           yerr=err, capsize=3 if err else 0)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("performance (task average)")
    ax.set_title(f"Fusion vs single models ({ev.split})")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items() if k in ev.kinds.values()],
              fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_open(run_dir / "fusion_bars.png") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    def cell(r: dict[str, Any], c: str) -> dict[str, Any]:
        out = {"perf": clean(r[f"{c}_perf"]), "cost": clean(r[f"{c}_cost"])}
        if n_boot:
            out.update(n=r[f"{c}_n"], ci=[clean(r[f"{c}_perf_lo"]), clean(r[f"{c}_perf_hi"])],
                       diff_vs_best_single=clean(r[f"{c}_diff"]),
                       diff_ci=[clean(r[f"{c}_diff_lo"]), clean(r[f"{c}_diff_hi"])])
        return out

    summary = {"split": ev.split, "data": data_counts or {}, "columns": cols, "kinds": ev.kinds,
               "overall": {c: cell(overall, c) for c in cols},
               "all_queries": {c: cell(rows[-1], c) for c in cols},
               "gap_closed": ev.info.get("gap_closed", {}), "info": ev.info, "notes": ev.notes,
               "rows": [{k: clean(v) for k, v in r.items()} for r in rows],
               "artifacts": {"table_md": "fusion_table.md", "table_csv": "fusion_table.csv", "bars": "fusion_bars.png"}}
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def compose(argv: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """recipes/evaluate.yaml with `key=value` arguments -> a plain dict; ConfigError (one line) on any problem."""
    return compose_command("evaluate", argv, file_keys=FILE_KEYS)


def run(cfg: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Load the log, evaluate, write the report (`cfg` as `compose` makes it); returns (summary, run dir)."""
    from fusion_lightning.data.datamodule import load_from_config

    logs = load_from_config(cfg["data"])
    routers = cfg["routers"] or {}
    if isinstance(routers, list):  # routers=[CKPT, ...]: named by position
        routers = {f"r{i}" if len(routers) > 1 else "router": p for i, p in enumerate(routers)}
    if logs.bandit:
        return run_offline(cfg, logs, routers)
    ev = evaluate(logs, routers=routers, thought=cfg["thought"] or None, student=cfg["student"] or None, split=cfg["split"],
                  lam=float(cfg["lam"]), tasks=cfg["tasks"], max_per_task=cfg["max_per_task"], seed=int(cfg["seed"]),
                  sampling=cfg["sampling"])
    run_dir = Path(run_dir_for(cfg["out"], cfg["runs_root"], "evaluate")).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ev.notes.extend(logs.report.notes)
    return write_report(ev, run_dir, logs.summary(), n_boot=int(cfg["bootstrap"]), level=float(cfg["ci_level"]),
                        seed=int(cfg["seed"])), run_dir


def run_offline(cfg: dict[str, Any], logs, routers: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """A bandit log: the routers' off-policy estimates (fusion_lightning.query.offline), not the fusion table,
    whose single-model, oracle and gap-closed columns need every model's answer on every query."""
    from fusion_lightning.query.offline import evaluate_offline

    if cfg["thought"] or cfg["student"]:
        raise ValueError(f"this is a bandit log ({logs.shape.reason}): evaluate estimates routers off-policy here; "
                         "run the live thought/student columns on a log with every model's answer")
    if not routers:
        raise ValueError("a bandit log has no fusion table to show without routers: give routers={name: CKPT}")
    report = evaluate_offline(logs, routers, split=cfg["split"], lam=float(cfg["lam"]), encoder=cfg.get("encoder"),
                              propensity=(cfg["data"] or {}).get("propensity", "logged"),
                              n_boot=int(cfg["bootstrap"]) or 0, seed=int(cfg["seed"]))
    report.notes.extend(logs.report.notes)
    run_dir = Path(run_dir_for(cfg["out"], cfg["runs_root"], "evaluate")).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "ope_table.md", report.markdown())
    summary = {"split": cfg["split"], "data": logs.summary(), "bandit_log": True,
               "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.metrics().items()},
               "notes": report.notes, "artifacts": {"table_md": "ope_table.md"}}
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary, run_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print((recipes_dir() / "evaluate.yaml").read_text(encoding="utf-8"))
        return 0
    try:
        summary, run_dir = run(compose(argv))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {e}  (FUSION_LIGHTNING_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    print((run_dir / summary["artifacts"]["table_md"]).read_text())
    print(f"run dir: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
