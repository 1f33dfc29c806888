"""LogTable: validated canonical rows (pyarrow, no Python object per row), splits by query, matrices."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion_lightning.data.arrow import (
    as_objects,
    code_values,
    codes,
    first_rows,
    from_codes,
    group_min,
    to_numpy,
)
from fusion_lightning.data.bandit import LogShape, describe_log
from fusion_lightning.data.matrix import QueryMatrix
from fusion_lightning.data.readers import ReaderOptions, SourceData, read_source
from fusion_lightning.data.schema import SPLITS, ModelCatalog
from fusion_lightning.data.validate import check_duplicates_mode, validate
from fusion_lightning.io import atomic_open

SPLIT_MODES = ("auto", "files", "query")


@dataclass
class DataReport:
    """What loading did, for the screen and summary.json: counts and notes, quarantined rows aside."""

    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    def write_quarantine(self, path: str | Path) -> Path | None:
        if not self.quarantine:
            return None
        path = Path(path)
        with atomic_open(path, "w") as fh:
            for rec in self.quarantine:
                clean = {k: "NaN" if isinstance(v, float) and v != v else v for k, v in rec.items()}
                fh.write(json.dumps(clean, default=str, allow_nan=False) + "\n")
        return path


def _stratified_assign(keys: np.ndarray, strata: np.ndarray, fractions: dict[str, float], seed: int,
                       rest: str) -> np.ndarray:
    """Assign each key a split, per stratum, with seeded shuffles; `rest` gets what the fractions leave."""
    rng = np.random.default_rng(seed)
    out = np.full(len(keys), rest, dtype=object)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        idx = idx[np.argsort(keys[idx])]  # independent of input order
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for name, frac in fractions.items():
            k = int(round(frac * len(idx)))
            if frac > 0 and k == 0 and len(idx) - start > 1:
                k = 1  # every split gets a query of each task it can spare
            out[idx[start:start + k]] = name
            start += k
    return out


class LogTable:
    """Validated multi-LLM log rows with their catalog; every fusion level reads this."""

    def __init__(self, table: pa.Table, catalog: ModelCatalog, report: DataReport | None = None,
                 task_descriptions: dict[str, str] | None = None, shape: LogShape | None = None,
                 truth: LogTable | None = None):
        self.table = table
        self.catalog = catalog
        self.report = report or DataReport()
        self.task_descriptions = task_descriptions or {}
        self._shape = shape
        self.truth = truth  # a simulated bandit log's full-information source (data.bandit)

    @property
    def shape(self) -> LogShape:
        """Calls per query and per model, and whether this is a full-information or a bandit log."""
        if self._shape is None:
            self._shape = describe_log(self.table, self.models)
        return self._shape

    @property
    def bandit(self) -> bool:
        return self.shape.kind == "bandit"

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def models(self) -> list[str]:
        """Models present in the rows, in catalog order (stable column order for matrices)."""
        present = set(codes(self.table["model"])[1])
        return [m for m in self.catalog.names if m in present]

    @property
    def has_propensities(self) -> bool:
        """The log says with which probability its logging policy chose each call."""
        return self.table["propensity"].null_count < len(self.table)

    @property
    def tasks(self) -> list[str]:
        return sorted(v for v in codes(self.table["task"])[1] if v is not None)

    def select(self, split: str) -> LogTable:
        mask = pc.fill_null(pc.equal(self.table["split"], split), False)
        truth = self.truth.select(split) if self.truth is not None else None
        return LogTable(self.table.filter(mask), self.catalog, self.report, self.task_descriptions, self._shape, truth)

    def assign_splits(self, mode: str = "auto", seed: int = 0, val_fraction: float = 0.1,
                      test_fraction: float = 0.2) -> LogTable:
        """Split by query text (never by row), stratified by task, seeded.

        auto: from file names when they carry splits, else by query. With file splits and no val
        file, val is carved out of train by query.
        """
        if mode not in SPLIT_MODES:
            raise ValueError(f"data.split={mode!r}; choose from: {', '.join(SPLIT_MODES)}")
        t = self.table
        file_splits = t["split"].null_count < len(t)
        if mode == "files" and not file_splits:
            raise ValueError("data.split=files, but no file name carries a split (_train/_val/_test)")
        by_files = mode == "files" or (mode == "auto" and file_splits)
        qi, texts = code_values(t["query"])
        n = len(texts)
        # each text's rank in sorted order: the same order as sorting the strings, but sorted once in C++
        texts_arr = np.empty(n, np.int64)
        texts_arr[np.asarray(pc.sort_indices(texts))] = np.arange(n)
        # A text under several tasks / split files gets one stratum and one file split, independent of
        # row order: the alphabetically first task, and the most held-out split (test, val, train).
        ti, tasks = codes(t["task"])
        order = sorted(range(len(tasks)), key=lambda i: tasks[i] or "")
        rank = np.empty(len(tasks), np.int64)
        rank[order] = np.arange(len(tasks))
        strata = group_min(qi, rank[ti], n)  # the task's alphabetical rank: strata are visited in name order
        if by_files:
            si, split_values = codes(t["split"])
            held_out = ("test", "val", "train")
            srank = np.array([held_out.index(v) if v in held_out else 2 for v in split_values])[si]
            qsplit = np.array(held_out, dtype=object)[group_min(qi, srank, n)]
            if val_fraction > 0 and "val" not in set(qsplit):
                train = qsplit == "train"
                qsplit[train] = _stratified_assign(texts_arr[train], strata[train], {"val": val_fraction}, seed,
                                                   "train")
        else:
            qsplit = _stratified_assign(texts_arr, strata, {"test": test_fraction, "val": val_fraction}, seed,
                                        "train")
        split_names = list(SPLITS)
        split_code = np.full(len(qsplit), -1, np.int64)
        for i, name in enumerate(split_names):  # vectorised per split name (a Python lookup per query was 10+ ms)
            split_code[qsplit == name] = i
        if (split_code < 0).any():
            raise ValueError(f"unknown split name(s): {sorted(set(qsplit[split_code < 0].tolist()))}")
        table = t.set_column(t.schema.get_field_index("split"), "split", from_codes(split_code[qi], split_names))
        report = DataReport(dict(self.report.counts), list(self.report.notes), self.report.quarantine)
        report.notes.append(f"splits {'from file names' if by_files else 'by query'} (seed {seed})")
        return LogTable(table, self.catalog, report, self.task_descriptions, self._shape)

    def query_table(self) -> pa.Table:
        """One row per query: id, text, task, domain, split, ground truth and metric."""
        qi, ids = codes(self.table["query_id"])
        cols = ["query_id", "query", "task", "domain", "split", "ground_truth", "metric"]
        return self.table.select(cols).take(pa.array(first_rows(qi, len(ids))))

    def matrix(self, models: list[str] | None = None) -> QueryMatrix:
        """Dense queries × models arrays (NaN + mask where the log has no call)."""
        t = self.table
        models = models or self.models
        qi, query_ids = codes(t["query_id"])
        col = {m: i for i, m in enumerate(models)}
        mcode, model_values = codes(t["model"])
        mi = np.array([col.get(m, -1) for m in model_values], np.int64)[mcode]
        q, m = len(query_ids), len(models)
        keep = mi >= 0
        flat = qi * m + mi  # one scatter index for every array
        if not keep.all():
            flat = flat[keep]
        arrays = {}
        names = ("performance", "cost", "judge") + (("propensity",) if self.has_propensities else ())
        for name in names:
            a = np.full(q * m, np.nan, np.float32)
            values = to_numpy(t[name], np.nan)
            a[flat] = values if keep.all() else values[keep]
            arrays[name] = a.reshape(q, m)
        mask = np.zeros(q * m, bool)
        mask[flat] = True
        mask = mask.reshape(q, m)
        meta = t.select(["query", "task", "domain", "split"]).take(pa.array(first_rows(qi, q)))
        ids = np.empty(q, dtype=object)
        ids[:] = query_ids
        return QueryMatrix(
            query_ids=ids, queries=as_objects(meta["query"]).tolist(), tasks=as_objects(meta["task"]),
            domains=as_objects(meta["domain"]), splits=as_objects(pc.fill_null(meta["split"], "")),
            models=list(models),
            performance=arrays["performance"], cost=arrays["cost"], judge=arrays["judge"], mask=mask,
            propensity=arrays.get("propensity"))

    def summary(self) -> dict[str, int]:
        """Counts for summary.json."""
        qt = self.query_table()
        counts = {"rows": len(self), "queries": qt.num_rows, "models": len(self.models), "tasks": len(self.tasks)}
        for s in SPLITS:
            counts[f"{s}_queries"] = int(pc.sum(pc.equal(qt["split"], s)).as_py() or 0)
        counts["missing_pairs_masked"] = counts["queries"] * counts["models"] - len(self)
        counts.update(self.shape.counts())
        counts.update(self.report.counts)
        return counts


def load_logs(fmt: str, path: str | Path | None = None, *, source: SourceData | None = None,
              options: ReaderOptions | None = None, on_error: str = "raise", split: str = "auto",
              split_seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
              rescore: bool = False, duplicates: str = "error", log_kind: str = "auto") -> LogTable:
    """Read (or take `source`), re-score if asked, validate, and split: the one way every recipe gets its logs.

    `rescore`: replace each row's performance by fusion_lightning.scoring's score of its response
    against its ground truth and metric (rows lacking one of the three keep theirs; see the report).
    `duplicates`: error | mean | first | last, for a (query, model) pair logged twice with different values
    (see `validate`); merged rows are counted as `duplicate_observations_merged`.
    `log_kind`: auto | full | bandit (fusion_lightning.data.bandit.describe_log); the report says which and why.
    """
    check_duplicates_mode(duplicates)  # before reading: a typo should not wait for a big file
    src = source if source is not None else read_source(fmt, path, options)
    if rescore:
        from fusion_lightning.data.rescore import rescore_source

        src = rescore_source(src)
    result = validate(src, on_error=on_error, duplicates=duplicates)
    report = DataReport({**src.counts, **result.counts}, [*src.notes, *result.notes], result.quarantine)
    logs = LogTable(result.table, src.catalog, report, src.task_descriptions)
    if len(logs) == 0:
        raise ValueError(f"{path or fmt}: no valid rows left to use")
    logs = logs.assign_splits(split, split_seed, val_fraction, test_fraction)
    logs._shape = describe_log(logs.table, logs.models, log_kind)
    note_shape(logs)
    return logs


def note_shape(logs: LogTable) -> None:
    """Say in the report what kind of log this is: a bandit log's shape, or a full log's masked pairs."""
    if logs.bandit:
        logs.report.notes.append(logs.shape.note())
        return
    masked = len(code_values(logs.table["query_id"])[1]) * len(logs.models) - len(logs)  # as summary() counts
    if masked:
        logs.report.notes.append(f"{masked} (query, model) pairs have no call in the log: masked, not zero")
