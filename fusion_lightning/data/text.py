"""Reading text input that must be UTF-8: log files for the readers, JSONL query files for the CLIs.

Bytes that are not UTF-8 are an error that names the file, the row, the field and the bytes.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fusion_lightning.data.errors import LogFormatError

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
