"""LLMRouter's long-format routing JSONL (`data=llmrouter_long`): the same matrix as its wide files, costs
as logged or priced from token counts, and errors that name file, row and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusion_lightning.data.errors import LogFormatError, LogValidationError
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.readers import ReaderOptions

CATALOG = {"small-7b": {"size": "7B", "input_price": 0.2, "output_price": 0.2},
           "big-70b": {"size": "70B", "input_price": 1.0, "output_price": 3.0}}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(query: str, model: str, perf, **extra) -> dict:
    return {"task_name": "gsm8k", "query": query, "ground_truth": "4", "metric": "GSM8K", "model_name": model,
            "response": f"{model} says 4", "performance": perf, "embedding_id": 0, **extra}


def test_long_format_reads_to_the_same_matrix_as_the_wide_shared_files(tmp_path: Path, shared_data) -> None:
    """A slice of the shared LLMRouter data (wide: scores_*.json + queries_*.jsonl), converted row by row to the
    long format its pipeline writes, reads to the same queries × models performance matrix, tasks and splits."""
    d = shared_data("llmrouter")
    wide, long_dir = tmp_path / "wide", tmp_path / "long"
    wide.mkdir()
    long_dir.mkdir()
    (wide / "llm_candidates.json").write_text((d / "llm_candidates.json").read_text())
    (long_dir / "llm_candidates.json").write_text((d / "llm_candidates.json").read_text())
    for split in ("train", "test"):
        scores = json.loads((d / f"scores_{split}.json").read_text())[:40]
        keep = {r["question"] for r in scores}
        queries = [json.loads(line) for line in (d / f"queries_{split}.jsonl").read_text().split("\n") if line]
        queries = [q for q in queries if q["query"] in keep]
        (wide / f"scores_{split}.json").write_text(json.dumps(scores))
        _write_jsonl(wide / f"queries_{split}.jsonl", queries)
        meta = {q["query"]: q for q in queries}
        rows = [{"task_name": meta[r["question"]]["task_name"], "query": r["question"],
                 "ground_truth": meta[r["question"]]["ground_truth"], "metric": meta[r["question"]]["metric"],
                 "model_name": m, "response": "", "performance": s, "embedding_id": i, "token_num": 100}
                for i, r in enumerate(scores) for m, s in r["scores"].items()]
        _write_jsonl(long_dir / f"default_routing_{split}_data.jsonl", rows)
    _write_jsonl(long_dir / "query_data_train.jsonl", [{"task_name": "x", "query": "q"}])  # skipped: no model
    a = load_logs("llmrouter", wide, split="files", val_fraction=0.0)
    b = load_logs("llmrouter_long", long_dir, split="files", val_fraction=0.0)
    ma, mb = a.matrix(), b.matrix(a.models)
    assert len(ma) == 80 and a.models == b.models and len(a.models) > 2
    order = {q: i for i, q in enumerate(mb.query_ids)}
    idx = np.array([order[q] for q in ma.query_ids])
    np.testing.assert_array_equal(ma.performance, mb.performance[idx])
    np.testing.assert_array_equal(ma.mask, mb.mask[idx])
    assert list(ma.tasks) == list(mb.tasks[idx]) and list(ma.splits) == list(mb.splits[idx])
    assert any("query_data_train.jsonl" in n for n in b.report.notes)


def test_costs_as_logged_else_priced_from_token_counts(tmp_path: Path) -> None:
    (tmp_path / "llm_candidates.json").write_text(json.dumps(CATALOG))
    f = _write_jsonl(tmp_path / "routing_train.jsonl", [
        _row("2+2?", "small-7b", 1.0, input_tokens=10, output_tokens=20, token_num=30),
        _row("2+2?", "big-70b", 1.0, input_token=10, output_token=20),  # the routers' field names
        _row("3+3?", "small-7b", 0.0, token_num=1000),  # equal prices: exact
        _row("3+3?", "big-70b", 1, token_num=1000),  # unequal: the mean price, counted as an estimate
    ])
    logs = load_logs("llmrouter_long", f, split="query", val_fraction=0.0, test_fraction=0.0)
    rows = {(r["query"], r["model"]): r for r in logs.table.to_pylist()}
    assert rows[("2+2?", "small-7b")]["cost"] == pytest.approx(30 * 0.2 / 1e6)
    assert rows[("2+2?", "big-70b")]["cost"] == pytest.approx((10 * 1.0 + 20 * 3.0) / 1e6)
    assert rows[("2+2?", "big-70b")]["output_tokens"] == 20
    assert rows[("3+3?", "small-7b")]["cost"] == pytest.approx(1000 * 0.2 / 1e6)
    assert rows[("3+3?", "big-70b")]["cost"] == pytest.approx(1000 * 2.0 / 1e6)
    assert rows[("3+3?", "big-70b")]["response"] == "big-70b says 4" and logs.tasks == ["gsm8k"]
    assert logs.report.counts["cost_estimated_from_token_num"] == 1
    # a logged cost wins over prices
    g = _write_jsonl(tmp_path / "logged.jsonl", [_row("q", "small-7b", 1.0, cost=0.5, token_num=3),
                                                  _row("q", "big-70b", 0.0, cost=0.25)])
    logged = load_logs("llmrouter_long", g, split="query", val_fraction=0.0, test_fraction=0.0)
    assert sorted(logged.table["cost"].to_pylist()) == [0.25, 0.5]


def test_bad_rows_name_file_row_and_field(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "r.jsonl", [_row("q1", "a", 1.0), _row("q1", "b", "high"),
                                            _row("q2", "a", 0.5, token_num="many"), _row("q2", "b", 2.0)])
    with pytest.raises(LogValidationError) as e:
        load_logs("llmrouter_long", f, split="query")
    msg = str(e.value)
    assert f"{f}: row 2: field 'performance': not a number: 'high'" in msg
    assert f"{f}: row 3: field 'token_num': not a token count: 'many'" in msg
    assert f"{f}: row 4: field 'performance': out of range [0, 1]: 2.0" in msg
    q = load_logs("llmrouter_long", f, split="query", on_error="quarantine", val_fraction=0.0, test_fraction=0.0)
    assert q.report.counts["quarantined_rows"] == 3 and len(q) == 1
    _write_jsonl(f, [_row("q1", "a", 1.0), {"query": "q1", "performance": 1.0}])
    with pytest.raises(LogFormatError, match=r"r.jsonl: row 2: field 'model_name': missing required field"):
        load_logs("llmrouter_long", f, options=ReaderOptions())
