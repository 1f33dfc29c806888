"""RouterBench wide tables (CSV or pickle of a DataFrame).

Columns: `sample_id, prompt, eval_name, <model>, <model>|model_response, <model>|total_cost,
oracle_model_to_route_to`. Costs are in the source (USD per call), so no catalog prices are needed;
a catalog (`data.catalog`) adds sizes and descriptions and makes unknown model names an error.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.readers import register_reader
from fusion_lightning.data.readers.common import ReaderOptions, SourceData, canonical_table, to_float
from fusion_lightning.data.readers.files import find_files, split_from_name
from fusion_lightning.data.schema import ModelCatalog, ModelInfo
from fusion_lightning.data.text import read_utf8_buffer

REQUIRED = ("sample_id", "prompt", "eval_name")


def _load(f: Path) -> pa.Table:
    try:
        if f.suffix.lower() in (".pkl", ".pickle"):
            with f.open("rb") as fh:
                obj = pickle.load(fh)  # noqa: S301 - RouterBench ships pickled DataFrames
            return pa.Table.from_pandas(obj, preserve_index=False)
        # UTF-8 checked first: pyarrow's own check cannot say which row and column hold the bad bytes
        return pacsv.read_csv(pa.BufferReader(read_utf8_buffer(f)),
                              convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except (OSError, pa.ArrowInvalid, pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise LogFormatError(str(f), f"cannot read RouterBench table (unreadable or truncated): {e}") from e


@register_reader("routerbench")
def read_routerbench(path: Path, options: ReaderOptions) -> SourceData:
    given = ModelCatalog.from_json_file(options.catalog) if options.catalog else None
    catalog = given or ModelCatalog(source="inferred from RouterBench columns (costs from the source)")
    cols: dict[str, list] = {k: [] for k in ("query_id", "query", "task", "model", "response", "performance",
                                             "cost", "split", "_file", "_row")}
    issues: dict[int, RowIssue] = {}
    for f in find_files(path, (".csv", ".pkl", ".pickle")):
        t = _load(f)
        header = t.column_names
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise LogFormatError(str(f), f"missing required column(s) {missing}; found {header[:10]}")
        models = [c.split("|", 1)[0] for c in header if c.endswith("|model_response")]
        for m in models:
            for c in (m, f"{m}|total_cost"):
                if c not in header:
                    raise LogFormatError(str(f), f"missing required column {c!r} for model {m!r}")
            if given is None and m not in catalog:
                catalog.add(ModelInfo(name=m))
        data = {c: t[c].to_pylist() for c in ["sample_id", "prompt", "eval_name"]}
        split = split_from_name(f)
        first_line = 2 if f.suffix.lower() == ".csv" else 0  # CSV: line numbers; pickle: 0-based index
        for m in models:
            perf, cost, resp = t[m].to_pylist(), t[f"{m}|total_cost"].to_pylist(), t[f"{m}|model_response"]
            for i, (p, c, r) in enumerate(zip(perf, cost, resp.to_pylist(), strict=True)):
                row = i + first_line
                pv, cv = to_float(p), to_float(c)
                if pv is None and p is not None:
                    issues[len(cols["query"])] = RowIssue(str(f), row, m, f"not a number: {p!r}")
                if cv is None and c is not None:
                    issues[len(cols["query"])] = RowIssue(str(f), row, f"{m}|total_cost", f"not a number: {c!r}")
                cols["query_id"].append(None if data["sample_id"][i] is None else str(data["sample_id"][i]))
                cols["query"].append(data["prompt"][i])
                cols["task"].append(options.task or data["eval_name"][i])
                cols["model"].append(m)
                cols["response"].append(None if r is None else str(r))
                cols["performance"].append(pv)
                cols["cost"].append(cv)
                cols["split"].append(split)
                cols["_file"].append(str(f))
                cols["_row"].append(row)
    return SourceData(canonical_table(cols), catalog, [], {}, issues)
