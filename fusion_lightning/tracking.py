"""Experiment tracking: secret redaction, the W&B logger preset and the run-dir artefacts as W&B media.

Why here and not in the loggers' YAML: W&B needs decisions made at run time (offline when no API key
is configured, group/name/id from the SLURM job), every config that leaves the process must have its
secrets redacted, and the artefacts (routing tables, Pareto plot, selection and student reports)
only exist after `trainer.test`, so `fit` hands them over at the end.
"""

from __future__ import annotations

import csv
import json
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

REDACTED = "<redacted>"
_SECRET_WORDS = {"secret", "password", "passwd", "credential", "credentials", "apikey"}
_REFERENCE = {"env", "var", "name", "file", "path", "id", "ids"}  # api_key_env: names where a secret lives
_SECRET_LAST = {"token", "key"}  # hf_token, access_token; api_key, secret_key (not max_new_tokens, pad_token_id)


def is_secret_name(name: str) -> bool:
    """`api_key`, `OPENAI_API_KEY`, `hf_token`, `db_password`, `client_secret`, ... (not `max_new_tokens`,
    nor references such as `api_key_env` or `token_file`)."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()) if w]
    if not words or words[-1] in _REFERENCE:
        return False
    joined = "_".join(words)
    return ("api_key" in joined or bool(_SECRET_WORDS & set(words))
            or (words[-1] in _SECRET_LAST and (words[-1] == "token" or len(words) > 1 and words[-2] in
                                               ("api", "secret", "access", "private", "auth"))))


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables named like secrets (longest first, so substrings redact cleanly)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if is_secret_name(k) and len(v) >= 6}, key=len, reverse=True)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a config tree with secret-named keys and any occurrence of a secret env value replaced."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_name(k) and obj[k] not in (None, "") else redact(v, secrets)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
    return obj


def has_wandb_credentials() -> bool:
    """WANDB_API_KEY set, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def slurm_job_tag() -> str | None:
    """`<array job>_<task>` or `<job>` when running under SLURM (stable across requeues)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID") or None


class RedactingWandbLogger(WandbLogger):
    """Lightning's WandbLogger, but every hyperparameter dict is redacted before it reaches W&B."""

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = vars(params) if not isinstance(params, dict) else params
        super().log_hyperparams(redact(_plain(params)))


def _plain(obj: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj if isinstance(obj, str | int | float | bool | type(None)) else str(obj)


def wandb_logger(project: str, save_dir: str, entity: str | None = None, group: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, job_type: str | None = None,
                 id: str | None = None, mode: str | None = None, log_model: bool = False,
                 **kwargs: Any) -> RedactingWandbLogger:
    """The `logger=wandb` preset. mode: online | offline | None (offline unless an API key is configured;
    WANDB_MODE in the environment wins). Group/name/id default to WANDB_RUN_GROUP / WANDB_NAME / the
    SLURM job id, so a requeued job continues the same W&B run."""
    job = slurm_job_tag()
    group = group or os.environ.get("WANDB_RUN_GROUP") or (f"slurm-{job.split('_')[0]}" if job else None)
    name = name or os.environ.get("WANDB_NAME") or (f"{job_type or 'run'}-{job}" if job else None)
    id = id or os.environ.get("WANDB_RUN_ID") or (f"{project}-{job}".replace("/", "-") if job else None)
    mode = os.environ.get("WANDB_MODE") or mode or ("online" if has_wandb_credentials() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if _argv_has_secret(sys.argv) and "settings" not in kwargs:
        import wandb  # W&B's run metadata records the command line: leave it out rather than leak a secret

        kwargs["settings"] = wandb.Settings(x_disable_meta=True)
    return RedactingWandbLogger(project=project, entity=entity, group=group, name=name, tags=list(tags or []),
                                job_type=job_type, id=id, save_dir=save_dir, mode=mode,
                                offline=mode == "offline", log_model=log_model, resume="allow" if id else None,
                                **kwargs)


def _argv_has_secret(argv: list[str]) -> bool:
    values = secret_env_values()
    return any(is_secret_name(a.split("=", 1)[0].lstrip("+~").rsplit(".", 1)[-1]) and "=" in a
               or any(v in a for v in values) for a in argv)


def log_config(loggers: list[Logger], cfg: dict[str, Any]) -> None:
    """The resolved, redacted recipe config as hyperparameters of every logger."""
    for logger in loggers:
        if isinstance(logger, WandbLogger | TensorBoardLogger):
            logger.log_hyperparams({"config": redact(cfg)})


@rank_zero_only
def log_artifacts(loggers: list[Logger], run_dir: Path, summary: dict[str, Any]) -> None:
    """Run-dir artefacts named in the summary as W&B tables/images (TensorBoard: images and text)."""
    files = {k: Path(run_dir) / v for k, v in summary.get("artifacts", {}).items()}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _to_wandb(logger, files, summary)
        elif isinstance(logger, TensorBoardLogger):
            _to_tensorboard(logger, files)


def _csv_rows(path: Path) -> tuple[list[str], list[list[Any]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    cols, body = rows[0], rows[1:]
    return cols, [[_num(c) for c in r] for r in body]


def _num(cell: str) -> Any:
    try:
        return float(cell)
    except ValueError:
        return cell


def _selection_rows(path: Path) -> tuple[list[str], list[list[Any]]]:
    """selection_report.json: {split: {counters..., by_task: {...}, by_source: {...}}} as long rows."""
    rows = []
    for split, rep in json.loads(path.read_text()).items():
        for field, value in rep.items():
            if isinstance(value, dict):
                rows += [[split, field, str(k), _scalar(v)] for k, v in value.items()]
            else:
                rows.append([split, field, "", _scalar(value)])
    return ["split", "field", "key", "value"], rows


def _scalar(v: Any) -> Any:
    return v if isinstance(v, int | float) else json.dumps(v)[:500]


def _to_wandb(logger: WandbLogger, files: dict[str, Path], summary: dict[str, Any]) -> None:
    import wandb

    run = logger.experiment
    for key, path in files.items():
        if not path.is_file():
            continue
        if path.suffix == ".csv":
            cols, rows = _csv_rows(path)
            run.log({f"tables/{path.stem}": wandb.Table(columns=cols, data=rows)})
        elif path.suffix == ".png":
            run.log({f"plots/{path.stem}": wandb.Image(str(path))})
        elif key.startswith("selection"):
            cols, rows = _selection_rows(path)
            run.log({f"tables/{path.stem}": wandb.Table(columns=cols, data=rows)})
    run.summary.update({**summary.get("metrics", {}), "recipe": summary.get("recipe"), "seed": summary.get("seed")})


def _to_tensorboard(logger: TensorBoardLogger, files: dict[str, Path]) -> None:
    import matplotlib.image as mpimg

    writer = logger.experiment
    for path in files.values():
        if path.suffix == ".png" and path.is_file():
            writer.add_image(path.stem, mpimg.imread(path)[..., :3], dataformats="HWC")
        elif path.suffix == ".md" and path.is_file():
            writer.add_text(path.stem, path.read_text())
    writer.flush()


def finish(loggers: list[Logger], exit_code: int = 0) -> None:
    """End W&B runs (so the next fit in this process starts a new one) and say how to upload offline runs."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        run = logger.experiment
        offline = str(getattr(run.settings, "mode", "")) in ("offline", "dryrun")
        run_path = Path(run.dir).parent if run.dir else None
        run.finish(exit_code=exit_code)
        logger._experiment = None
        if offline and run_path is not None and rank_zero_only.rank == 0:
            print(f"W&B: offline run saved in {run_path} (no API key configured); "
                  f"upload it later with: wandb sync {run_path}")
