"""Re-score a canonical log (`data.rescore=true`): performance := the scorer's value, where possible.

A row is re-scored when it has a response, a ground truth and a metric this package knows; the
others keep their recorded score (counted and said in the data report, never silent). Each distinct
(response, ground truth, metric) is scored once. `code_eval` rows run in sandboxed child processes,
at most `workers` at a time (threads only wait on them), with a progress bar.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace

import numpy as np
import pyarrow as pa

from fusion_lightning.data.arrow import as_objects, codes
from fusion_lightning.data.readers.common import SourceData
from fusion_lightning.scoring import get_scorer, resolve_metric
from fusion_lightning.scoring.code import SandboxLimits, code_eval


def _progress(disable: bool):
    """A rich progress bar on stderr, shown only on a terminal (logs and pipes stay clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=disable or not console.is_terminal)


def rescore_table(table: pa.Table, *, workers: int | None = None, progress: bool = True,
                  code_limits: SandboxLimits | None = None) -> tuple[pa.Table, dict[str, int], list[str]]:
    """(table with re-scored `performance`, counts, notes) for a canonical (FULL/LOG_SCHEMA) table."""
    n = table.num_rows
    responses = table["response"].to_pylist()
    golds = as_objects(table["ground_truth"])
    mcode, metrics = codes(table["metric"])
    scorer_of = [resolve_metric(m) if m is not None else None for m in metrics]
    unknown = Counter(metrics[c] for c in mcode.tolist() if metrics[c] is not None and scorer_of[c] is None)
    has_scorer = np.array([s is not None for s in scorer_of], bool)
    eligible = (np.array([r is not None for r in responses], bool) & np.array([g is not None for g in golds], bool)
                & has_scorer[mcode])

    rows = np.flatnonzero(eligible)
    key_of_row: dict[int, tuple] = {}
    jobs: dict[tuple, None] = {}
    for i in rows.tolist():
        key = (responses[i], golds[i], scorer_of[mcode[i]])
        key_of_row[i] = key
        jobs.setdefault(key, None)
    values: dict[tuple, float] = {}
    code_jobs = [k for k in jobs if k[2] == "code_eval"]
    other_jobs = [k for k in jobs if k[2] != "code_eval"]
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    with _progress(disable=not progress or not jobs) as bar:
        if other_jobs:
            task = bar.add_task("re-scoring", total=len(other_jobs))
            for k in other_jobs:
                values[k] = _safe(get_scorer(k[2]), k[0], k[1])
                bar.advance(task)
        if code_jobs:
            task = bar.add_task(f"code_eval ({workers} sandboxes)", total=len(code_jobs))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(code_eval, k[0], k[1], limits=code_limits): k for k in code_jobs}
                for fut in as_completed(futures):
                    values[futures[fut]] = float(fut.result())
                    bar.advance(task)

    recorded = table["performance"]
    old = np.asarray(recorded.to_numpy(), np.float64) if n else np.zeros(0)
    new = old.copy()
    for i, key in key_of_row.items():
        new[i] = values[key]
    with np.errstate(invalid="ignore"):
        changed = int(((new != old) & ~(np.isnan(new) & np.isnan(old)))[rows].sum())
    mask = ~eligible & np.asarray(recorded.is_null().to_numpy(), bool)
    perf = pa.array(new, pa.float64(), mask=mask)  # keep recorded nulls null (validation reports them)
    table = table.set_column(table.schema.get_field_index("performance"), "performance", perf)

    kept = n - len(rows)
    counts = {"rescored_rows": len(rows), "rescore_changed": changed, "rescore_kept_rows": kept}
    by_metric = Counter(scorer_of[mcode[i]] for i in rows.tolist())
    detail = ", ".join(f"{m}: {c}" for m, c in sorted(by_metric.items())) or "none"
    notes = [f"data.rescore=true: re-scored {len(rows)} rows with fusion_lightning.scoring ({detail}); "
             f"{changed} scores changed; {kept} rows without a response, ground truth or known metric keep "
             f"their recorded score"]
    if unknown:
        notes.append("no scorer for metric(s) " + ", ".join(f"{m!r} ({c} rows)" for m, c in unknown.items())
                     + "; those rows keep their recorded score")
    return table, counts, notes


def _safe(scorer, response: str, ground_truth: str) -> float:
    try:
        return min(1.0, max(0.0, float(scorer(response, ground_truth))))
    except Exception:  # noqa: BLE001 - one odd row must not stop a re-scoring run; it scores 0
        return 0.0


def rescore_source(src: SourceData, **kwargs) -> SourceData:
    """A copy of a reader's output with re-scored performance, and the counts and notes that say so."""
    table, counts, notes = rescore_table(src.table, **kwargs)
    return replace(src, table=table, counts={**src.counts, **counts}, notes=[*src.notes, *notes])
