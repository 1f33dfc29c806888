"""PairwiseDataModule: battles per split for routers that learn from pairs (query/routers/bt.py).

Two sources, one interface (`pairs[split]`, a PreferenceTable, and `pair_x[split]`, its queries' embeddings):
- a preference log (data=preferences): its battles, split by query; the loaders yield the split's query
  embeddings only (there are no per-model scores, so the score-based routing metrics do not apply);
- any score log: the RouterDataModule's splits as usual (the routing evaluation runs on them), and the
  battles derived from each split's scores (`PreferenceTable.from_scores`), noted in the data report and
  named in summary.json (`pairs_from: scores`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fusion_lightning.data.embed_job import prepare_embeddings
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.matrix import TaskNormaliser
from fusion_lightning.data.preferences import PreferenceTable, load_preferences_from_config
from fusion_lightning.data.schema import SPLITS
from fusion_lightning.io import atomic_write
from fusion_lightning.query.datamodule import UNKNOWN_TASK, RouterDataModule, RouterSplit


class PairwiseDataModule(RouterDataModule):
    def __init__(self, data: dict | None = None, encoder: str = "minilm", embedding_cache: str | None = None,
                 batch_size: int = 128, num_workers: int = 0, logs: LogTable | None = None,
                 tie_margin: float = 0.0, off_policy: str = "auto", max_weight: float | None = 10.0):
        super().__init__(data, encoder, embedding_cache, batch_size, num_workers, logs, off_policy, max_weight)
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        self.tie_margin = tie_margin
        self.preference_only = logs is None and self.data_config.get("format") == "preferences"
        self._preferences: PreferenceTable | None = None
        self.pairs: dict[str, PreferenceTable] = {}
        self.pair_x: dict[str, torch.Tensor] = {}
        self.pair_notes: list[str] = []

    @property
    def preferences(self) -> PreferenceTable:
        """The preference log (data=preferences), read and split once."""
        if self._preferences is None:
            self._preferences = load_preferences_from_config(self.data_config)
        return self._preferences

    def prepare_data(self) -> None:
        if not self.preference_only:
            return super().prepare_data()
        if self.cache_dir:
            prepare_embeddings(self.preferences.queries, self.encoder_name, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.pairs:
            return
        if not self.preference_only:
            super().setup(stage)
            for split, m in self.matrices.items():
                self.pairs[split] = PreferenceTable.from_scores(m, self.tie_margin)
                self.pair_x[split] = self.splits[split].tensors["x"]
            tie = f"within {self.tie_margin} tie" if self.tie_margin else "equal scores tie"
            self.pair_notes = [f"battles derived from scores (pairs_from: scores): per query, each pair of models "
                               f"both logged is a battle, the higher score wins, {tie} "
                               f"({len(self.pairs['train'])} train battles)"]
            return
        prefs = self.preferences
        feats = self.features(prefs.queries)
        self.embed_dim = feats.shape[1]
        self.tasks = [UNKNOWN_TASK]  # battles carry no task label: every query routes as the unknown task
        self.task_classifier = None
        for split in SPLITS:
            rows = torch.from_numpy((prefs.splits == split).nonzero()[0])
            self.pairs[split] = prefs.select(split)
            self.pair_x[split] = feats[rows]
            self.splits[split] = RouterSplit({"x": feats[rows], "task": torch.zeros(len(rows), dtype=torch.long),
                                              "index": torch.arange(len(rows))})
        if len(self.pairs["train"]) == 0:
            raise ValueError("the train split has no battles; check data.split and the file names")

    def model_kwargs(self) -> dict[str, Any]:
        self.setup()
        if not self.preference_only:
            return {**super().model_kwargs(), "pairs_from": "scores"}
        prefs = self.preferences
        cat = prefs.catalog
        return {"embed_dim": self.embed_dim, "models": list(prefs.models), "tasks": self.tasks, "binary": False,
                "encoder": self.encoder_id, "normaliser": TaskNormaliser().state_dict(),
                "model_sizes": [cat[m].params_b if cat is not None and m in cat else None for m in prefs.models],
                "pairs_from": "preferences"}

    def summary(self) -> dict[str, int]:
        if self.preference_only:
            return self.preferences.summary()
        self.setup()
        return {**super().summary(), **{f"{s}_battles": len(self.pairs[s]) for s in SPLITS}}

    def description_embeddings(self) -> dict:
        if self.preference_only:
            raise ValueError("a preference log has no model or task descriptions to embed")
        return super().description_embeddings()

    def write_artifacts(self, run_dir: Path) -> dict[str, str]:
        """The data report (with how the battles were made) and, with data.on_error=quarantine, the bad rows."""
        report_obj = self.preferences.report if self.preference_only else self.logs.report
        report = Path(run_dir) / "data_report.json"
        atomic_write(report, json.dumps({"counts": self.summary(), "notes": [*report_obj.notes, *self.pair_notes]},
                                        indent=2, default=str))
        out = {"data_report": str(report)}
        q = report_obj.write_quarantine(Path(run_dir) / "quarantine.jsonl")
        if q:
            out["quarantine"] = str(q)
        return out
