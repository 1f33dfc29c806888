"""`python -m fusion_lightning.compare runs=[RUN_DIR,...] | root=checkpoints/runs [metrics=[test/perf,...]] [out=DIR]`

A side-by-side table of runs: recipe, the config keys whose values differ between the runs (from
each run dir's config.yaml), seed and the chosen metrics (from summary.json), as comparison.md,
comparison.csv and comparison.png. Reads run dirs only, so it works offline and without W&B;
`wandb_project=ENTITY/PROJECT` reads the same fields from W&B runs through the public API instead.

The keys and their defaults are recipes/compare.yaml (composed by Hydra, as `fit` is); the old spelling
(`RUN_DIR... --root DIR --metric M --out DIR`) still works for one release (a note says the new one).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fusion_lightning.config import ConfigError, compose_command, help_requested, legacy_flags
from fusion_lightning.io import atomic_open, atomic_write

DEFAULT_METRICS = ("test/perf", "test/cost", "test/reward", "test/aiq", "test/gap_closed", "test/loss")
# keys that differ between any two runs without saying anything about the experiment
_NOISE = ("run_dir", "runs_root", "ckpt_path", "description", "recipe", "seed")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.lr": 0.001, ...}; lists become JSON strings (one cell each)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """One fit run dir: its summary (recipe, seed, metrics), its flattened config, its W&B run if any."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (not a finished fit run dir)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    for field in ("recipe", "metrics"):
        if field not in summary:
            raise ValueError(f"{path}: field {field!r} missing (not a fit summary)")
    cfg_path = run_dir / "config.yaml"
    config = flatten(yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    wandb_dir = run_dir / "wandb" / "latest-run"
    return {"run": str(run_dir), "recipe": summary["recipe"], "seed": summary.get("seed"),
            "metrics": summary["metrics"], "config": config,
            "wandb": wandb_dir.resolve().name.rsplit("-", 1)[-1] if wandb_dir.exists() else None}


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Fit run dirs under root (those whose summary.json has a recipe), and the other summary files skipped."""
    runs, skipped = [], []
    for path in sorted(Path(root).rglob("summary.json")):
        try:
            ok = "recipe" in json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            ok = False
        (runs if ok else skipped).append(path.parent if ok else path)
    return runs, skipped


def wandb_runs(project: str) -> list[dict[str, Any]]:
    """The runs of an ENTITY/PROJECT through wandb.Api (needs network and an API key)."""
    import wandb

    out = []
    for run in wandb.Api().runs(project):
        config = dict(run.config)
        nested = config.pop("config", None)
        flat = flatten(nested) if isinstance(nested, dict) else flatten(config)
        summary = {k: v for k, v in dict(run.summary).items() if isinstance(v, int | float)}
        out.append({"run": f"{project}/{run.id}", "recipe": flat.get("recipe") or run.job_type,
                    "seed": flat.get("seed"), "metrics": summary, "config": flat, "wandb": run.id})
    return out


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose value is not the same in every run (absent counts as a value). A config-group
    entry that only some runs have (logger.wandb.* vs logger.csv.*) shows as its group (`logger`)."""
    keys = sorted({k for r in runs for k in r["config"]})
    out: list[str] = []
    for k in keys:
        if k.endswith("_target_") or any(k == n or k.startswith(n + ".") or k.endswith("." + n) for n in _NOISE):
            continue
        values = [r["config"].get(k, "<absent>") for r in runs]
        if any(_own_path(v, r) for v, r in zip(values, runs, strict=True)):
            continue  # paths inside each run's own dir (checkpoint dirs, save_dir, ...)
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) == 1:
            continue
        parts = k.split(".")
        if len(parts) > 2 and not all(any(c.startswith(f"{parts[0]}.{parts[1]}.") for c in r["config"]) for r in runs):
            k = parts[0]
        if k not in out:
            out.append(k)
    return out


def _own_path(value: Any, run: dict[str, Any]) -> bool:
    own = [str(x) for x in (run["config"].get("run_dir"), run["run"]) if x]
    return isinstance(value, str) and any(value.startswith(o) for o in own)


def _value(run: dict[str, Any], key: str) -> Any:
    if key in run["config"]:
        return run["config"][key]
    members = sorted({k.split(".")[1] for k in run["config"] if k.startswith(key + ".") and k.count(".") >= 2})
    return "+".join(members)  # a config group: which entries this run has


def table(runs: list[dict[str, Any]], metrics: list[str]) -> tuple[list[str], list[list[Any]]]:
    keys = differing_keys(runs)
    show_wandb = any(r.get("wandb") for r in runs)
    cols = ["run", "recipe", *keys, "seed", *(["wandb"] if show_wandb else []), *metrics]
    rows = []
    for r in runs:
        row = [r["run"], r["recipe"], *(_value(r, k) for k in keys), r["seed"]]
        row += [r.get("wandb") or ""] if show_wandb else []
        row += [r["metrics"].get(m, math.nan) for m in metrics]
        rows.append(row)
    return cols, rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write(cols: list[str], rows: list[list[Any]], metrics: list[str], out: Path) -> dict[str, Path]:
    """comparison.md, comparison.csv and comparison.png (one bar panel per metric) in out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "png": out / "comparison.png"}
    with atomic_open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows([["" if isinstance(v, float) and math.isnan(v) else v for v in r] for r in rows])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in metrics else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    atomic_write(paths["md"], f"# Comparison of {len(rows)} runs\n\n" + "\n".join(lines) + "\n")
    labels = [Path(str(r[0])).name for r in rows]
    n = max(len(metrics), 1)
    fig, axes = plt.subplots(1, n, figsize=(min(3.0 + 0.3 * len(rows), 8) * n, 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=False):
        j = cols.index(m)
        vals = [float(r[j]) if r[j] not in ("", None) else math.nan for r in rows]
        ax.bar(range(len(rows)), [0 if math.isnan(v) else v for v in vals],
               color=[f"C{i % 10}" for i in range(len(rows))])  # one colour per run, the same in every panel
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    with atomic_open(paths["png"]) as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return paths


def compare(runs: list[dict[str, Any]], metrics: list[str] | None, out: Path) -> dict[str, Path]:
    if not runs:
        raise ValueError("no runs to compare")
    if not metrics:
        metrics = [m for m in DEFAULT_METRICS if any(m in r["metrics"] for r in runs)]
    unknown = [m for m in metrics if not any(m in r["metrics"] for r in runs)]
    if unknown:
        known = sorted({k for r in runs for k in r["metrics"]})
        raise ValueError(f"metric(s) {unknown} in none of the runs; they have e.g.: {', '.join(known[:20])}")
    cols, rows = table(runs, metrics)
    return write(cols, rows, metrics, out)


class SweepSummary(Callback):
    """What a Hydra multirun (`python -m fusion_lightning.fit -m recipe=... seed=1,2`) leaves in its sweep
    dir (a Hydra callback, configured in recipes/fit.yaml): each job's overrides and outcome in
    `sweep.json`, and this command's table over the jobs' run dirs in `comparison/`.

    Each job records itself in its own run dir (`hydra_job.json`) and the summary reads those back:
    a remote launcher (`hydra/launcher=submitit_slurm`) runs `on_job_end` inside the SLURM job, not in
    the process that ends the sweep."""

    JOB_FILE = "hydra_job.json"

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hc is None or hc.mode != RunMode.MULTIRUN:  # a single run has no sweep to record itself in
            return
        run_dir = Path(str(hc.runtime.output_dir))
        job = {"num": int(hc.job.num), "overrides": list(job_return.overrides or []), "run_dir": str(run_dir),
               "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed"}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / self.JOB_FILE, json.dumps(job, indent=2))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        jobs = sorted((json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{self.JOB_FILE}")),
                      key=lambda j: j["num"])
        runs, _ = find_runs(sweep_dir)
        record = {"sweep_dir": str(sweep_dir), "jobs": jobs, "finished_runs": [str(r) for r in runs]}
        if runs:
            paths = compare([load_run(r) for r in runs], None, sweep_dir / "comparison")
            record["comparison"] = {k: str(v) for k, v in paths.items()}
        atomic_write(sweep_dir / "sweep.json", json.dumps(record, indent=2))


# the argparse spelling of the previous release: flag -> key (run dirs were positional, --metric repeated)
FLAGS = {"--root": "root", "--wandb-project": "wandb_project", "--metric": "metrics", "--out": "out"}


def _paths(cfg: dict[str, Any], key: str) -> list[str]:
    value = cfg[key]
    return [str(v) for v in ([] if value is None else value if isinstance(value, list) else [value])]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (code := help_requested(argv, __doc__, "compare")) is not None:
        return code
    try:
        cfg = compose_command("compare", legacy_flags(argv, FLAGS, lists=("--metric",), positional="runs"))
        if cfg["wandb_project"]:
            runs = wandb_runs(str(cfg["wandb_project"]))
        else:
            dirs = [Path(r) for r in _paths(cfg, "runs")]
            if cfg["root"]:
                found, skipped = find_runs(str(cfg["root"]))
                dirs += found
                for s in skipped:
                    print(f"skipped {s}: not a fit summary (no 'recipe')", file=sys.stderr)
            if not dirs:
                raise ConfigError("give runs=[RUN_DIR,...], root=DIR or wandb_project=ENTITY/PROJECT")
            runs = [load_run(d) for d in dirs]
        out = Path(str(cfg["out"])) if cfg["out"] else Path(str(cfg["root"] or ".")) / "comparison"
        paths = compare(runs, _paths(cfg, "metrics"), out)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
