"""LLMFusionBench (the FusionFactory benchmark): parquet / jsonl / csv, a `datasets` directory, or a Hub name.

Quirks handled here, vectorised with pyarrow so a 100M-token log reads fast:
- `performance` of code tasks is sometimes a string like "{'pass@1': np.float64(1.0)}";
- `cost` is in micro-dollars (converted to USD);
- models appear as `<name>` and `<name>_think` (the reasoning-prompt variant): kept as their own
  model, with `base_model` recorded in the catalog;
- `query_embedding`/`task_description_embedding` are strings "tensor([...])" present only on the
  first row of a query's block: `source_query_embeddings` parses and forward-fills them. The
  canonical record does not carry them; recipes re-embed with the configured encoder.

Served traffic (the server's request log, fusion_lightning/serving/request_log.py) is this format
with a `request_id` and `choice` per answer: feedback appends a scored copy of a record, so the last
record of each (request_id, choice) is kept, and served answers with no score yet are skipped,
counted and noted in the data report. A row without a score that is not served traffic is still
an error ("missing score").
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq

from fusion_lightning.data.arrow import code_values, first_rows
from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.readers import register_reader
from fusion_lightning.data.readers.common import ReaderOptions, SourceData, fill_derived
from fusion_lightning.data.readers.files import find_files, split_from_name
from fusion_lightning.data.schema import DICT, FULL_SCHEMA, ModelCatalog, ModelInfo, parse_param_count
from fusion_lightning.data.text import read_json_records, read_utf8_buffer

REQUIRED = ("task_name", "query", "llm", "performance")
RENAME = {"task_name": "task", "llm": "model", "input_tokens_num": "input_tokens",
          "output_tokens_num": "output_tokens", "llm_judge": "judge"}
# Columns the canonical record and the catalog use (the embedding columns: see source_query_embeddings).
USED_COLUMNS = ("task_name", "task_description", "query", "ground_truth", "metric", "llm", "input_price",
                "output_price", "input_tokens_num", "output_tokens_num", "performance", "cost", "response",
                "llm_description", "llm_judge", "query_id", "propensity", "policy")
DICT_COLUMNS = ("task_name", "task_description", "query", "ground_truth", "metric", "llm", "llm_description",
                "policy")
_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_TENSOR_RE = re.compile(r"^\s*tensor\(\s*\[(.*)\]\s*(?:,.*)?\)\s*$", re.S)


def _read_pool() -> pa.MemoryPool:
    """jemalloc for the big one-shot read where available: measured 2x faster than mimalloc here (page faults)."""
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # wheels built without jemalloc (Windows)
        return pa.default_memory_pool()


def _read_file(f: Path, responses: bool = True) -> pa.Table:
    """One file as a table; `responses=False` skips decoding the response column of parquet files (the
    largest column by far: most of the read time and memory of a log with responses)."""
    suffix = f.suffix.lower()
    try:
        if suffix == ".parquet":
            # Only the columns we use, repeated strings read dictionary-encoded: 5x faster, far less memory.
            present = [c for c in pq.read_schema(f).names if responses or c != "response"]
            fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(
                dictionary_columns=[c for c in DICT_COLUMNS if c in present]))
            # one batch per row group: a single chunk per column, so later grouping never re-combines chunks
            return pads.dataset(f, format=fmt).to_table(columns=[c for c in USED_COLUMNS if c in present],
                                                        batch_size=1 << 30, memory_pool=_read_pool())
        if suffix in (".jsonl", ".json"):
            try:  # checked UTF-8 first: pyarrow's JSON reader takes any bytes into its strings
                return pajson.read_json(pa.BufferReader(read_utf8_buffer(f)))
            except pa.ArrowInvalid:
                # pyarrow reads only JSON lines and counts rows from 0: re-read in Python, which names the
                # 1-based line of a truncated/invalid record (LogFormatError) or reads a JSON array file
                recs = [rec for _, rec in read_json_records(f)]
                try:
                    return pa.Table.from_pylist(recs)
                except (pa.ArrowInvalid, pa.ArrowTypeError):  # numbers mixed with "{'pass@1': ...}" strings
                    for rec in recs:
                        if rec.get("performance") is not None:
                            rec["performance"] = str(rec["performance"])
                    return pa.Table.from_pylist(recs)
        if suffix == ".csv":  # pyarrow checks UTF-8 but cannot say where: checked first, to name row and field
            return pacsv.read_csv(pa.BufferReader(read_utf8_buffer(f)))
    except (OSError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise LogFormatError(str(f), f"cannot read (unreadable or truncated file): {e}") from e
    raise LogFormatError(str(f), f"unsupported file type {suffix!r} (parquet, jsonl, json, csv)")


def _load_tables(path: Path, responses: bool = True) -> list[tuple[str, pa.Table]]:
    """(file name, table) for each file; a `datasets` save directory or Hub name via `datasets`."""
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
        return [(f"{path}[{name}]" if name else str(path), d.data.table) for name, d in parts]
    if not path.exists():
        import datasets  # a Hub dataset name; needs network access

        try:
            ds = datasets.load_dataset(str(path))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; report them uniformly
            raise LogFormatError(str(path), f"not a local path, and loading it as a Hub dataset failed: {e}") from e
        return [(f"{path}[{name}]", d.data.table) for name, d in ds.items()]
    files = find_files(path, (".parquet", ".jsonl", ".json", ".csv"))
    return [(str(f), _read_file(f, responses)) for f in files]


def parse_performance(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """float64 scores and a mask of values that could not be parsed (left null)."""
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
        return pc.cast(col, pa.float64()), np.zeros(len(col), bool)
    enc = pc.dictionary_encode(pc.cast(col, pa.string()))
    if isinstance(enc, pa.ChunkedArray):  # a plain Array encodes to a DictionaryArray already
        enc = enc.combine_chunks()
    parsed = []
    for s in enc.dictionary.to_pylist():
        try:
            parsed.append(float(s))
            continue
        except ValueError:
            pass
        nums = _NUM_RE.findall(s.split(":", 1)[-1]) if "{" in s else []
        parsed.append(float(nums[-1]) if nums else None)
    values = pc.take(pa.array(parsed, pa.float64()), enc.indices)
    bad = (pc.is_null(values).to_numpy(zero_copy_only=False) & pc.is_valid(col).to_numpy(zero_copy_only=False))
    return values, bad


def parse_tensor_string(s: str) -> np.ndarray:
    """'tensor([0.1, -0.2])' -> float32 array."""
    m = _TENSOR_RE.match(s)
    if not m:
        raise ValueError(f"not a tensor string: {s[:40]!r}")
    return np.array([float(x) for x in m.group(1).replace("\n", " ").split(",") if x.strip()], np.float32)


def source_query_embeddings(table: pa.Table, column: str = "query_embedding") -> dict[str, np.ndarray]:
    """query text -> embedding, forward-filling the block-first-row quirk of LLMFusionBench."""
    out: dict[str, np.ndarray] = {}
    for q, e in zip(table["query"].to_pylist(), table[column].to_pylist(), strict=True):
        if e is not None and q not in out:
            out[q] = parse_tensor_string(e)
    return out


def _first_rows(t: pa.Table, key: str) -> pa.Table:
    """The first row of each distinct `key` value (null is a value too)."""
    idx, values = code_values(t[key])
    return t.take(pa.array(np.sort(first_rows(idx, len(values)))))


def _catalog(t: pa.Table) -> ModelCatalog:
    cols = [c for c in ("llm", "input_price", "output_price", "llm_description") if c in t.column_names]
    cat = ModelCatalog(source="LLMFusionBench columns (llm, prices, llm_description)")
    for row in _first_rows(t.select(cols), "llm").to_pylist():
        name = row["llm"]
        base = name[: -len("_think")] if name.endswith("_think") else None
        cat.add(ModelInfo(name=name, params_b=parse_param_count(name), input_price=row.get("input_price"),
                          output_price=row.get("output_price"), description=row.get("llm_description") or "",
                          base_model=base))
    return cat


def _repeat(value: str | None, n: int) -> pa.Array:
    """A constant dictionary column (a Python list of 1M strings is slow)."""
    if value is None:
        return pa.nulls(n, DICT)
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], pa.string()))


def _to_canonical(name: str, t: pa.Table, offset: int) -> tuple[pa.Table, dict[int, RowIssue]]:
    missing = [c for c in REQUIRED if c not in t.column_names]
    if missing:
        raise LogFormatError(name, f"missing required column(s) {missing}; found {t.column_names[:20]}")
    n = t.num_rows
    perf, bad = parse_performance(t["performance"])
    issues: dict[int, RowIssue] = {}
    first_row = 2 if name.endswith(".csv") else 1
    if bad.any():
        raw = t["performance"]
        for i in np.flatnonzero(bad)[:1000]:
            issues[offset + int(i)] = RowIssue(name, int(i) + first_row, "performance",
                                               f"not a number: {raw[int(i)].as_py()!r}")
    cols = {}
    for f in FULL_SCHEMA:
        src = {v: k for k, v in RENAME.items()}.get(f.name, f.name)
        if f.name == "performance":
            cols[f.name] = perf
        elif f.name == "cost" and "cost" in t.column_names:
            cols[f.name] = pc.divide(pc.cast(t["cost"], pa.float64()), 1e6)  # micro-dollars -> USD
        elif f.name == "split":
            cols[f.name] = _repeat(split_from_name(Path(name.split("[")[0])), n)
        elif f.name == "_file":
            cols[f.name] = _repeat(name, n)
        elif f.name == "_row":
            cols[f.name] = pa.array(np.arange(first_row, n + first_row, dtype=np.int64))
        elif src in t.column_names:
            try:
                cols[f.name] = pc.cast(t[src], f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise LogFormatError(name, f"column cannot be read as {f.type}: {e}", field=src) from e
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=FULL_SCHEMA), issues


@register_reader("llmfusionbench")
def read_llmfusionbench(path: Path, options: ReaderOptions) -> SourceData:
    return from_tables(_load_tables(path, options.responses), options)


def from_tables(named_tables: list[tuple[str, pa.Table]], options: ReaderOptions | None = None) -> SourceData:
    """Canonical rows from in-memory LLMFusionBench tables (named for error messages)."""
    options = options or ReaderOptions()
    parts, issues, catalogs, descs, served = [], {}, [], {}, []
    offset = 0
    for name, t in named_tables:
        served.append(_served_keys(t))
        if not options.responses and "response" in t.column_names:
            t = t.drop_columns(["response"])  # canonical `response` is then null
        canon, iss = _to_canonical(name, t, offset)
        if "[" in name:  # DatasetDict split names carry the split
            split = name.rsplit("[", 1)[1].rstrip("]")
            split = {"validation": "val", "valid": "val"}.get(split, split)
            canon = canon.set_column(canon.schema.get_field_index("split"), "split",
                                     pa.array([split] * canon.num_rows, pa.string()))
        if options.task:
            canon = canon.set_column(canon.schema.get_field_index("task"), "task",
                                     pa.array([options.task] * canon.num_rows, pa.string()))
        parts.append(canon)
        issues.update(iss)
        catalogs.append(_catalog(t))
        if "task_description" in t.column_names:
            first = _first_rows(t.select(["task_name", "task_description"]), "task_name").to_pylist()
            descs.update({r["task_name"]: r["task_description"] for r in first})
        offset += canon.num_rows
    table = fill_derived(pa.concat_tables(parts))
    catalog = ModelCatalog.from_json_file(options.catalog) if options.catalog else catalogs[0]
    if not options.catalog:
        for c in catalogs[1:]:
            for m in c.models.values():
                catalog.models.setdefault(m.name, m)
    src = SourceData(table, catalog, ["cost converted from micro-dollars to USD"], {}, issues, descs)
    if any(k is not None for k in served):
        _settle_served(src, pa.concat_arrays([k if k is not None else pa.nulls(len(p), pa.string())
                                              for k, p in zip(served, parts, strict=True)]))
    return src


def _served_keys(t: pa.Table) -> pa.Array | None:
    """'<request_id>#<choice>' per row of a served-traffic table (null on other rows); None for other logs."""
    if "request_id" not in t.column_names:
        return None
    rid = pc.cast(t["request_id"], pa.string())
    choice = pc.cast(t["choice"], pa.string()) if "choice" in t.column_names else pa.repeat("0", t.num_rows)
    keys = pc.binary_join_element_wise(rid, pc.fill_null(choice, "0"), "#")
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def _settle_served(src: SourceData, keys: pa.Array) -> None:
    """Served traffic: keep the last record of each answer (feedback supersedes), skip answers with no
    score yet; both counted and noted, never silent."""
    n = len(keys)
    idx, values = code_values(keys)
    served = pc.is_valid(keys).to_numpy(zero_copy_only=False)
    codes_ = np.where(served, idx, 0)
    last = np.full(max(len(values), 1), -1)
    np.maximum.at(last, codes_[served], np.flatnonzero(served))
    superseded = served & (last[codes_] != np.arange(n))
    unscored = served & ~superseded & pc.is_null(src.table["performance"]).to_numpy(zero_copy_only=False)
    drop = superseded | unscored
    if not drop.any():
        return
    if superseded.any():
        src.counts["served_records_superseded"] = int(superseded.sum())
        src.notes.append(f"{int(superseded.sum())} served-traffic records superseded by a later record of the "
                         "same answer (feedback): the last one kept")
    if unscored.any():
        src.counts["served_answers_unscored"] = int(unscored.sum())
        src.notes.append(f"{int(unscored.sum())} served answers have no score yet (no feedback): skipped")
    keep = ~drop
    new_index = np.cumsum(keep) - 1
    src.issues = {int(new_index[i]): v for i, v in src.issues.items() if keep[i]}
    src.table = src.table.filter(pa.array(keep))
