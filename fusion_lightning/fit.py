"""`python -m fusion_lightning.fit recipe=NAME [key=value ...]`: run one recipe end to end.

The whole of a run: compose → seed → instantiate data, model, callbacks, loggers, trainer from their
`_target_` entries → fit → test on the best checkpoint → summary.json. No level-specific branches:
a level differs only by the DataModule and LightningModule its recipe names. Around that: secrets
redacted from every config that leaves the process (fusion_lightning.tracking), atomic checkpoints
checked before a resume, and save-and-exit on SIGTERM/SIGUSR1 (fusion_lightning.checkpointing).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

import fusion_lightning.zoo  # noqa: F401  registers the zoo's model names with the hf: encoders
from fusion_lightning import tracking
from fusion_lightning.cache import cache_help
from fusion_lightning.checkpointing import (
    EXIT_INTERRUPTED,
    FaultTolerance,
    RunInterrupted,
    check_checkpoint,
    checkpoint_plugins,
    find_last,
)
from fusion_lightning.config import (
    ConfigError,
    compose_recipe,
    debug_overrides,
    list_recipes,
    recipes_dir,
    register_router_recipes,
)
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.io import atomic_write
from fusion_lightning.query.ope import ESTIMATORS

USAGE = """usage: python -m fusion_lightning.fit recipe=NAME [key=value ...]

Runs a recipe from recipes/; every other argument is a Hydra override, e.g.
  trainer.max_epochs=3   data=llmrouter   data.path=DIR   +trainer.fast_dev_run=true   run_dir=PATH

SIGTERM (or SIGUSR1 outside SLURM auto-requeue) saves <run_dir>/checkpoints/last.ckpt and exits with
code 75; the same command with run_dir=<that run dir> ckpt_path=last resumes exactly.
"""


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (node or {}).values() if isinstance(c, DictConfig) and c.get("_target_")]


def _strategy(node: DictConfig | None) -> Any:
    if node is None or not node.get("_target_"):
        return (node or {}).get("name", "auto")
    return instantiate(node)


def _plugins(cfg: DictConfig, strategy: Any) -> list[Any] | None:
    """trainer.plugins from the config, plus the atomic CheckpointIO unless one is given (or DeepSpeed)."""
    plugins = [instantiate(p) if isinstance(p, DictConfig) else p for p in cfg.trainer.get("plugins") or []]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins += checkpoint_plugins(strategy)
    return plugins or None


def _float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k.split("/", 1)[0] in ("train", "val", "test"):
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return dict(sorted(out.items()))


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    d = summary["data"]
    console.print(f"[bold]data[/]: {d.get('rows', 0):,} rows, {d.get('queries', 0):,} queries "
                  f"(train {d.get('train_queries', 0):,} / val {d.get('val_queries', 0):,} / "
                  f"test {d.get('test_queries', 0):,}), {d.get('models', 0)} models, {d.get('tasks', 0)} tasks")
    if d.get("quarantined_rows"):
        console.print(f"[yellow]quarantined {d['quarantined_rows']:,} bad rows[/] -> {run_dir / 'quarantine.jsonl'}")
    report = summary["artifacts"].get("data_report")
    for note in json.loads((run_dir / report).read_text())["notes"] if report else []:
        console.print(f"  note: {note}")

    if "embed" in summary:
        e = summary["embed"]
        console.print(f"[bold]embed[/]: {e['unique']:,} unique texts, {e['cached']:,} already cached, "
                      f"{e['embedded']:,} embedded in {e['shards_written']} shard(s) "
                      f"({e['texts_per_s'] or 0:,.1f} texts/s) -> {e['dir']}")
        if "probe" in summary:
            p = summary["probe"]
            console.print(f"[bold]layer probe[/]: picked layer {p['layer']} ({p['criterion']} {p[p['criterion']]:.4g}, "
                          f"{p['queries']:,} train queries) -> encoder={p['encoder']}; table and curve: "
                          f"{run_dir / 'probe.csv'}, {run_dir / 'probe.png'}")
        return
    table = Table(title=f"{summary['recipe']} — test metrics", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown = [k for k in summary["metrics"] if k.startswith("test/") and k.count("/") <= 2
             and not any(k.startswith(f"test/{s}/") for s in (*REWARD_SETTINGS, "ope", "truth"))]
    if d.get("bandit_log"):  # a bandit log: the router's off-policy estimates, and the truth when simulated
        table.title = f"{summary['recipe']} — test metrics (bandit log: off-policy estimates, see ope_report.md)"
        shown += [k for k in summary["metrics"] if re.fullmatch(r"test/ope/\w+/(perf|reward)", k)
                  and k.split("/")[2] in ESTIMATORS]
        shown += [k for k in ("test/ope/dr/reward_vs_task_best", "test/ope/ess", "test/truth/perf",
                              "test/truth/reward", "test/truth/task_best/perf") if k in summary["metrics"]]
    for k in shown:
        table.add_row(k, f"{summary['metrics'][k]:.4g}")
    console.print(table)


@dataclass
class Run:
    """Everything one recipe run is made of, built from its config (`build`) and run by `run`."""

    cfg: DictConfig
    run_dir: Path
    datamodule: L.LightningDataModule
    model: L.LightningModule
    callbacks: list[Any]
    loggers: list[Any]
    trainer: L.Trainer
    fault: FaultTolerance
    resolved: dict[str, Any] = field(default_factory=dict)


def build(cfg: DictConfig, logs: LogTable | None = None) -> Run:
    """Seed, then instantiate data, model, callbacks, loggers and trainer from their `_target_` entries.

    `logs`: an already loaded and split LogTable for the DataModule (e.g. a cross-validation fold)."""
    if not cfg.get("run_dir"):
        raise ValueError("cfg.run_dir is not set: compose the config with compose_recipe or run the fit command")
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:  # DDP child ranks share the run dir: one writer
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(tracking.redact(resolved))))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    extra = {"logs": logs} if logs is not None else {}
    datamodule = instantiate(cfg.datamodule, _convert_="all", **extra)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, **datamodule.model_kwargs(), _convert_="all")
    callbacks = _instantiate_all(cfg.get("callbacks"))
    ckpt_dir = next((c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath),
                    run_dir / "checkpoints")
    fault = FaultTolerance(ckpt_dir, recipe=cfg.recipe)  # SIGTERM/SIGUSR1 -> last.ckpt, clean exit
    loggers = _instantiate_all(cfg.get("logger"))
    tracking.log_config(loggers, resolved)
    strategy = _strategy(cfg.get("strategy"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, fault], logger=loggers or False,
                                     strategy=strategy, plugins=_plugins(cfg, strategy))
    return Run(cfg, run_dir, datamodule, model, callbacks, loggers, trainer, fault, resolved)


def run(r: Run) -> dict[str, Any]:
    """`trainer.fit`, then validate and test the best checkpoint; returns the summary (also summary.json).
    A module whose `stage` is "predict" (the embed recipe's EncoderModule) runs `trainer.predict` instead."""
    if getattr(r.model, "stage", "fit") == "predict":
        return _run_predict(r)
    cfg, run_dir, trainer, model, datamodule = r.cfg, r.run_dir, r.trainer, r.model, r.datamodule
    ckpt_path = cfg.get("ckpt_path")
    ckpt_dir = r.fault.dirpath
    to_check = find_last(ckpt_dir) if ckpt_path == "last" else ckpt_path
    if to_check and str(to_check) not in ("best", "hpc", "registry"):
        check_checkpoint(to_check, model, cfg.recipe)
    try:
        select = getattr(model, "select_before_fit", None)  # e.g. router_auto's cross-validated selection
        if callable(select):
            select(r, str(to_check) if to_check and Path(str(to_check)).is_file() else None)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        ckpt_cb = trainer.checkpoint_callback
        best = ckpt_cb.best_model_path if ckpt_cb is not None and getattr(ckpt_cb, "best_model_path", "") else None
        metrics = _float_metrics(trainer.callback_metrics)  # train/* of the last epoch
        # val/* and test/* both from the checkpoint that test uses, so the numbers belong together
        evaluated = _zero3_full_weights(trainer, best)
        try:
            for stage in (trainer.validate, trainer.test):
                stage(model, datamodule=datamodule, ckpt_path=evaluated or best, verbose=False)
                metrics.update(_float_metrics(trainer.callback_metrics))
        finally:
            if evaluated and trainer.is_global_zero:
                Path(evaluated).unlink(missing_ok=True)
    except SIGTERMException:  # Lightning stopped at a safe point; FaultTolerance saved last.ckpt
        tracking.finish(r.loggers, exit_code=EXIT_INTERRUPTED)
        raise RunInterrupted(r.fault.signal_name, r.fault.saved, trainer.current_epoch, trainer.global_step,
                             f"python -m fusion_lightning.fit recipe={cfg.recipe} <same overrides> "
                             f"run_dir={run_dir} ckpt_path=last") from None

    artifacts = {"config": "config.yaml"}
    if best:
        artifacts["best_checkpoint"] = best
    if ckpt_cb is not None and getattr(ckpt_cb, "last_model_path", ""):
        artifacts["last_checkpoint"] = ckpt_cb.last_model_path
    if trainer.is_global_zero:
        artifacts.update(datamodule.write_artifacts(run_dir))
    extra: dict[str, Any] = {}  # e.g. router_auto's selection
    for obj in (model, *r.callbacks):
        artifacts.update(getattr(obj, "artifacts", {}) or {})
        extra.update(getattr(obj, "summary_fields", {}) or {})
    summary = {
        "recipe": cfg.recipe,
        "seed": int(cfg.seed),
        "data": datamodule.summary(),
        "metrics": dict(sorted(metrics.items())),
        "artifacts": {k: str(Path(v).resolve().relative_to(run_dir)) if Path(v).is_absolute() else str(v)
                      for k, v in artifacts.items()},
        **extra,
    }
    if trainer.is_global_zero:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    tracking.log_artifacts(r.loggers, run_dir, summary)
    tracking.finish(r.loggers)
    return summary


def _zero3_full_weights(trainer: L.Trainer, ckpt: str | None) -> str | None:
    """A ZeRO-3 checkpoint directory as one consolidated fp32 file that validate/test can load, or None.

    DeepSpeed cannot restore a ZeRO-3 checkpoint into an engine built without an optimizer (what
    `trainer.validate`/`test` build): its `load_checkpoint` ends in `'DeepSpeedZeRoOffload' object has no
    attribute '_restore_from_bit16_weights'` (DeepSpeed issue 7272). Lightning's own way round is a
    single-file checkpoint loaded with `load_full_weights`, which gathers each partitioned parameter while
    loading it; rank 0 writes that file beside the checkpoint (the caller deletes it after test)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    if not (ckpt and isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and Path(ckpt).is_dir()):
        return None
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    out = str(Path(ckpt).with_name(Path(ckpt).name + ".fp32.pt"))
    if trainer.is_global_zero:
        convert_zero_checkpoint_to_fp32_state_dict(ckpt, out)
    strategy.barrier("zero3_full_weights")
    strategy.load_full_weights = True
    return out


def _run_predict(r: Run) -> dict[str, Any]:
    """The embed recipe: one `trainer.predict` that writes embedding shards; its report is the summary."""
    from fusion_lightning.data.embed_job import run_predict

    report = run_predict(r.trainer, r.model, r.datamodule)
    artifacts = {"config": "config.yaml"}
    if r.trainer.is_global_zero:
        artifacts.update({k: str(Path(v).resolve().relative_to(r.run_dir))
                          for k, v in r.datamodule.write_artifacts(r.run_dir).items()})
        # what the module made of the job (the layer probe's table and pick)
        artifacts.update({k: str(Path(v).resolve().relative_to(r.run_dir))
                          for k, v in (getattr(r.model, "artifacts", {}) or {}).items()})
    summary = {"recipe": r.cfg.recipe, "seed": int(r.cfg.seed), "data": r.datamodule.summary(), "metrics": {},
               "embed": report, "artifacts": artifacts, **(getattr(r.model, "summary_fields", {}) or {})}
    if r.trainer.is_global_zero:
        atomic_write(r.run_dir / "summary.json", json.dumps(summary, indent=2))
    tracking.finish(r.loggers)
    return summary


def fit(cfg: DictConfig, logs: LogTable | None = None) -> dict[str, Any]:
    """Run a composed recipe end to end (`build`, then `run`); returns the summary."""
    return run(build(cfg, logs))


def _task(cfg: DictConfig) -> None:
    """The Hydra task: one run (once per combination with -m). Errors become exit codes, not tracebacks."""
    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.recipe = hc.runtime.choices["recipe"]
        cfg.run_dir = hc.runtime.output_dir
    try:
        summary = fit(cfg)
    except RunInterrupted as e:  # SIGTERM/SIGUSR1: last.ckpt saved, resumable
        print(f"stopped: {e}", file=sys.stderr)
        _EXIT.append(EXIT_INTERRUPTED)
        return
    except (ValueError, FileNotFoundError, InstantiationException) as e:  # bad data or settings: one line
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {_one_line(e)}  (FUSION_LIGHTNING_DEBUG=1 shows the traceback)", file=sys.stderr)
        _EXIT.append(1)
        return
    if rank_zero_only.rank == 0:
        _print_summary(summary, Path(cfg.run_dir))
        print(f"run dir: {cfg.run_dir}")


_EXIT: list[int] = []  # exit codes of the runs in this process


def _one_line(e: BaseException) -> str:
    """A run's error as one line; a bad model/data setting that Hydra's instantiate wrapped is named by
    its target and the original message (e.g. "fusion_lightning.query.routers.knn.KNNRouter: k must be >= 1, got 0")."""
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        m = re.search(r"target '([^']+)'", str(e))
        cause = " ".join(str(e.__cause__).split())
        return f"{m.group(1)}: {cause}" if m else cause
    return " ".join(str(e).split()) if isinstance(e, InstantiationException) else str(e)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print(cache_help() + "\n")
        print("recipes:")
        recipes = list_recipes()
        width = max((len(n) for n in recipes), default=0)
        for name, desc in recipes.items():
            print(f"  {name.ljust(width)}  {desc}")
        return 0 if argv else 2
    recipe = [a.split("=", 1)[1] for a in argv if a.startswith("recipe=")]
    if len(recipe) != 1:
        print(f"error: give exactly one recipe=NAME; choose from: {', '.join(list_recipes())}", file=sys.stderr)
        return 2
    multirun = any(a in ("-m", "--multirun") for a in argv)
    child = any(a.startswith("hydra.") for a in argv)  # a DDP rank Lightning's launcher started
    if not multirun and not child:  # one-line errors before Hydra runs (its own are tracebacks)
        try:
            compose_recipe(recipe[0], [a for a in argv if not a.startswith("recipe=")])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # Hydra reads sys.argv; Lightning's DDP launcher re-runs this command for the other ranks with
    # hydra.run.dir=<this run's dir>, so every rank shares one run dir
    try:
        argv = debug_overrides(argv)  # under -m too, where nothing was composed above
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    _EXIT.clear()
    register_router_recipes()  # a router YAML without a recipe file gets one (config.py)
    app = hydra.main(config_path=str(recipes_dir()), config_name="fit", version_base="1.3")(_task)
    app()
    return max(_EXIT, default=0)


if __name__ == "__main__":
    raise SystemExit(main())
