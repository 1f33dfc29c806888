"""LLMRouter wide score files: `[{"question", "scores": {model: score}}]`.

Optional beside them: query files (`queries*.jsonl` with task_name, query, ground_truth, metric),
joined on the query text, and a candidate catalog with prices (`llm_candidates.json`). The source
has no responses, token counts or costs: input tokens are counted here and the cost of a call is
estimated as input tokens × the catalog's input price (output length unknown) — and said so.
"""

from __future__ import annotations

from pathlib import Path

from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.pricing import TOKEN_ESTIMATOR, count_tokens, price_calls
from fusion_lightning.data.readers import register_reader
from fusion_lightning.data.readers.common import ReaderOptions, SourceData, canonical_table, to_float
from fusion_lightning.data.readers.files import split_from_name, task_from_name
from fusion_lightning.data.schema import ModelCatalog, ModelInfo
from fusion_lightning.data.text import read_json_records

CATALOG_NAMES = ("llm_candidates.json", "catalog.json", "models.json")


def _query_files(path: Path, options: ReaderOptions) -> list[Path]:
    if options.queries:
        q = Path(options.queries).expanduser()
        return sorted(q.glob("*.jsonl")) if q.is_dir() else [q]
    folder = path if path.is_dir() else path.parent
    return sorted(folder.glob("queries*.jsonl"))


def _catalog(path: Path, options: ReaderOptions) -> ModelCatalog | None:
    if options.catalog:
        return ModelCatalog.from_json_file(options.catalog)
    folder = path if path.is_dir() else path.parent
    for name in CATALOG_NAMES:
        if (folder / name).is_file():
            return ModelCatalog.from_json_file(folder / name)
    return None


@register_reader("llmrouter")
def read_llmrouter(path: Path, options: ReaderOptions) -> SourceData:
    if path.is_dir():
        score_files = sorted(p for p in path.glob("*.json") if p.name not in CATALOG_NAMES)
        if not score_files:
            raise LogFormatError(str(path), "no score files (*.json with question/scores) in this directory")
    else:
        score_files = [path]

    # Join table: query text -> (task, ground_truth, metric); the first row wins, ambiguity is counted.
    joined: dict[str, dict] = {}
    ambiguous: set[str] = set()
    for qf in _query_files(path, options):
        for i, rec in read_json_records(qf):
            if "query" not in rec:
                raise LogFormatError(str(qf), "missing required field", row=i, field="query")
            prev = joined.get(rec["query"])
            if prev is None:
                joined[rec["query"]] = rec
            elif prev.get("task_name") != rec.get("task_name"):
                ambiguous.add(rec["query"])

    cols: dict[str, list] = {k: [] for k in
                             ("query", "task", "model", "performance", "ground_truth", "metric", "split", "_file", "_row")}
    issues: dict[int, RowIssue] = {}
    unjoined = 0
    for sf in score_files:
        split = split_from_name(sf)
        file_task = options.task or task_from_name(sf)
        for i, rec in read_json_records(sf):
            for fld in ("question", "scores"):
                if fld not in rec:
                    raise LogFormatError(str(sf), "missing required field", row=i, field=fld)
            if not isinstance(rec["scores"], dict):
                raise LogFormatError(str(sf), "expected an object of model -> score", row=i, field="scores")
            q = rec["question"]
            meta = joined.get(q)
            if meta is None:
                unjoined += 1
            # the record's own task, else the joined query file's, else the file name's
            task = options.task or rec.get("task_name") or (meta or {}).get("task_name") or file_task
            for model, score in rec["scores"].items():
                perf = to_float(score)
                if perf is None:
                    issues[len(cols["query"])] = RowIssue(str(sf), i, "performance", f"not a number: {score!r}")
                cols["query"].append(q)
                cols["task"].append(task)
                cols["model"].append(model)
                cols["performance"].append(perf)
                cols["ground_truth"].append(None if meta is None or meta.get("ground_truth") is None
                                            else str(meta.get("ground_truth")))
                cols["metric"].append((meta or {}).get("metric"))
                cols["split"].append(split)
                cols["_file"].append(str(sf))
                cols["_row"].append(i)

    notes: list[str] = []
    counts: dict[str, int] = {}
    catalog = _catalog(path, options)
    if catalog is None:
        catalog = ModelCatalog(source="inferred from score files (no prices)")
        for m in dict.fromkeys(cols["model"]):
            catalog.add(ModelInfo(name=m))
        notes.append("no model catalog found: costs are unknown (cost-aware rewards unavailable)")
        cols["input_tokens"] = [None] * len(cols["query"])
        cols["cost"] = [None] * len(cols["query"])
    else:
        uniq = list(dict.fromkeys(cols["query"]))
        n_tok = dict(zip(uniq, count_tokens(uniq), strict=True))
        cols["input_tokens"] = [n_tok[q] for q in cols["query"]]
        cols["cost"] = price_calls(catalog, cols["model"], cols["input_tokens"], [None] * len(cols["query"]))
        notes.append(
            f"cost estimated as input tokens ({TOKEN_ESTIMATOR}) × catalog input price; "
            "the source has no responses or output token counts"
        )
    if joined:
        counts["queries_without_query_file_row"] = unjoined
        if ambiguous:
            counts["ambiguous_query_join"] = len(ambiguous)
            notes.append(f"{len(ambiguous)} query texts appear under several tasks in the query files: "
                         "the first task listed was used")
    else:
        notes.append("no query files: tasks taken from the score file names")
    return SourceData(canonical_table(cols), catalog, notes, counts, issues)
