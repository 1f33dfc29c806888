"""What every reader shares: its options, its result, and how parsed columns become canonical rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion_lightning.data.arrow import code_values, codes, dense_unique, from_codes
from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.schema import DICT, FULL_SCHEMA, ModelCatalog, domain_of, make_query_ids


@dataclass
class ReaderOptions:
    """Options from the `data` config that readers understand."""

    catalog: str | None = None  # model catalog JSON; required where the source has no costs
    queries: str | None = None  # query file(s) to join on the query text (LLMRouter), when not beside
    task: str | None = None  # force a task name for files that carry none
    responses: bool = True  # False: leave response texts unread (null); routers never use them


@dataclass
class SourceData:
    """Canonical rows (FULL_SCHEMA) plus what the reader learnt on the way."""

    table: pa.Table
    catalog: ModelCatalog
    notes: list[str] = field(default_factory=list)  # how values were derived, e.g. estimated costs
    counts: dict[str, int] = field(default_factory=dict)  # e.g. duplicates across split files
    issues: dict[int, RowIssue] = field(default_factory=dict)  # table row index -> parse problem
    task_descriptions: dict[str, str] = field(default_factory=dict)


def require_columns(path: Path, present: list[str], required: tuple[str, ...], row: int | None = None) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise LogFormatError(str(path), f"missing required column(s) {missing}; found {present[:20]}", row=row)


def to_float(value: Any) -> float | None:
    """Lenient numeric parse: numbers, numeric strings, booleans and 'True'/'False'; None if not numeric."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lower() in ("true", "false"):
            return 1.0 if s.lower() == "true" else 0.0
        try:
            return float(s)
        except ValueError:
            return None
    return None


def canonical_table(columns: dict[str, Any]) -> pa.Table:
    """Build a FULL_SCHEMA table from column lists; absent columns become nulls; ids filled in.

    `query_id` is derived (hash of task + query) where missing, and `domain` from the task.
    """
    n = len(columns["query"])
    arrays = []
    for f in FULL_SCHEMA:
        col = columns.get(f.name)
        # from_pandas=False: a NaN in the source stays NaN, so validation reports it as NaN, not as missing
        arrays.append(pa.nulls(n, f.type) if col is None else pa.array(col, type=f.type, from_pandas=False))
    table = pa.Table.from_arrays(arrays, schema=FULL_SCHEMA)
    return fill_derived(table)


def fill_derived(table: pa.Table) -> pa.Table:
    """Fill query_id (content hash of task + text) and domain where the source has none."""
    if table.num_rows == 0:
        return table
    if table["query_id"].null_count:
        # hash each distinct (task, query) pair once, via dictionary codes
        ti, tasks = code_values(table["task"])
        qi, queries = code_values(table["query"])
        key = ti * len(queries) + qi
        uniq, inverse = dense_unique(key, len(tasks) * len(queries))
        t_of, q_of = np.divmod(uniq, len(queries))
        ids = make_query_ids(tasks.take(pa.array(t_of)), queries.take(pa.array(q_of)))
        derived = from_codes(inverse.ravel(), ids, distinct=True)  # make_query_ids guarantees it
        if table["query_id"].null_count < len(table):  # some rows carry their own id: keep those
            derived = pc.if_else(pc.is_null(table["query_id"]), derived.cast(pa.string()),
                                 table["query_id"].cast(pa.string())).cast(DICT)
        table = table.set_column(table.schema.get_field_index("query_id"), "query_id", derived)
    if table["domain"].null_count:
        ti, tasks = codes(table["task"])
        dom = from_codes(ti, [domain_of(t or "") for t in tasks])
        if table["domain"].null_count < len(table):
            dom = pc.if_else(pc.is_null(table["domain"]), dom.cast(pa.string()),
                             table["domain"].cast(pa.string())).cast(DICT)
        table = table.set_column(table.schema.get_field_index("domain"), "domain", dom)
    return table
