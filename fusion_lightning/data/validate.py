"""Validation of canonical rows: every bad row is an error naming file, row and field, or is quarantined.

Vectorised with pyarrow/numpy: only the rows that fail get a Python message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion_lightning.data.errors import LogValidationError, RowIssue
from fusion_lightning.data.readers.common import SourceData, code_values, codes, map_values, to_numpy

ON_ERROR = ("raise", "quarantine")
_VALUE_FIELDS = ("performance", "cost", "judge", "response")


@dataclass
class ValidationResult:
    table: pa.Table  # the valid rows, exact duplicates collapsed
    quarantine: list[dict] = field(default_factory=list)  # bad rows with their reasons
    counts: dict[str, int] = field(default_factory=dict)


def _flag(issues: dict[int, list[RowIssue]], table: pa.Table, mask: np.ndarray, fld: str, msg, values=None) -> None:
    """Record an issue for every row where `mask` is true; `msg` may be a function of the value."""
    rows = np.flatnonzero(mask)
    if not len(rows):
        return
    files = table["_file"].take(pa.array(rows)).to_pylist()
    lines = table["_row"].take(pa.array(rows)).to_pylist()
    vals = values.take(pa.array(rows)).to_pylist() if values is not None else [None] * len(rows)
    for r, f, line, v in zip(rows.tolist(), files, lines, vals, strict=True):
        issues.setdefault(r, []).append(RowIssue(f, line, fld, msg(v) if callable(msg) else msg))


def blank(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row: null, empty or only whitespace. Once per distinct value, in Arrow; its Unicode whitespace is
    exactly Python's `str.isspace` (tested over every code point), so this is `v is None or not v.strip()`."""
    idx, values = code_values(col)
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values.cast(pa.string()))), 0), True)
    return to_numpy(empty)[idx] if len(values) else np.zeros(len(idx), bool)


def _range_checks(t: pa.Table, issues: dict[int, list[RowIssue]], catalog_names: list[str],
                  unparsed: np.ndarray) -> None:
    """`unparsed`: rows whose reader already reported an unparseable value (not reported again as missing)."""
    _flag(issues, t, blank(t["query"]), "query", "empty query text")
    _flag(issues, t, blank(t["task"]), "task", "missing task")
    m = t["model"]
    known = set(catalog_names)
    unknown = map_values(m, lambda v: v not in known)  # once per distinct model, not per row
    _flag(issues, t, unknown, "model", lambda v: f"unknown model {v!r} (not in the model catalog)", m)
    unparsed = unparsed | unknown  # an unknown model has no price either: one issue, not two

    perf = t["performance"]
    p = to_numpy(perf, np.nan)
    _flag(issues, t, to_numpy(pc.is_null(perf)) & ~unparsed, "performance", "missing score")
    _flag(issues, t, np.isnan(p) & to_numpy(pc.is_valid(perf)), "performance", "NaN")
    with np.errstate(invalid="ignore"):
        _flag(issues, t, (p < 0) | (p > 1), "performance", lambda v: f"out of range [0, 1]: {v}", perf)

    cost = t["cost"]
    c = to_numpy(cost, np.nan)
    present = to_numpy(pc.is_valid(cost))
    _flag(issues, t, np.isnan(c) & present, "cost", "NaN")
    with np.errstate(invalid="ignore"):
        _flag(issues, t, c < 0, "cost", lambda v: f"negative cost: {v}", cost)
    if present.any():  # a log with costs must have them on every row
        _flag(issues, t, ~present & ~unparsed, "cost", "missing cost (other rows of this log have one)")

    judge = t["judge"]
    j = to_numpy(judge, 0.0)
    _flag(issues, t, np.isnan(j), "judge", "NaN")
    with np.errstate(invalid="ignore"):
        _flag(issues, t, (j < 0) | (j > 1), "judge", lambda v: f"out of range [0, 1]: {v}", judge)
    for fld in ("input_tokens", "output_tokens"):
        tok = to_numpy(t[fld], 0)
        _flag(issues, t, tok < 0, fld, lambda v: f"negative token count: {v}", t[fld])


def _duplicates(t: pa.Table, issues: dict[int, list[RowIssue]]) -> np.ndarray:
    """Mask of exact duplicate (query, model) rows to collapse; conflicting duplicates become issues."""
    qi, _ = codes(t["query_id"])
    mi, models = codes(t["model"])
    key = qi * len(models) + mi
    if int(qi.max(initial=-1) + 1) * len(models) <= 8 * len(key) + 1024 and \
            np.bincount(key, minlength=1).max(initial=0) <= 1:
        return np.zeros(len(t), bool)  # no (query, model) pair twice: nothing to compare
    order = np.argsort(key, kind="stable")
    ks = key[order]
    dup_pos = np.flatnonzero(ks[1:] == ks[:-1]) + 1  # positions (in sorted order) repeating the previous key
    collapse = np.zeros(len(t), bool)
    if not len(dup_pos):
        return collapse
    # first row of each duplicate group, for every repeated row
    group_start = np.maximum.accumulate(np.where(np.r_[True, ks[1:] != ks[:-1]], np.arange(len(ks)), 0))
    rows, firsts = order[dup_pos], order[group_start[dup_pos]]
    vals = {f: t[f].to_pylist() for f in _VALUE_FIELDS}
    files, lines = t["_file"].to_pylist(), t["_row"].to_pylist()
    for r, f0 in zip(rows.tolist(), firsts.tolist(), strict=True):
        diff = [f for f in _VALUE_FIELDS if vals[f][r] != vals[f][f0]]
        if diff:
            issues.setdefault(r, []).append(RowIssue(
                files[r], lines[r], diff[0],
                f"duplicate (query, model) row with a conflicting value: {vals[diff[0]][r]!r} here vs "
                f"{vals[diff[0]][f0]!r} at {files[f0]} row {lines[f0]}"))
        else:
            collapse[r] = True
    return collapse


def validate(src: SourceData, on_error: str = "raise") -> ValidationResult:
    """Check every row; raise on the first batch of problems, or set bad rows aside (quarantine)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}; choose from: {', '.join(ON_ERROR)}")
    t = src.table
    issues: dict[int, list[RowIssue]] = {i: [v] for i, v in src.issues.items()}
    unparsed = np.zeros(len(t), bool)
    unparsed[list(src.issues)] = True
    _range_checks(t, issues, src.catalog.names, unparsed)
    collapse = _duplicates(t, issues)
    counts = {"rows_read": t.num_rows}
    if collapse.any():
        counts["exact_duplicate_rows_collapsed"] = int(collapse.sum())
    if issues and on_error == "raise":
        ordered = sorted((i for v in issues.values() for i in v), key=lambda x: (x.file, x.row))
        raise LogValidationError(ordered)
    bad = np.zeros(len(t), bool)
    bad[list(issues)] = True
    quarantine = []
    if bad.any():
        rows = t.take(pa.array(np.flatnonzero(bad))).to_pylist()
        for r, rec in zip(np.flatnonzero(bad).tolist(), rows, strict=True):
            rec["_reasons"] = [f"{i.field}: {i.message}" for i in issues[r]]
            quarantine.append(rec)
        counts["quarantined_rows"] = int(bad.sum())
    keep = ~(bad | collapse)
    return ValidationResult(t.filter(pa.array(keep)) if not keep.all() else t, quarantine, counts)
