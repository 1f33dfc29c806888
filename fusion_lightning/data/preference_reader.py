"""Reading Chatbot Arena-style battle files: JSONL / JSON / CSV / parquet with `prompt`, `model_a`, `model_b`,
`winner` (model_a | model_b | tie | tie (bothbad)) and optional `judge`, `language`, `turn`.

`prompt` is text or a list of chat turns (`{"role", "content"}` dicts, or plain strings as in the arena
55k release, also as a JSON-encoded string): the query is the user turns' text joined by newlines. Files
without `prompt` but with `conversation_a` (the `chatbot_arena_conversations` release) take its user turns.
Every bad row is a RowIssue naming file, row and field: raised together, or quarantined
(data.on_error=quarantine) with its reasons.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from fusion_lightning.data.errors import LogFormatError, LogValidationError, RowIssue
from fusion_lightning.data.logtable import DataReport
from fusion_lightning.data.readers.common import ReaderOptions, require_columns
from fusion_lightning.data.readers.files import find_files, split_from_name, task_from_name
from fusion_lightning.data.readers.llmrouter import CATALOG_NAMES
from fusion_lightning.data.schema import ModelCatalog, ModelInfo, parse_param_count
from fusion_lightning.data.text import read_json_records, read_text
from fusion_lightning.data.validate import ON_ERROR

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
REQUIRED = ("model_a", "model_b", "winner")
EXTRA = ("judge", "language", "turn")
WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
_WINNERS_SHOWN = ", ".join(repr(w) for w in WINNERS)


def _records(f: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, record) of one file; rows are lines (JSONL), records (JSON array, parquet) or the line where a
    CSV record starts. Tabular files must have the required columns."""
    suffix = f.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from read_json_records(f)
        return
    if suffix == ".parquet":
        try:
            table = pq.read_table(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a corrupt file
            raise LogFormatError(str(f), f"cannot read parquet: {e}") from None
        _require(f, table.column_names)
        yield from enumerate(table.to_pylist(), start=1)
        return
    csv.field_size_limit(sys.maxsize)
    line = 2
    try:
        with io.StringIO(read_text(f), newline="") as fh:
            reader = csv.DictReader(fh, strict=True)
            _require(f, list(reader.fieldnames or []))
            for rec in reader:
                if None in rec or any(v is None for v in rec.values()):
                    raise LogFormatError(str(f), "wrong number of fields (truncated file?)", row=line)
                yield line, rec
                line = reader.line_num + 1
    except csv.Error as e:
        raise LogFormatError(str(f), f"cannot read CSV: {e}", row=line) from None


def _require(f: Path, header: list[str]) -> None:
    require_columns(f, header, REQUIRED)
    if "prompt" not in header and "conversation_a" not in header:
        raise LogFormatError(str(f), f"missing required column 'prompt' (or 'conversation_a'); found {header[:20]}",
                             field="prompt")


def prompt_text(value: Any) -> str:
    """The query of a prompt: the text, or the user turns of a list of chat turns joined by newlines.
    ValueError (its message is the issue) for anything else."""
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):  # a JSON-encoded list of turns (CSV / the 55k release)
            try:
                turns = json.loads(s)
            except json.JSONDecodeError:
                return value
            if isinstance(turns, list) and all(isinstance(t, (str, dict)) for t in turns):
                return prompt_text(turns)
        return value
    if isinstance(value, list):
        parts = []
        for i, turn in enumerate(value):
            if isinstance(turn, str):
                parts.append(turn)
            elif isinstance(turn, dict) and isinstance(turn.get("content", ""), str):
                if turn.get("role", "user") == "user":
                    parts.append(turn.get("content", ""))
            else:
                raise ValueError(f"turn {i + 1} is not text or a {{role, content}} object: {turn!r:.60}")
        return "\n".join(parts)
    raise ValueError(f"expected text or a list of chat turns, got {type(value).__name__}")


def _model(rec: dict, fld: str, catalog: ModelCatalog | None, issue) -> str | None:
    v = rec.get(fld)
    if v is None or (isinstance(v, str) and not v.strip()):
        issue(fld, "missing model")
        return None
    if not isinstance(v, str):
        issue(fld, f"expected a model name, got {type(v).__name__} {v!r}")
        return None
    if catalog is not None and v not in catalog:
        issue(fld, f"unknown model {v!r} (not in the model catalog)")
    return v


def _turn(v: Any) -> int | None:
    """A positive turn number, or None when the value is not one."""
    if isinstance(v, bool):
        return None
    try:
        n = float(v)
    except (TypeError, ValueError):
        return None
    return int(n) if n == int(n) and n >= 1 else None


def read_preferences(path: Path, options: ReaderOptions,
                     on_error: str = "raise") -> tuple[dict, ModelCatalog, DataReport]:
    """Every battle of the file(s) at `path`, validated: (columns of the valid rows, catalog, report)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}; choose from: {', '.join(ON_ERROR)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (data.path)")
    catalog = ModelCatalog.from_json_file(options.catalog) if options.catalog else None
    files = [f for f in find_files(path, SUFFIXES) if f.name not in CATALOG_NAMES]
    rows: dict[str, list] = {k: [] for k in ("query", "task", "model_a", "model_b", "outcome", "split", "_file",
                                             "_row")}
    extra: dict[str, list] = {k: [] for k in EXTRA}
    issues: list[RowIssue] = []
    quarantine: list[dict] = []
    read = from_conversation = 0
    for f in files:
        split, task = split_from_name(f), options.task or task_from_name(f)
        for line, rec in _records(f):
            read += 1
            bad: list[RowIssue] = []

            def issue(fld: str, msg: str, line=line, f=f, bad=bad) -> None:
                bad.append(RowIssue(str(f), line, fld, msg))

            fld = "prompt" if rec.get("prompt") is not None or "conversation_a" not in rec else "conversation_a"
            from_conversation += fld == "conversation_a"
            query = None
            if rec.get(fld) is None:
                issue("prompt", "missing prompt")
            else:
                try:
                    query = prompt_text(rec[fld])
                except ValueError as e:
                    issue(fld, str(e))
                if query is not None and not query.strip():
                    issue(fld, "empty prompt (no user text)")
            a, b = _model(rec, "model_a", catalog, issue), _model(rec, "model_b", catalog, issue)
            if a is not None and a == b:
                issue("model_b", f"the same model as model_a ({a!r}): a battle needs two models")
            winner = rec.get("winner")
            if not isinstance(winner, str) or winner not in WINNERS:
                issue("winner", f"unknown value {winner!r}; expected one of {_WINNERS_SHOWN}"
                      if winner is not None else "missing winner")
            turn = rec.get("turn")
            if turn not in (None, "") and _turn(turn) is None:
                issue("turn", f"not a turn number (1, 2, ...): {turn!r}")
            if bad:
                issues.extend(bad)
                quarantine.append({"_file": str(f), "_row": line, **{k: v for k, v in rec.items()},
                                   "_reasons": [f"{i.field}: {i.message}" for i in bad]})
                continue
            for k, v in (("query", query), ("task", task), ("model_a", a), ("model_b", b),
                         ("outcome", WINNERS[winner]), ("split", split), ("_file", str(f)), ("_row", line)):
                rows[k].append(v)
            for k in EXTRA:
                v = rec.get(k)
                extra[k].append(_turn(v) if k == "turn" and v not in (None, "") else (None if v == "" else v))
    if issues and on_error == "raise":
        raise LogValidationError(sorted(issues, key=lambda x: (x.file, x.row)))
    report = DataReport({"battles_read": read}, [], quarantine)
    if quarantine:
        report.counts["quarantined_rows"] = len(quarantine)
    if from_conversation:
        report.notes.append(f"{from_conversation} battles without `prompt`: the query is conversation_a's user turns")
    report.notes.append("pairwise preferences (model_a / model_b / winner), kept as battles: no per-model score "
                        "is derived from them; a tie counts as half a win for each side")
    rows["extra"] = {k: v for k, v in extra.items() if any(x is not None for x in v)}
    present = dict.fromkeys(rows["model_a"] + rows["model_b"])
    if catalog is None:
        catalog = ModelCatalog(source="inferred from model_a / model_b (no prices)")
        for m in present:
            catalog.add(ModelInfo(name=m, params_b=parse_param_count(m)))
    return rows, catalog, report
