"""Validation of canonical rows: every bad row is an error naming file, row and field, or is quarantined.

Vectorised with pyarrow/numpy: only the rows that fail get a Python message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion_lightning.data.arrow import code_values, codes, map_values, to_numpy
from fusion_lightning.data.errors import LogValidationError, RowIssue
from fusion_lightning.data.readers.common import SourceData

ON_ERROR = ("raise", "quarantine")
DUPLICATES = ("error", "mean", "first", "last")  # data.duplicates: a (query, model) pair logged twice, differently
_VALUE_FIELDS = ("performance", "cost", "judge", "response")


@dataclass
class ValidationResult:
    table: pa.Table  # the valid rows, exact duplicates collapsed
    quarantine: list[dict] = field(default_factory=list)  # bad rows with their reasons
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. how duplicate observations were merged


def check_duplicates_mode(mode: str) -> None:
    if mode not in DUPLICATES:
        raise ValueError(f"data.duplicates={mode!r}; choose from: {', '.join(DUPLICATES)}")


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
    _propensity_checks(t, issues, unparsed)


def _propensity_checks(t: pa.Table, issues: dict[int, list[RowIssue]], unparsed: np.ndarray) -> None:
    """A propensity is a probability the logging policy gave this call: in (0, 1]; a log that has them
    must have one on every row (off-policy estimates weight every call by it)."""
    prop = t["propensity"]
    p = to_numpy(prop, np.nan)
    present = to_numpy(pc.is_valid(prop))
    _flag(issues, t, np.isnan(p) & present, "propensity", "NaN")
    with np.errstate(invalid="ignore"):
        _flag(issues, t, (p <= 0) | (p > 1), "propensity",
              lambda v: f"out of range (0, 1]: {v} (the probability the logging policy chose this model)", prop)
    if present.any():
        _flag(issues, t, ~present & ~unparsed, "propensity",
              "missing propensity (other rows of this log have one; off-policy estimates need it on every call)")


def _propensity_conflicts(t: pa.Table, issues: dict[int, list[RowIssue]]) -> None:
    """Two rows of one (query, model) pair with different propensities: the log cannot say with which
    probability the policy chose it, so no estimator can weight it. Always an issue, whatever
    data.duplicates says (a mean of two probabilities is not the probability of either choice)."""
    prop = t["propensity"]
    if prop.null_count == len(t):
        return
    qi, _ = codes(t["query_id"])
    mi, models = codes(t["model"])
    key = qi * len(models) + mi
    p = to_numpy(prop, np.nan)
    order = np.argsort(key, kind="stable")
    ks, ps = key[order], p[order]
    starts = np.r_[True, ks[1:] != ks[:-1]] if len(ks) else np.zeros(0, bool)
    first = order[np.flatnonzero(starts)[np.cumsum(starts) - 1]]  # each row's group's first row
    differs = ~np.isclose(ps, p[first], rtol=1e-9, atol=1e-12) & ~(np.isnan(ps) & np.isnan(p[first]))
    rows, firsts = order[differs], first[differs]
    if not len(rows):
        return
    files = t["_file"].take(pa.array(firsts)).to_pylist()
    lines = t["_row"].take(pa.array(firsts)).to_pylist()
    _flag(issues, t, np.isin(np.arange(len(t)), rows), "propensity",
          lambda v: f"propensity {v} disagrees with another row of the same (query, model)", prop)
    for r, f, line in zip(rows.tolist(), files, lines, strict=True):
        issues[r][-1] = RowIssue(issues[r][-1].file, issues[r][-1].row, "propensity",
                                 f"{issues[r][-1].message} at {f} row {line}")


_MERGE_HINT = ("set data.duplicates=mean|first|last to merge repeated observations, "
               "or data.on_error=quarantine to set them aside")


@dataclass
class _Duplicates:
    """What duplicate handling decided: rows to drop, the counts, and (mean) the table with merged values."""

    drop: np.ndarray
    collapsed: int = 0  # exact duplicates removed
    merged: int = 0  # rows removed by merging conflicting groups (group size - 1, summed)
    groups: int = 0  # conflicting groups merged
    table: pa.Table | None = None  # data.duplicates=mean: the table with each group's means on its kept row


def _first_difference(t: pa.Table, rows: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    """Per pair (rows[i], firsts[i]): index into _VALUE_FIELDS of the first field whose values differ
    (null equals null only; NaN differs from NaN, as Python's `!=`), -1 where all are equal."""
    out = np.full(len(rows), -1, np.int64)
    ra, fa = pa.array(rows), pa.array(firsts)
    for k in range(len(_VALUE_FIELDS) - 1, -1, -1):  # last to first: the first differing field wins
        col = t[_VALUE_FIELDS[k]]
        a, b = col.take(ra), col.take(fa)
        same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
        out[~to_numpy(same)] = k
    return out


def _group_mean(col: pa.ChunkedArray, rows: np.ndarray, group: np.ndarray,
                n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean over each group of the non-null values of `col` at `rows`; and whether the group had any."""
    values = to_numpy(pc.cast(col.take(pa.array(rows)), pa.float64()), np.nan)
    valid = ~np.isnan(values)  # null (NaN rows have an issue: they take no part)
    total = np.bincount(group, weights=np.where(valid, values, 0.0), minlength=n_groups)
    count = np.bincount(group, weights=valid, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count, count > 0


def _write_means(t: pa.Table, kept: np.ndarray, rows: np.ndarray, group: np.ndarray) -> pa.Table:
    """The table with, on row kept[g], the mean of each numeric field over the rows of group g: performance,
    cost and judge the mean of their non-null values, token counts the rounded mean (null where none has one)."""
    n_groups = len(kept)
    for name in ("performance", "cost", "judge", "input_tokens", "output_tokens"):
        col = t[name]
        mean, has = _group_mean(col, rows, group, n_groups)
        integer = pa.types.is_integer(col.type)
        values = to_numpy(col, 0 if integer else np.nan).copy()
        null = to_numpy(pc.is_null(col)).copy()
        values[kept] = np.rint(np.where(has, mean, 0)).astype(values.dtype) if integer else np.where(has, mean, 0)
        null[kept] = ~has
        arr = pa.array(values, col.type, mask=null if null.any() else None)
        t = t.set_column(t.schema.get_field_index(name), name, arr)
    return t


def _duplicates(t: pa.Table, issues: dict[int, list[RowIssue]], mode: str = "error") -> _Duplicates:
    """Rows repeating a (query, model) pair. A group whose rows agree on every value is an exact duplicate:
    collapsed to its first row. A group that disagrees: with mode `error`, each row differing from the group's
    first row is an issue (the others are collapsed); with `mean`/`first`/`last`, the whole group becomes one
    row. Merging leaves out rows that already have an issue: they are raised or quarantined on their own."""
    n = len(t)
    qi, _ = codes(t["query_id"])
    mi, models = codes(t["model"])
    key = qi * len(models) + mi
    if int(qi.max(initial=-1) + 1) * len(models) <= 8 * len(key) + 1024 and \
            np.bincount(key, minlength=1).max(initial=0) <= 1:
        return _Duplicates(np.zeros(n, bool))  # no (query, model) pair twice: nothing to compare
    if mode == "error" or not issues:
        order = np.argsort(key, kind="stable")
    else:  # rows with an issue take no part in merging
        ok = np.ones(n, bool)
        ok[list(issues)] = False
        idx = np.flatnonzero(ok)
        order = idx[np.argsort(key[idx], kind="stable")]
    ks = key[order]
    starts = np.r_[True, ks[1:] != ks[:-1]] if len(ks) else np.zeros(0, bool)
    dup_pos = np.flatnonzero(~starts)  # positions (in sorted order) repeating the previous key
    drop = np.zeros(n, bool)
    if not len(dup_pos):
        return _Duplicates(drop)
    group = np.cumsum(starts) - 1  # group id per sorted position
    group_start = np.flatnonzero(starts)
    rows, firsts = order[dup_pos], order[group_start[group[dup_pos]]]
    diff = _first_difference(t, rows, firsts)
    if mode == "error":
        drop[rows[diff < 0]] = True
        conflict = np.flatnonzero(diff >= 0)
        if len(conflict):
            r_c, f_c = rows[conflict], firsts[conflict]
            files = t["_file"].take(pa.array(np.r_[r_c, f_c])).to_pylist()
            lines = t["_row"].take(pa.array(np.r_[r_c, f_c])).to_pylist()
            k = len(r_c)
            for i, (r, f0, d) in enumerate(zip(r_c.tolist(), f_c.tolist(), diff[conflict].tolist(), strict=True)):
                fld = _VALUE_FIELDS[d]
                here, there = t[fld][r].as_py(), t[fld][f0].as_py()
                issues.setdefault(r, []).append(RowIssue(
                    files[i], lines[i], fld,
                    f"duplicate (query, model) row with a conflicting value: {here!r} here vs {there!r} at "
                    f"{files[k + i]} row {lines[k + i]}; {_MERGE_HINT}"))
        return _Duplicates(drop, collapsed=int(drop.sum()))
    # merge modes: a group with any difference is merged as a whole, the others collapse to their first row
    conflicting = np.zeros(len(group_start), bool)
    conflicting[group[dup_pos[diff >= 0]]] = True
    exact = dup_pos[~conflicting[group[dup_pos]]]
    drop[order[exact]] = True
    members = np.flatnonzero(conflicting[group])  # sorted positions of every row of a conflicting group
    ends = np.r_[group_start[1:], len(ks)] - 1
    keep_pos = (ends if mode == "last" else group_start)[conflicting]
    drop[order[members]] = True
    drop[order[keep_pos]] = False
    out = _Duplicates(drop, collapsed=len(exact), merged=len(members) - len(keep_pos), groups=len(keep_pos))
    if mode == "mean" and len(keep_pos):
        compact = np.cumsum(conflicting) - 1  # group id -> index among the conflicting groups
        out.table = _write_means(t, order[keep_pos], order[members], compact[group[members]])
    return out


def validate(src: SourceData, on_error: str = "raise", duplicates: str = "error") -> ValidationResult:
    """Check every row; raise on the first batch of problems, or set bad rows aside (quarantine).

    `duplicates`: what a (query, model) pair logged twice with different values becomes: `error` (an issue per
    conflicting row), or one row by `mean` / `first` / `last` (see `_duplicates`)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}; choose from: {', '.join(ON_ERROR)}")
    check_duplicates_mode(duplicates)
    t = src.table
    issues: dict[int, list[RowIssue]] = {i: [v] for i, v in src.issues.items()}
    unparsed = np.zeros(len(t), bool)
    unparsed[list(src.issues)] = True
    _range_checks(t, issues, src.catalog.names, unparsed)
    _propensity_conflicts(t, issues)
    dups = _duplicates(t, issues, duplicates)
    counts = {"rows_read": t.num_rows}
    notes = []
    if dups.collapsed:
        counts["exact_duplicate_rows_collapsed"] = dups.collapsed
    if dups.merged:
        counts["duplicate_observations_merged"] = dups.merged
        how = {"mean": "averaged", "first": "first row kept", "last": "last row kept"}[duplicates]
        notes.append(f"{dups.groups} (query, model) pairs logged more than once with different values: merged "
                     f"(data.duplicates={duplicates}: {how}), {dups.merged} rows removed")
    if issues and on_error == "raise":
        ordered = sorted((i for v in issues.values() for i in v), key=lambda x: (x.file, x.row))
        raise LogValidationError(ordered)
    if dups.table is not None:
        t = dups.table  # merged values on the kept rows; bad rows are untouched
    bad = np.zeros(len(t), bool)
    bad[list(issues)] = True
    quarantine = []
    if bad.any():
        rows = t.take(pa.array(np.flatnonzero(bad))).to_pylist()
        for r, rec in zip(np.flatnonzero(bad).tolist(), rows, strict=True):
            rec["_reasons"] = [f"{i.field}: {i.message}" for i in issues[r]]
            quarantine.append(rec)
        counts["quarantined_rows"] = int(bad.sum())
    keep = ~(bad | dups.drop)
    return ValidationResult(t.filter(pa.array(keep)) if not keep.all() else t, quarantine, counts, notes)
