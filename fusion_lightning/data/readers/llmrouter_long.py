"""LLMRouter's own long-format routing data: one JSONL row per (query, model).

The rows its data pipeline writes (`llmrouter/data/api_calling_evaluation.py` in llmrouter-lib 0.4.0,
`default_routing_{train,test}_data.jsonl`): `task_name, query, ground_truth, metric, model_name, response,
performance, embedding_id, token_num` and, from newer versions, `input_tokens`/`output_tokens` (its routers
write `input_token`/`output_token` or `prompt_tokens`/`completion_tokens`). A `cost` column, where present,
is the call's cost as logged. Otherwise the cost is computed from token counts × the catalog beside the
files (`llm_candidates.json`, LLMRouter's), and said so: `token_num` alone (a total) is priced exactly only
where a model's input and output prices are equal, else at their mean (an estimate, counted).
"""

from __future__ import annotations

from pathlib import Path

from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.readers import register_reader
from fusion_lightning.data.readers.common import ReaderOptions, SourceData, canonical_table, to_float
from fusion_lightning.data.readers.files import find_files, split_from_name, task_from_name
from fusion_lightning.data.readers.llmrouter import CATALOG_NAMES, _catalog
from fusion_lightning.data.schema import ModelCatalog, ModelInfo
from fusion_lightning.data.text import read_json_records

# canonical field <- the names LLMRouter's versions write it under, first found wins
TOKEN_FIELDS = {"input_tokens": ("input_tokens", "input_token", "prompt_tokens"),
                "output_tokens": ("output_tokens", "output_token", "completion_tokens")}
REQUIRED = ("query", "model_name")


def _tokens(rec: dict, names: tuple[str, ...], file: Path, row: int, issues: dict[int, RowIssue],
            at: int) -> int | None:
    for name in names:
        if rec.get(name) is not None:
            v = to_float(rec[name])
            if v is None or v != int(v):
                issues.setdefault(at, RowIssue(str(file), row, name, f"not a token count: {rec[name]!r}"))
                return None
            return int(v)
    return None


def _is_routing_file(f: Path) -> bool:
    """Whether a JSONL file holds routing rows (its first record has `model_name`): a directory may also
    hold LLMRouter's query files (`query_data_*.jsonl`), which carry no model."""
    for _, rec in read_json_records(f):
        return "model_name" in rec
    return False


@register_reader("llmrouter_long")
def read_llmrouter_long(path: Path, options: ReaderOptions) -> SourceData:
    files = find_files(path, (".jsonl",))
    notes: list[str] = []
    if path.is_dir():
        skipped = [f.name for f in files if not _is_routing_file(f)]
        files = [f for f in files if f.name not in skipped]
        if skipped:
            notes.append(f"files without model_name rows skipped (query files?): {', '.join(skipped)}")
        if not files:
            raise LogFormatError(str(path), "no routing files (*.jsonl rows with query and model_name) here")
    cols: dict[str, list] = {k: [] for k in ("query", "task", "model", "response", "performance", "cost",
                                             "input_tokens", "output_tokens", "ground_truth", "metric", "split",
                                             "_file", "_row")}
    token_num: list[int | None] = []
    issues: dict[int, RowIssue] = {}
    for f in files:
        split, file_task = split_from_name(f), options.task or task_from_name(f)
        for i, rec in read_json_records(f):
            for fld in REQUIRED:
                if fld not in rec:
                    raise LogFormatError(str(f), "missing required field", row=i, field=fld)
            at = len(cols["query"])
            perf = to_float(rec.get("performance"))
            if rec.get("performance") is not None and perf is None:
                issues[at] = RowIssue(str(f), i, "performance", f"not a number: {rec['performance']!r}")
            cost = to_float(rec.get("cost"))
            if rec.get("cost") is not None and cost is None:
                issues.setdefault(at, RowIssue(str(f), i, "cost", f"not a number: {rec['cost']!r}"))
            for key, names in TOKEN_FIELDS.items():
                cols[key].append(_tokens(rec, names, f, i, issues, at))
            token_num.append(_tokens(rec, ("token_num",), f, i, issues, at))
            gt = rec.get("ground_truth")
            cols["query"].append(rec["query"])
            cols["task"].append(options.task or rec.get("task_name") or file_task)
            cols["model"].append(rec["model_name"])
            cols["response"].append(rec.get("response") if options.responses else None)
            cols["performance"].append(perf)
            cols["cost"].append(cost)
            cols["ground_truth"].append(None if gt is None else str(gt))
            cols["metric"].append(rec.get("metric"))
            cols["split"].append(split)
            cols["_file"].append(str(f))
            cols["_row"].append(i)

    catalog = _catalog(path, options)
    counts: dict[str, int] = {}
    if catalog is None:
        catalog = ModelCatalog(source="inferred from model_name (no prices)")
        for m in dict.fromkeys(cols["model"]):
            catalog.add(ModelInfo(name=m))
    logged = sum(c is not None for c in cols["cost"])
    if logged:
        notes.append(f"cost as logged (the `cost` field) on {logged} rows")
    else:
        priced, estimated = _price(cols, token_num, catalog)
        if priced:
            notes.append(f"cost = token counts × prices of {catalog.source} on {priced} rows")
        if estimated:
            counts["cost_estimated_from_token_num"] = estimated
            notes.append(f"{estimated} rows have only token_num (input + output): priced at the mean of the "
                         "model's input and output prices, an estimate")
        if not priced:
            notes.append("no cost field and no priced token counts: costs are unknown "
                         f"(put {CATALOG_NAMES[0]} beside the files or set data.catalog)")
    return SourceData(canonical_table(cols), catalog, notes, counts, issues)


def _price(cols: dict[str, list], token_num: list[int | None], catalog: ModelCatalog) -> tuple[int, int]:
    """Fill cols['cost'] from token counts and catalog prices; (rows priced, of them estimated from token_num)."""
    priced = estimated = 0
    for r, m in enumerate(cols["model"]):
        info = catalog.models.get(m)
        if info is None or info.input_price is None or info.output_price is None:
            continue
        inp, out = cols["input_tokens"][r], cols["output_tokens"][r]
        if inp is not None or out is not None:
            cols["cost"][r] = info.call_cost(inp, out)
        elif token_num[r] is not None:
            cols["cost"][r] = token_num[r] * (info.input_price + info.output_price) / 2 / 1e6
            estimated += info.input_price != info.output_price
        else:
            continue
        priced += 1
    return priced, estimated
