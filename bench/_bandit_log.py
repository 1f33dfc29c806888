"""bench/bandit.py's shared pieces: a pooled full-information log (FullLog) with its embeddings, folds and
the bandit logs cut from it, the recipes the benchmark trains, and small table helpers."""

from __future__ import annotations

import argparse
import csv
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from _folds import query_folds

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.arrow import codes, from_codes
from fusion_lightning.data.datamodule import load_from_config
from fusion_lightning.data.embeddings import build_encoder, embed_texts
from fusion_lightning.data.logtable import DataReport, LogTable
from fusion_lightning.data.schema import SPLITS

SETTING = "performance_first"
QUICK_DATA = ["data.synthetic.n_queries=300", "data.synthetic.models=4", "encoder=hashing"]


# -- data ------------------------------------------------------------------------------------------------
def overrides(spec: str, args: argparse.Namespace) -> list[str]:
    name, _, path = spec.partition("=")
    over = [f"data={name}", *([f"data.path={path}"] if path else [])]
    return over + (QUICK_DATA if args.quick else [])


def recipe(name: str, spec: str, run_dir: str, args: argparse.Namespace, epochs: int | None = None,
           extra: tuple[str, ...] = ()):
    over = [*overrides(spec, args), "logger=none", f"run_dir={run_dir}", f"seed={args.seed}",
            "~callbacks.progress_bar", "~callbacks.routing_report", "+trainer.enable_progress_bar=false", *extra]
    if epochs and name != "knn":
        over.append(f"trainer.max_epochs={epochs}")
    return compose_recipe(f"router_{name}", over)


class FullLog:
    """A pooled full-information log: its matrix, query embeddings and the cross-fitting folds."""

    def __init__(self, spec: str, args: argparse.Namespace):
        self.spec, self.name = spec, spec.partition("=")[0]
        cfg = recipe("mlp", spec, "/tmp/unused", args)
        self.logs = load_from_config({**cfg.data, "split": "query", "responses": False})
        self.qm = qm = self.logs.matrix()
        self.perf = np.nan_to_num(qm.performance).astype(np.float64)
        self.mask = qm.mask.astype(bool)
        self.tasks = np.asarray(qm.tasks).astype(str)
        self.models = list(qm.models)
        t0 = time.perf_counter()
        self.feats = embed_texts(qm.queries, build_encoder(cfg.encoder), cfg.datamodule.embedding_cache)
        self.embed_s = time.perf_counter() - t0
        self.encoder = cfg.encoder
        self.folds = query_folds(qm, args.folds, args.seed)
        self.row = {q: i for i, q in enumerate(qm.query_ids.tolist())}
        self.oracle = np.where(self.mask, self.perf, -np.inf).max(1)

    def rows_of(self, m) -> np.ndarray:
        """Rows (in this log's matrix) of a sub-matrix's queries."""
        return np.array([self.row[q] for q in m.query_ids.tolist()], np.int64)

    def columns(self, names: list[str]) -> np.ndarray:
        """Column in `names` of each of this log's models (a router's column order -> ours)."""
        where = {m: i for i, m in enumerate(names)}
        return np.array([where[m] for m in self.models], np.int64)

    def _table(self, keep: np.ndarray, qrow: np.ndarray, split_of: np.ndarray) -> pa.Table:
        """The full log's rows where `keep`, with each row's split from `split_of` (per query row)."""
        out = self.logs.table.filter(pa.array(keep))
        names = list(SPLITS)
        code = np.array([names.index(s) for s in split_of[qrow[keep]]], np.int64)
        return out.set_column(out.schema.get_field_index("split"), "split", from_codes(code, names))

    def _log(self, table: pa.Table) -> LogTable:
        rep = self.logs.report
        return LogTable(table, self.logs.catalog, DataReport(dict(rep.counts), list(rep.notes), rep.quarantine),
                        self.logs.task_descriptions)

    def _row_cols(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row of the full log's table: its query's row and its model's column in the matrix."""
        t = self.logs.table
        qi, qids = codes(t["query_id"])
        mi, mvalues = codes(t["model"])
        qrow = np.array([self.row.get(q, -1) for q in qids], np.int64)[qi]
        mcol = np.array([self.models.index(m) if m in self.models else -1 for m in mvalues], np.int64)[mi]
        return qrow, mcol

    def full_table(self, rows: np.ndarray, split_of: np.ndarray) -> LogTable:
        """Every call of the queries in `rows` (full information), split as `split_of` says."""
        qrow, _ = self._row_cols()
        return self._log(self._table(np.isin(qrow, rows), qrow, split_of))

    def bandit_table(self, rows: np.ndarray, chosen: np.ndarray, prop: np.ndarray, split_of: np.ndarray,
                     policy: np.ndarray, policies: list[str]) -> LogTable:
        """The bandit log of the revealed queries: per row of `rows`, the full log's call to the chosen
        model, with its propensity, the policy that served it and the query's split."""
        qrow, mcol = self._row_cols()
        pick = np.full(len(self.qm), -1, np.int64)
        pick[rows] = chosen
        at = np.full(len(self.qm), -1, np.int64)
        at[rows] = np.arange(len(rows))
        safe = np.maximum(qrow, 0)
        keep = (qrow >= 0) & (pick[safe] >= 0) & (mcol == pick[safe])
        out = self._table(keep, qrow, split_of)
        k = at[qrow[keep]]
        out = out.set_column(out.schema.get_field_index("propensity"), "propensity",
                             pa.array(prop[k].astype(np.float64), pa.float64()))
        out = out.set_column(out.schema.get_field_index("policy"), "policy", from_codes(policy[k], policies))
        return self._log(out)


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# -- 1. targets by K-fold cross-fitting -------------------------------------------------------------------
def predict_all(module, dm, log: FullLog) -> np.ndarray:
    """[N, M] a trained router's predicted reward for every query of the log (all of the fold's splits)."""
    out = np.full((len(log.qm), len(log.models)), np.nan)
    cols = log.columns(list(module.hparams.models))
    module.eval()
    with torch.no_grad():
        for s, split in dm.splits.items():
            if not len(split):
                continue
            t = split.tensors
            p, c = module.predict(t["x"], t["task"])
            out[log.rows_of(dm.matrices[s])] = module.predicted_reward(p, c, SETTING).numpy()[:, cols]
    return out


# -- reports ---------------------------------------------------------------------------------------------
def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def f3(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:+.3f}" if x < 0 else f"{x:.3f}"


def write_csv(path: Path, rows: list[dict]) -> None:

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def yes(b: bool) -> str:
    return "**met**" if b else "**not met**"
