"""RouteLLM-style wide CSV: `prompt, <model>, <model>_response` (one column pair per model).

Rows are named by the line where their CSV record starts (responses span lines). `<model>` holds the recorded correctness (True/False or a score). Gold answers may sit beside the
CSV in a JSONL file with `question`/`answer` (GSM8K's own format), joined on the prompt text. The
source has no token counts or costs: both are estimated from the texts and catalog prices (a
shipped catalog covers the public RouteLLM models) — and said so.
"""

from __future__ import annotations

import csv
import sys
from importlib import resources
from pathlib import Path

from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.readers import register_reader
from fusion_lightning.data.readers.common import (
    TOKEN_ESTIMATOR,
    ReaderOptions,
    SourceData,
    canonical_table,
    count_tokens,
    find_files,
    price_calls,
    read_json_records,
    split_from_name,
    task_from_name,
    to_float,
)
from fusion_lightning.data.schema import ModelCatalog

TASK_METRICS = {"gsm8k": "GSM8K", "math": "MATH", "mmlu": "em_mc", "mbpp": "code_eval"}


def _default_catalog() -> ModelCatalog:
    with resources.as_file(resources.files("fusion_lightning.data.catalogs") / "routellm.json") as p:
        return ModelCatalog.from_json_file(p)


def _gold(folder: Path) -> dict[str, str]:
    """question -> answer from JSONL files beside the CSV (GSM8K format)."""
    gold: dict[str, str] = {}
    for f in sorted(folder.glob("*.jsonl")):
        for _, rec in read_json_records(f):
            if "question" in rec and "answer" in rec:
                gold.setdefault(rec["question"], str(rec["answer"]))
    return gold


@register_reader("routellm")
def read_routellm(path: Path, options: ReaderOptions) -> SourceData:
    catalog = ModelCatalog.from_json_file(options.catalog) if options.catalog else _default_catalog()
    csv.field_size_limit(sys.maxsize)
    cols: dict[str, list] = {k: [] for k in
                             ("query", "task", "model", "response", "performance", "ground_truth", "metric",
                              "split", "_file", "_row")}
    issues: dict[int, RowIssue] = {}
    n_gold = 0
    for f in find_files(path, (".csv",)):
        task = options.task or task_from_name(f)
        split = split_from_name(f)
        gold = _gold(f.parent)
        line = 2  # first line of the record being read (quoted fields may span lines)
        try:
            with f.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, strict=True)  # strict: a quote cut off at EOF is an error
                header = reader.fieldnames or []
                if "prompt" not in header:
                    raise LogFormatError(str(f), f"missing required column 'prompt'; found {header[:10]}")
                models = [c for c in header if c != "prompt" and f"{c}_response" in header]
                if not models:
                    raise LogFormatError(str(f), "no '<model>' + '<model>_response' column pairs found")
                line = reader.line_num + 1
                for rec in reader:
                    if None in rec or any(rec.get(c) is None for c in header):
                        raise LogFormatError(str(f), "wrong number of fields (truncated file?)", row=line)
                    q = rec["prompt"]
                    gt = gold.get(q)
                    n_gold += gt is not None
                    for m in models:
                        perf = to_float(rec[m])
                        if perf is None:
                            issues[len(cols["query"])] = RowIssue(str(f), line, m, f"not a score: {rec[m]!r}")
                        cols["query"].append(q)
                        cols["task"].append(task)
                        cols["model"].append(m)
                        cols["response"].append(rec[f"{m}_response"])
                        cols["performance"].append(perf)
                        cols["ground_truth"].append(gt)
                        cols["metric"].append(TASK_METRICS.get(task.lower()))
                        cols["split"].append(split)
                        cols["_file"].append(str(f))
                        cols["_row"].append(line)
                    line = reader.line_num + 1
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise LogFormatError(str(f), f"cannot read CSV (truncated file?): {e}",
                                 row=line if isinstance(e, csv.Error) else None) from e

    uniq = list(dict.fromkeys(cols["query"]))
    n_in = dict(zip(uniq, count_tokens(uniq), strict=True))
    cols["input_tokens"] = [n_in[q] for q in cols["query"]]
    cols["output_tokens"] = count_tokens(cols["response"])
    cols["cost"] = price_calls(catalog, cols["model"], cols["input_tokens"], cols["output_tokens"])
    notes = [f"token counts estimated with the {TOKEN_ESTIMATOR}; cost = tokens × prices of {catalog.source}"]
    counts = {"queries_with_gold_answer": n_gold}
    return SourceData(canonical_table(cols), catalog, notes, counts, issues)
