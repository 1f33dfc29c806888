"""RouteLLM-style wide CSV: `prompt, <model>[, <model>_response]` (a column per model, its response beside it).

Rows are named by the line where their CSV record starts (responses span lines). `<model>` holds the recorded
correctness (True/False or a score); every column but `prompt` and the `*_response` columns is a model.
RouteLLM's own evaluation files (its per-subject MMLU CSVs, `mmlu_<subject>.csv`) are correctness-only: no
response columns, so those models' responses and output token counts are null. Gold answers may sit beside the
CSV in a JSONL file with `question`/`answer` (GSM8K's own format), joined on the prompt text. The
source has no token counts or costs: both are estimated from the texts and catalog prices (a
shipped catalog covers the public RouteLLM models; without a response, from the input tokens only) — and
said so.
"""

from __future__ import annotations

import csv
import io
import sys
from importlib import resources
from pathlib import Path

from fusion_lightning.data.errors import LogFormatError, RowIssue
from fusion_lightning.data.pricing import TOKEN_ESTIMATOR, count_tokens, price_calls
from fusion_lightning.data.readers import register_reader
from fusion_lightning.data.readers.common import ReaderOptions, SourceData, canonical_table, to_float
from fusion_lightning.data.readers.files import find_files, split_from_name, task_from_name
from fusion_lightning.data.schema import ModelCatalog, known_task
from fusion_lightning.data.text import read_json_records, read_text

# task (or the task a sub-task such as `mmlu_abstract_algebra` belongs to) -> metric
TASK_METRICS = {"gsm8k": "GSM8K", "math": "MATH", "mmlu": "em_mc", "mbpp": "code_eval"}


def task_metric(task: str) -> str | None:
    name = known_task(task, TASK_METRICS)
    return TASK_METRICS[name] if name else None


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
    no_response: dict[str, int] = {}  # model without a response column -> files
    for f in find_files(path, (".csv",)):
        task = options.task or task_from_name(f)
        split = split_from_name(f)
        gold = _gold(f.parent)
        line = 2  # first line of the record being read (quoted fields may span lines)
        try:
            with io.StringIO(read_text(f), newline="") as fh:  # read_text: bad bytes named by row and column
                reader = csv.DictReader(fh, strict=True)  # strict: a quote cut off at EOF is an error
                header = reader.fieldnames or []
                if "prompt" not in header:
                    raise LogFormatError(str(f), f"missing required column 'prompt'; found {header[:10]}")
                models = [c for c in header if c != "prompt" and not c.endswith("_response")]
                if not models:
                    raise LogFormatError(str(f), f"no model columns (prompt, <model>[, <model>_response], ...) "
                                                 f"found; found {header[:10]}")
                orphans = [c for c in header if c.endswith("_response") and c[:-len("_response")] not in header]
                if orphans:
                    raise LogFormatError(str(f), f"response column(s) {orphans} without their model column "
                                                 f"(the model's correctness)", field=orphans[0])
                responses = {m: f"{m}_response" if f"{m}_response" in header else None for m in models}
                for m, r in responses.items():
                    if r is None:
                        no_response[m] = no_response.get(m, 0) + 1
                metric = task_metric(task)
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
                        cols["response"].append(rec[responses[m]] if responses[m] else None)
                        cols["performance"].append(perf)
                        cols["ground_truth"].append(gt)
                        cols["metric"].append(metric)
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
    if no_response:
        listed = ", ".join(f"{m} ({n} file{'s' if n > 1 else ''})" for m, n in no_response.items())
        notes.append(f"correctness-only columns (no '<model>_response'): {listed}: response and output tokens "
                     "unknown (null), cost estimated from input tokens only (input tokens × catalog input price)")
    counts = {"queries_with_gold_answer": n_gold}
    return SourceData(canonical_table(cols), catalog, notes, counts, issues)
