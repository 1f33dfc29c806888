"""The LightningDataModule base every fusion level subclasses: load the logs once, split, report."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from fusion_lightning.data.bandit import LOGGERS, checkpoint_id, describe_log, simulate_bandit
from fusion_lightning.data.logtable import DataReport, LogTable, load_logs, note_shape
from fusion_lightning.data.matrix import QueryMatrix
from fusion_lightning.data.source import BanditSimulation, DataSource
from fusion_lightning.io import atomic_write

RouterScores = Callable[[str, QueryMatrix], np.ndarray]  # (checkpoint, matrix) -> [Q, M] predicted reward


def load_from_config(data: Mapping[str, Any] | DictConfig, router_scores: RouterScores | None = None) -> LogTable:
    """The `data` config group (a DataSource) -> a validated, split LogTable; with `data.bandit.logger` set,
    the simulated bandit log of it (`router_scores` computes a router logger's scores: the query level's)."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    d = DataSource.from_config(dict(data))
    logs = _load(d)
    if d.bandit.logger != "none":
        logs = simulated_bandit(logs, d.bandit, router_scores)
    return logs


def simulated_bandit(logs: LogTable, b: BanditSimulation, router_scores: RouterScores | None = None) -> LogTable:
    """`logs` (full-information) as a bandit log drawn by the logger `b` names; the full log stays as `truth`."""
    if b.logger not in LOGGERS:
        raise ValueError(f"data.bandit.logger={b.logger!r}; choose from: {', '.join(LOGGERS)}")
    if logs.bandit:
        raise ValueError("data.bandit simulates a bandit log from a full-information log, and this log is already "
                         f"a bandit log ({logs.shape.reason})")
    qm = logs.matrix()
    scores, policy_id = None, None
    if b.logger == "router":
        if not b.checkpoint:
            raise ValueError("data.bandit.logger=router needs data.bandit.checkpoint=PATH (a router checkpoint)")
        if router_scores is None:
            raise ValueError("data.bandit.logger=router needs a router DataModule (the query level) to route the log")
        scores, policy_id = router_scores(b.checkpoint, qm), f"router:{checkpoint_id(b.checkpoint)}"
    table, _ = simulate_bandit(logs.table, qm, b.logger, epsilon=b.epsilon, temperature=b.temperature,
                               scores=scores, policy_id=policy_id, seed=b.seed)
    report = DataReport(dict(logs.report.counts), list(logs.report.notes), logs.report.quarantine)
    out = LogTable(table, logs.catalog, report, logs.task_descriptions, truth=logs)
    out._shape = describe_log(table, logs.models, "bandit")
    out._shape.reason = (f"simulated from the full log by data.bandit: logger {b.logger}, epsilon {b.epsilon:g}, "
                         f"seed {b.seed}; the full log is kept as the truth")
    note_shape(out)
    return out


def _load(d: DataSource) -> LogTable:
    split_args = dict(on_error=d.on_error, duplicates=d.duplicates, split=d.split, split_seed=d.split_seed,
                      val_fraction=d.val_fraction, test_fraction=d.test_fraction, rescore=d.rescore,
                      log_kind=d.log_kind)
    if d.format == "synthetic":
        from fusion_lightning.data.readers.llmfusionbench import from_tables
        from fusion_lightning.data.synthetic import generate_llmfusionbench

        table = generate_llmfusionbench(**asdict(d.synthetic))
        return load_logs("synthetic", source=from_tables([("synthetic", table)], d.reader_options()), **split_args)
    if d.format == "preferences":
        raise ValueError("data.format=preferences holds pairwise battles, not task scores: train on them with "
                         "recipe=router_bt (its DataModule reads them)")
    if d.path is None:
        raise ValueError(f"data.path is required for data.format={d.format}")
    return load_logs(d.format, d.path, options=d.reader_options(), **split_args)


class LogDataModule(L.LightningDataModule):
    """Loads the logs named by the `data` config once; subclasses turn them into batches.

    `logs`: an already loaded and split LogTable to use instead (e.g. one cross-validation fold).
    """

    def __init__(self, data: Mapping[str, Any] | None = None, logs: LogTable | None = None):
        super().__init__()
        self.data_config = dict(data or {})
        self._logs: LogTable | None = logs

    @property
    def logs(self) -> LogTable:
        if self._logs is None:
            self._logs = load_from_config(self.data_config, self.router_scores)
        return self._logs

    router_scores: RouterScores | None = None  # how a router logger routes a log (data.bandit); the query level's

    def _loader(self, split: str, train: bool) -> DataLoader:
        """The DataLoader of one split (train: shuffled); subclasses build it."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def model_kwargs(self) -> dict[str, Any]:
        """What the LightningModule needs to know about the data (sizes, names); fit passes it on."""
        return {}

    def summary(self) -> dict[str, int]:
        """Counts for summary.json."""
        return self.logs.summary()

    def write_artifacts(self, run_dir: Path) -> dict[str, str]:
        """Files the data step leaves in the run dir, name -> path: the data report (counts and how
        values were derived) and, with data.on_error=quarantine, the quarantined rows."""
        report = Path(run_dir) / "data_report.json"
        atomic_write(report, json.dumps({"counts": self.summary(), "notes": self.logs.report.notes}, indent=2))
        out = {"data_report": str(report)}
        q = self.logs.report.write_quarantine(Path(run_dir) / "quarantine.jsonl")
        if q:
            out["quarantine"] = str(q)
        return out
