"""Hand-made logs for the thought-level tests (no file reader needed)."""

from __future__ import annotations

import numpy as np

from fusion_lightning.data.logtable import LogTable, load_logs
from fusion_lightning.data.readers.common import SourceData, canonical_table
from fusion_lightning.data.schema import ModelCatalog, ModelInfo

COLS = ("query", "task", "model", "response", "performance", "judge", "cost", "ground_truth", "metric", "split",
        "_file", "_row")


def make_logs(rows: list[tuple], models: list[str]) -> LogTable:
    """rows: (query, task, model, response, performance, judge, cost, split)."""
    cols: dict[str, list] = {k: [] for k in COLS}
    for i, (q, t, m, r, p, j, c, s) in enumerate(rows):
        for k, v in zip(COLS, (q, t, m, r, p, j, c, "x", "em", s, "mem", i + 1), strict=True):
            cols[k].append(v)
    cat = ModelCatalog({m: ModelInfo(m) for m in models})
    return load_logs("mem", source=SourceData(canonical_table(cols), cat), split="files", val_fraction=0)


def planted_logs(n_per_task: int = 40, tasks: int = 4, seed: int = 0) -> LogTable:
    """Queries of task t use words Q_t, their answers words P_t (disjoint): under a lexical encoder a
    query has ~0 cosine with every template, so the frozen encoder cannot see which task's templates
    fit; a trained retriever can learn the Q_t -> P_t map."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(tasks):
        qwords = [f"q{t}w{i}" for i in range(10)]
        pwords = [f"p{t}w{i}" for i in range(10)]
        for i in range(n_per_task):
            split = "test" if i % 5 == 0 else ("val" if i % 5 == 1 else "train")
            q = "ask " + " ".join(rng.choice(qwords, 5)) + f" z{t}x{i}"
            a = "Then " + " ".join(rng.choice(pwords, 6)) + "."
            rows.append((q, f"task{t}", "m", a, 1.0, 1.0, 0.01, split))
    return make_logs(rows, ["m"])
