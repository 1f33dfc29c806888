"""Pairwise preference logs (Chatbot Arena battles): a prompt, two models, which one won.

A preference is not a task score, so nothing per model is invented: the battles stay a pairwise table
(`PreferenceTable`) beside the score log, split by query exactly as a score log is (`LogTable.assign_splits`:
by query text, stratified by task, seeded, from file names when they carry splits). Routers that learn from
pairs (query/routers/bt.py) read it; where a log has only scores, `PreferenceTable.from_scores` derives the pairs
(per query, each observed model pair: higher score wins, equal scores tie) and says so (`pairs_from`).

Reading and validating the files is preference_reader.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_lightning.data.arrow import as_objects, codes, first_rows
from fusion_lightning.data.logtable import DataReport, LogTable
from fusion_lightning.data.matrix import QueryMatrix
from fusion_lightning.data.readers.common import ReaderOptions, canonical_table
from fusion_lightning.data.schema import SPLITS, ModelCatalog

# Chatbot Arena's `winner` values -> the outcome for model_a (a tie is half a win for each side)


@dataclass
class PreferenceTable:
    """Battles by query. Per query [Q]: id, text, task, split; per battle [B]: the query's index, the two
    models' indices into `models`, and the outcome for `a` (1 won, 0 lost, 0.5 tie)."""

    query_ids: np.ndarray
    queries: list[str]
    tasks: np.ndarray
    splits: np.ndarray
    models: list[str]
    query: np.ndarray  # int32 [B]
    a: np.ndarray  # int32 [B]
    b: np.ndarray  # int32 [B]
    outcome: np.ndarray  # float32 [B]
    pairs_from: str = "preferences"  # "preferences" (a preference log) or "scores" (derived, see from_scores)
    report: DataReport = field(default_factory=DataReport)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # judge / language / turn per battle, if logged
    catalog: ModelCatalog | None = None  # sizes and prices of `models`, where known

    def __len__(self) -> int:
        return len(self.query)

    def select(self, split: str) -> PreferenceTable:
        """The queries of one split and their battles (query indices renumbered)."""
        keep = self.splits == split
        new = np.full(len(keep), -1, np.int64)
        new[keep] = np.arange(int(keep.sum()))
        rows = keep[self.query]
        return PreferenceTable(
            self.query_ids[keep], [q for q, k in zip(self.queries, keep, strict=True) if k], self.tasks[keep],
            self.splits[keep], list(self.models), new[self.query[rows]].astype(np.int32), self.a[rows],
            self.b[rows], self.outcome[rows], self.pairs_from, self.report,
            {k: v[rows] for k, v in self.extra.items()}, self.catalog)

    def wins(self, n_queries: int | None = None) -> np.ndarray:
        """[Q, M, M] float32: wins[q, i, j] = wins of model i over model j on query q (ties half each)."""
        q, m = n_queries if n_queries is not None else len(self.queries), len(self.models)
        out = np.zeros(q * m * m, np.float32)
        qi = self.query.astype(np.int64)
        np.add.at(out, (qi * m + self.a) * m + self.b, self.outcome)
        np.add.at(out, (qi * m + self.b) * m + self.a, 1.0 - self.outcome)
        return out.reshape(q, m, m)

    def summary(self) -> dict[str, int]:
        """Counts for summary.json; `rows` are battles (what the fit summary prints as rows)."""
        counts = {"rows": len(self), "battles": len(self), "queries": len(self.queries), "models": len(self.models),
                  "tasks": len({t for t in self.tasks.tolist() if t}), "ties": int((self.outcome == 0.5).sum())}
        for s in SPLITS:
            in_split = self.splits == s
            counts[f"{s}_queries"] = int(in_split.sum())
            counts[f"{s}_battles"] = int(in_split[self.query].sum())
        counts.update(self.report.counts)
        return counts

    @classmethod
    def from_scores(cls, qm: QueryMatrix, tie_margin: float = 0.0) -> PreferenceTable:
        """Pairs derived from a score matrix: per query, each model pair both logged is a battle; the higher
        score wins, scores within `tie_margin` of each other tie. Vectorised over the upper triangle."""
        m = len(qm.models)
        ia, ib = np.triu_indices(m, 1)
        both = qm.mask[:, ia] & qm.mask[:, ib]
        q, k = np.nonzero(both)
        d = qm.performance[q, ia[k]].astype(np.float64) - qm.performance[q, ib[k]]
        outcome = np.where(d > tie_margin, 1.0, np.where(d < -tie_margin, 0.0, 0.5)).astype(np.float32)
        return cls(qm.query_ids, list(qm.queries), qm.tasks, qm.splits, list(qm.models), q.astype(np.int32),
                   ia[k].astype(np.int32), ib[k].astype(np.int32), outcome, pairs_from="scores")


def build_table(rows: dict[str, list], catalog: ModelCatalog, report: DataReport, split: str, split_seed: int,
                val_fraction: float, test_fraction: float) -> PreferenceTable:
    """Valid battle rows (query, task, model_a, model_b, outcome, split, _file, _row[, extra]) -> a split
    PreferenceTable. The splits are the score log's: LogTable.assign_splits over one canonical row per battle,
    which also gives each query the content-hash id a score log would give it."""
    canon = canonical_table({k: rows[k] for k in ("query", "task", "split", "_file", "_row")}
                            | {"model": rows["model_a"]})
    split_rows = LogTable(canon, ModelCatalog(), report).assign_splits(split, split_seed, val_fraction,
                                                                       test_fraction)
    report.notes.extend(n for n in split_rows.report.notes if n not in report.notes)
    t = split_rows.table
    qi, ids = codes(t["query_id"])
    first = pa.array(first_rows(qi, len(ids)))
    meta = t.select(["query", "task", "split"]).take(first)
    present = set(rows["model_a"]) | set(rows["model_b"])
    models = [m for m in catalog.names if m in present]
    index = {m: i for i, m in enumerate(models)}
    id_arr = np.empty(len(ids), dtype=object)
    id_arr[:] = ids
    return PreferenceTable(
        id_arr, as_objects(meta["query"]).tolist(), as_objects(meta["task"]), as_objects(meta["split"]), models,
        qi.astype(np.int32), np.array([index[m] for m in rows["model_a"]], np.int32),
        np.array([index[m] for m in rows["model_b"]], np.int32), np.asarray(rows["outcome"], np.float32),
        report=report, extra={k: np.asarray(v, dtype=object) for k, v in rows.get("extra", {}).items()},
        catalog=catalog)


def load_preferences(path: str | Path, options: ReaderOptions | None = None, *, on_error: str = "raise",
                     split: str = "auto", split_seed: int = 0, val_fraction: float = 0.1,
                     test_fraction: float = 0.2) -> PreferenceTable:
    """Read, validate (errors name file, row and field; or quarantine) and split a preference log."""
    from fusion_lightning.data.preference_reader import read_preferences

    rows, catalog, report = read_preferences(Path(path).expanduser(), options or ReaderOptions(), on_error)
    if not rows["query"]:
        raise ValueError(f"{path}: no valid battles left to use")
    return build_table(rows, catalog, report, split, split_seed, val_fraction, test_fraction)


def load_preferences_from_config(data: dict) -> PreferenceTable:
    """The `data` config (format=preferences) -> a validated, split PreferenceTable."""
    from fusion_lightning.data.source import DataSource

    d = DataSource.from_config(dict(data))
    if d.path is None:
        raise ValueError("data.path is required for data.format=preferences")
    if d.rescore:
        raise ValueError("data.rescore=true needs responses and gold answers; a preference log has neither")
    return load_preferences(d.path, d.reader_options(), on_error=d.on_error, split=d.split,
                            split_seed=d.split_seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction)
