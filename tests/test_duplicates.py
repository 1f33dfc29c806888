"""data.duplicates: a (query, model) pair logged more than once with different values (sampling, benchmark
duplicates) is an error by default, or one row by mean / first / last, counted and noted, never silent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion_lightning.data.datamodule import LogDataModule, load_from_config
from fusion_lightning.data.errors import LogValidationError
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.source import SOURCE_DEFAULTS


def _row(q: str, m: str, perf, cost, inp, out, judge, resp) -> dict:
    return {"task_name": "gsm8k", "query": q, "llm": m, "performance": perf, "cost": cost,
            "input_tokens_num": inp, "output_tokens_num": out, "llm_judge": judge, "response": resp}


# LLMFusionBench JSONL (cost in micro-dollars). Lines 1, 4, 6: three observations of (a, m1) that disagree;
# lines 2 and 5: (a, m2) twice, identical (an exact duplicate); line 3: (b, m1) once.
ROWS = [
    _row("a", "m1", 1.0, 1000.0, 10, 20, 0.5, "r1"),
    _row("a", "m2", 0.0, 2000.0, 10, 30, None, "x"),
    _row("b", "m1", 0.0, 500.0, 5, 7, None, "r2"),
    _row("a", "m1", 0.0, 3000.0, 10, 25, None, "r3"),
    _row("a", "m2", 0.0, 2000.0, 10, 30, None, "x"),
    _row("a", "m1", 0.5, 2000.0, 11, 26, 1.0, "r4"),
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows_by_pair(logs) -> dict:
    return {(r["query"], r["model"]): r for r in logs.table.to_pylist()}


def test_default_is_error_and_the_message_names_the_option(tmp_path):
    f = _write(tmp_path / "log.jsonl", ROWS)
    assert SOURCE_DEFAULTS["duplicates"] == "error"
    with pytest.raises(LogValidationError) as e:
        load_logs("llmfusionbench", f)
    msg = str(e.value)
    assert len(e.value.issues) == 2  # lines 4 and 6 conflict with line 1; line 5 is an exact duplicate
    assert f"{f}: row 4: field 'performance': duplicate (query, model) row with a conflicting value: 0.0 here " \
           f"vs 1.0 at {f} row 1" in msg
    assert f"{f}: row 6: field 'performance'" in msg
    assert "set data.duplicates=mean|first|last to merge repeated observations, or data.on_error=quarantine " \
           "to set them aside" in msg
    # quarantine with duplicates=error: as before, the conflicting rows go aside and the first row stays
    logs = load_logs("llmfusionbench", f, on_error="quarantine")
    s = logs.summary()
    assert (s["quarantined_rows"], s["exact_duplicate_rows_collapsed"], s["rows"]) == (2, 1, 3)
    assert "duplicate_observations_merged" not in s
    assert _rows_by_pair(logs)[("a", "m1")]["performance"] == 1.0


def test_mean_averages_each_group(tmp_path):
    logs = load_logs("llmfusionbench", _write(tmp_path / "log.jsonl", ROWS), duplicates="mean")
    rows = _rows_by_pair(logs)
    assert len(rows) == 3
    r = rows[("a", "m1")]
    assert r["performance"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)  # 0.5
    assert r["cost"] == pytest.approx((1000 + 3000 + 2000) / 3 / 1e6)  # 0.002 USD
    assert r["judge"] == pytest.approx((0.5 + 1.0) / 2)  # the non-null ones only
    assert (r["input_tokens"], r["output_tokens"]) == (10, 24)  # round(31 / 3), round(71 / 3)
    assert (r["response"], r["_row"]) == ("r1", 1)  # other fields from the group's first row
    assert rows[("a", "m2")]["judge"] is None  # no judge score in the group: null
    assert rows[("b", "m1")]["performance"] == 0.0 and rows[("b", "m1")]["cost"] == pytest.approx(0.0005)
    s = logs.summary()
    assert s["duplicate_observations_merged"] == 2  # one group of 3 rows -> 1
    assert s["exact_duplicate_rows_collapsed"] == 1  # (a, m2), counted as before
    assert (s["rows_read"], s["rows"]) == (6, 3)
    assert any("1 (query, model) pairs logged more than once with different values" in n and "mean" in n
               and "2 rows removed" in n for n in logs.report.notes)
    m = logs.matrix()
    assert m.performance[list(m.queries).index("a")].tolist() == pytest.approx([0.5, 0.0])


@pytest.mark.parametrize("mode, perf, cost, judge, tokens, response, row", [
    ("first", 1.0, 0.001, 0.5, (10, 20), "r1", 1),
    ("last", 0.5, 0.002, 1.0, (11, 26), "r4", 6),
])
def test_first_and_last_keep_that_row_in_file_order(tmp_path, mode, perf, cost, judge, tokens, response, row):
    logs = load_logs("llmfusionbench", _write(tmp_path / "log.jsonl", ROWS), duplicates=mode)
    r = _rows_by_pair(logs)[("a", "m1")]
    assert (r["performance"], r["judge"], (r["input_tokens"], r["output_tokens"]), r["response"], r["_row"]) == (
        perf, judge, tokens, response, row)
    assert r["cost"] == pytest.approx(cost)
    s = logs.summary()
    assert (s["duplicate_observations_merged"], s["exact_duplicate_rows_collapsed"], s["rows"]) == (2, 1, 3)


def test_mean_over_a_directory_and_token_nulls(tmp_path):
    """Rows of one pair in two files (read in sorted order); a group whose token counts are all null stays null."""
    a = [{"task_name": "gsm8k", "query": "q", "llm": "m1", "performance": 1.0}]
    b = [{"task_name": "gsm8k", "query": "q", "llm": "m1", "performance": 0.25},
         {"task_name": "gsm8k", "query": "q", "llm": "m1", "performance": 0.5}]
    d = tmp_path / "logs"
    _write(d / "a.jsonl", a)
    _write(d / "b.jsonl", b)
    r = _rows_by_pair(load_logs("llmfusionbench", d, duplicates="mean"))[("q", "m1")]
    assert r["performance"] == pytest.approx(1.75 / 3)
    assert (r["input_tokens"], r["output_tokens"], r["cost"], r["judge"]) == (None, None, None, None)
    assert r["_file"] == str(d / "a.jsonl")
    last = _rows_by_pair(load_logs("llmfusionbench", d, duplicates="last"))[("q", "m1")]
    assert (last["performance"], last["_file"], last["_row"]) == (0.5, str(d / "b.jsonl"), 2)


def test_rows_with_an_issue_take_no_part_in_merging(tmp_path):
    rows = [*ROWS, _row("a", "m1", 1.5, 1000.0, 10, 20, None, "bad")]  # line 7: out of range
    f = _write(tmp_path / "log.jsonl", rows)
    with pytest.raises(LogValidationError, match="out of range") as e:
        load_logs("llmfusionbench", f, duplicates="mean")
    assert len(e.value.issues) == 1  # the bad row only: the others merge
    logs = load_logs("llmfusionbench", f, duplicates="mean", on_error="quarantine")
    s = logs.summary()
    assert (s["quarantined_rows"], s["duplicate_observations_merged"], s["rows"]) == (1, 2, 3)
    assert _rows_by_pair(logs)[("a", "m1")]["performance"] == pytest.approx(0.5)  # without the 1.5
    assert logs.report.quarantine[0]["_row"] == 7


def test_llmrouter_scores_merge_too(tmp_path):
    """A score file listing a question twice (a benchmark duplicate): mean of the two scores."""
    f = tmp_path / "gsm8k.json"
    f.write_text(json.dumps([{"question": "a", "scores": {"m1": 1, "m2": 0}},
                             {"question": "b", "scores": {"m1": 0, "m2": 1}},
                             {"question": "a", "scores": {"m1": 0, "m2": 0}}]))
    with pytest.raises(LogValidationError, match="data.duplicates=mean"):
        load_logs("llmrouter", f)
    logs = load_logs("llmrouter", f, duplicates="mean")
    m = logs.matrix()
    assert m.performance[list(m.queries).index("a")].tolist() == [0.5, 0.0]
    s = logs.summary()
    assert (s["duplicate_observations_merged"], s["exact_duplicate_rows_collapsed"], s["rows"]) == (1, 1, 4)


def test_unknown_value_lists_the_choices(tmp_path):
    f = _write(tmp_path / "log.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"data.duplicates='average'; choose from: error, mean, first, last"):
        load_logs("llmfusionbench", f, duplicates="average")
    with pytest.raises(ValueError, match="choose from: error, mean, first, last"):
        load_from_config({"format": "llmfusionbench", "path": str(f), "duplicates": "max"})


def test_config_threads_it_to_the_summary_and_data_report(tmp_path):
    from fusion_lightning.config import compose_recipe

    assert compose_recipe("router_mlp", ["data=llmfusionbench"]).data.duplicates == "error"
    f = _write(tmp_path / "log.jsonl", ROWS)
    dm = LogDataModule({"format": "llmfusionbench", "path": str(f), "duplicates": "mean"})
    assert dm.summary()["duplicate_observations_merged"] == 2  # what fit writes as summary.json's `data`
    out = tmp_path / "run"
    out.mkdir()
    dm.write_artifacts(out)
    report = json.loads((out / "data_report.json").read_text())
    assert report["counts"]["duplicate_observations_merged"] == 2
    assert any("data.duplicates=mean" in n for n in report["notes"])
