"""Bad log input: every kind is an error naming file, row and field, or is quarantined and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fusion_lightning.data.datamodule import LogDataModule
from fusion_lightning.data.errors import LogFormatError, LogValidationError
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.readers import read_source
from fusion_lightning.data.validate import validate


def _scores(d: Path, records: list[dict], name: str = "gsm8k.json") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps(records, allow_nan=True))
    return d / name


def _rec(q: str, **scores) -> dict:
    return {"question": q, "scores": scores}


GOOD = [_rec("b", m1=1, m2=0), _rec("c", m1=0, m2=1)]


def _assert_names(err: Exception, file: Path | str, row: int, field: str) -> None:
    msg = str(err)
    assert str(file) in msg and f"row {row}" in msg and repr(field) in msg, msg


def _quarantined(fmt: str, path: Path, **kw):
    logs = load_logs(fmt, path, on_error="quarantine", **kw)
    return logs, logs.report.quarantine, logs.summary()


# ------------------------------------------------------------------------------------------ whole-file errors

def test_truncated_json_array_names_file_and_line(tmp_path):
    f = tmp_path / "gsm8k.json"
    f.write_text('[{"question": "a", "scores": {"m1": 1}},\n {"question": "b", "sco')
    with pytest.raises(LogFormatError) as e:
        load_logs("llmrouter", f, on_error="quarantine")  # a broken file is never quarantined away
    assert e.value.row == 2 and e.value.file == str(f) and str(f) in str(e.value)


def test_truncated_jsonl_names_the_1_based_line(tmp_path):
    f = tmp_path / "log.jsonl"
    line = json.dumps({"task_name": "gsm8k", "query": "a", "llm": "m", "performance": 1.0})
    f.write_text(line + "\n" + line.replace('"a"', '"b"') + "\n" + line[:30])
    with pytest.raises(LogFormatError) as e:
        read_source("llmfusionbench", f)
    assert e.value.row == 3 and f"{f}: row 3" in str(e.value)


def test_truncated_binary_and_csv_files(tmp_path):
    pq_file = tmp_path / "log.parquet"
    pd.DataFrame({"task_name": ["g"] * 50, "query": [f"q{i}" for i in range(50)], "llm": ["m"] * 50,
                  "performance": [1.0] * 50}).to_parquet(pq_file)
    pq_file.write_bytes(pq_file.read_bytes()[:200])
    with pytest.raises(LogFormatError, match="truncated") as e:
        read_source("llmfusionbench", pq_file)
    assert str(pq_file) in str(e.value)
    pkl = tmp_path / "rb.pkl"
    pkl.write_bytes(b"\x80\x04\x95 cut")
    with pytest.raises(LogFormatError, match="truncated"):
        read_source("routerbench", pkl)
    csv_file = tmp_path / "gsm8k.csv"
    csv_file.write_text('prompt,a,a_response\n"p1",True,"line one\nline two"\n"p2",False,"cut off')
    with pytest.raises(LogFormatError) as e:
        read_source("routellm", csv_file)
    assert e.value.row == 4 and str(csv_file) in str(e.value)  # line 4: the record of "p2" starts there


def test_missing_required_columns(tmp_path):
    f = _scores(tmp_path / "r", [_rec("a", m1=1), {"question": "b"}])
    with pytest.raises(LogFormatError) as e:
        read_source("llmrouter", f)
    _assert_names(e.value, f, 2, "scores")
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps({"task_name": "g", "query": "a", "llm": "m"}) + "\n")
    with pytest.raises(LogFormatError, match=r"missing required column\(s\) \['performance'\]") as e:
        read_source("llmfusionbench", f)
    assert str(f) in str(e.value)
    f = tmp_path / "rb.csv"
    pd.DataFrame({"sample_id": ["s"], "prompt": ["p"], "m|model_response": ["r"], "m|total_cost": [0.1], "m": [1]}
                 ).to_csv(f, index=False)
    with pytest.raises(LogFormatError, match="eval_name"):
        read_source("routerbench", f)
    f = tmp_path / "gsm8k_responses.csv"
    f.write_text("question,a,a_response\nq,True,r\n")
    with pytest.raises(LogFormatError, match="'prompt'"):
        read_source("routellm", f)


def test_on_error_must_be_raise_or_quarantine(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_logs("llmrouter", _scores(tmp_path, GOOD), on_error="ignore")


# ------------------------------------------------------------------------------------------ row errors

BAD_ROWS = {  # kind -> (first record, file row, field, message fragment, rows quarantined)
    "non-numeric score": (_rec("a", m1=1, m2="high"), 1, "performance", "not a number: 'high'", 1),
    "score above range": (_rec("a", m1=1.5, m2=0), 1, "performance", "out of range [0, 1]: 1.5", 1),
    "score below range": (_rec("a", m1=1, m2=-0.25), 1, "performance", "out of range [0, 1]: -0.25", 1),
    "NaN score": (_rec("a", m1=float("nan"), m2=0), 1, "performance", "NaN", 1),
    "empty query": (_rec("   ", m1=1, m2=0), 1, "query", "empty query text", 2),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_score_rows_raise_or_are_quarantined(tmp_path, kind):
    bad, row, field, fragment, n_bad = BAD_ROWS[kind]
    f = _scores(tmp_path, [bad, *GOOD])
    with pytest.raises(LogValidationError) as e:
        load_logs("llmrouter", f)
    _assert_names(e.value, f, row, field)
    assert fragment in str(e.value)
    assert len(e.value.issues) == n_bad  # one issue per bad canonical row, none reported twice
    logs, quarantine, summary = _quarantined("llmrouter", f)
    assert len(quarantine) == summary["quarantined_rows"] == n_bad
    assert summary["rows_read"] == 6 and summary["rows"] == 6 - n_bad  # the good rows load
    assert all(q["_row"] == row and q["_file"] == str(f) for q in quarantine)
    assert any(fragment in r for q in quarantine for r in q["_reasons"])


def test_negative_cost(tmp_path):
    f = tmp_path / "routerbench.csv"
    pd.DataFrame({"sample_id": ["s1", "s2", "s3"], "prompt": ["p1", "p2", "p3"], "eval_name": ["mmlu"] * 3,
                  "m": [1.0, 0.0, 1.0], "m|model_response": ["A", "B", "C"], "m|total_cost": [0.1, -0.2, 0.3]}
                 ).to_csv(f, index=False)
    with pytest.raises(LogValidationError, match="negative cost: -0.2") as e:
        load_logs("routerbench", f)
    _assert_names(e.value, f, 3, "cost")  # CSV line 3: header, s1, s2
    logs, quarantine, summary = _quarantined("routerbench", f)
    assert summary["quarantined_rows"] == 1 and [q["query_id"] for q in quarantine] == ["s2"]
    assert sorted(logs.table["query_id"].to_pylist()) == ["s1", "s3"]


def test_negative_micro_dollar_cost_in_llmfusionbench(tmp_path):
    f = tmp_path / "log.jsonl"
    f.write_text("".join(json.dumps({"task_name": "gsm8k", "query": q, "llm": "m", "performance": 1.0, "cost": c})
                         + "\n" for q, c in [("a", 10.0), ("b", -5.0), ("c", 0.0)]))
    with pytest.raises(LogValidationError, match="negative cost: -5e-06") as e:
        load_logs("llmfusionbench", f)
    _assert_names(e.value, f, 2, "cost")


def _catalog_dir(tmp_path: Path) -> Path:
    d = tmp_path / "r"
    d.mkdir()
    (d / "llm_candidates.json").write_text(json.dumps({
        "m1": {"size": "7B", "input_price": 0.2, "output_price": 0.2, "feature": "one"},
        "m2": {"size": "70B", "input_price": 0.9, "output_price": 0.9, "feature": "two"}}))
    return d


def test_unknown_model_with_a_catalog(tmp_path):
    d = _catalog_dir(tmp_path)
    f = _scores(d, [*GOOD, _rec("a", m1=1, m2=0, m9=1)])
    with pytest.raises(LogValidationError, match="unknown model 'm9'") as e:
        load_logs("llmrouter", d)
    _assert_names(e.value, f, 3, "model")
    logs, quarantine, summary = _quarantined("llmrouter", d)
    assert summary["quarantined_rows"] == 1 and quarantine[0]["model"] == "m9"
    assert logs.models == ["m1", "m2"] and summary["rows"] == 6


def test_conflicting_duplicate_rows_name_both_rows(tmp_path):
    f = _scores(tmp_path, [_rec("a", m1=1, m2=0), *GOOD, _rec("a", m1=0, m2=0)])
    with pytest.raises(LogValidationError) as e:
        load_logs("llmrouter", f)
    _assert_names(e.value, f, 4, "performance")
    assert f"at {f} row 1" in str(e.value) and "conflicting value" in str(e.value)
    logs, quarantine, summary = _quarantined("llmrouter", f)
    assert summary["quarantined_rows"] == 1 and (quarantine[0]["model"], quarantine[0]["_row"]) == ("m1", 4)
    assert summary["exact_duplicate_rows_collapsed"] == 1  # (a, m2) repeated with the same value
    m = logs.matrix()
    assert m.performance[list(m.queries).index("a")].tolist() == [1.0, 0.0]  # the first row is kept


def test_exact_duplicate_rows_are_collapsed_and_counted(tmp_path):
    f = _scores(tmp_path, [_rec("a", m1=1, m2=0), *GOOD, _rec("a", m1=1, m2=0)])
    logs = load_logs("llmrouter", f)  # not an error
    s = logs.summary()
    assert s["exact_duplicate_rows_collapsed"] == 2 and s["rows_read"] == 8 and s["rows"] == 6
    assert s["queries"] == 3 and "quarantined_rows" not in s


def test_inconsistent_model_sets_are_masked_and_reported(tmp_path):
    f = _scores(tmp_path, [_rec("a", m1=1, m2=0), _rec("b", m1=0), _rec("c", m2=1)])
    logs = load_logs("llmrouter", f)  # allowed
    m = logs.matrix()
    assert m.models == ["m1", "m2"] and list(m.queries) == ["a", "b", "c"]
    np.testing.assert_array_equal(m.mask, [[True, True], [True, False], [False, True]])
    assert np.isnan(m.performance[1, 1]) and np.isnan(m.performance[2, 0])  # masked, not zero
    assert m.performance[0].tolist() == [1.0, 0.0]
    assert logs.summary()["missing_pairs_masked"] == 2
    assert any("2 (query, model) pairs have no call" in n for n in logs.report.notes)


def test_validate_vectorised_core_counts_every_row(tmp_path):
    src = read_source("llmrouter", _scores(tmp_path, [_rec("a", m1=2, m2=0), *GOOD]))
    result = validate(src, on_error="quarantine")
    assert result.counts == {"rows_read": 6, "quarantined_rows": 1}
    assert isinstance(result.table, pa.Table) and result.table.num_rows == 5
    assert result.quarantine[0]["_reasons"] == ["performance: out of range [0, 1]: 2.0"]


# ------------------------------------------------------------------------------------------ the DataModule

def test_datamodule_writes_quarantine_jsonl(tmp_path):
    f = _scores(tmp_path / "in", [_rec("a", m1=1, m2="high"), _rec("  ", m1=1, m2=1), *GOOD])
    dm = LogDataModule({"format": "llmrouter", "path": str(f), "on_error": "quarantine"})
    assert dm.summary()["quarantined_rows"] == 3
    out = tmp_path / "run"
    out.mkdir()
    written = dm.write_artifacts(out)
    assert written == {"quarantine": str(out / "quarantine.jsonl"), "data_report": str(out / "data_report.json")}
    report = json.loads((out / "data_report.json").read_text())
    assert report["counts"]["quarantined_rows"] == 3 and report["notes"]
    recs = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    assert sorted((r["_row"], r["model"]) for r in recs) == [(1, "m2"), (2, "m1"), (2, "m2")]
    assert all(r["_file"] == str(f) and r["_reasons"] for r in recs)
    clean = LogDataModule({"format": "llmrouter", "path": str(_scores(tmp_path / "ok", GOOD))})
    assert set(clean.write_artifacts(tmp_path / "ok")) == {"data_report"}
    assert not (tmp_path / "ok" / "quarantine.jsonl").exists()


def test_datamodule_raises_by_default(tmp_path):
    f = _scores(tmp_path, [_rec("a", m1=1, m2="high"), *GOOD])
    with pytest.raises(LogValidationError) as e:
        LogDataModule({"format": "llmrouter", "path": str(f)}).summary()
    _assert_names(e.value, f, 1, "performance")
