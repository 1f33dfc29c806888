"""The LightningDataModule base every fusion level subclasses: load the logs once, split, report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from fusion_lightning.data.logtable import LogTable, load_logs
from fusion_lightning.data.source import DataSource
from fusion_lightning.io import atomic_write


def load_from_config(data: Mapping[str, Any] | DictConfig) -> LogTable:
    """The `data` config group (a DataSource) -> a validated, split LogTable."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    d = DataSource.from_config(dict(data))
    split_args = dict(on_error=d.on_error, duplicates=d.duplicates, split=d.split, split_seed=d.split_seed,
                      val_fraction=d.val_fraction, test_fraction=d.test_fraction, rescore=d.rescore)
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
            self._logs = load_from_config(self.data_config)
        return self._logs

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
