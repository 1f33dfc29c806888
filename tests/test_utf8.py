"""Bytes that are not UTF-8 in a text log: an error naming the file, the row and (when known) the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion_lightning.data.errors import LogFormatError
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.readers import ReaderOptions, read_source
from fusion_lightning.data.text import read_input_lines

BAD = "\udcff\udcfe"  # the raw bytes \xff\xfe, as surrogateescape spells them in a str


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def _fusion_line(query: str, response: str = "r", perf: float = 1.0) -> str:
    # json.dumps would escape the bad bytes: put them in raw
    return (json.dumps({"task_name": "gsm8k", "query": "QUERY", "llm": "m", "performance": perf,
                        "response": "RESPONSE"}).replace("QUERY", query).replace("RESPONSE", response))


def _raises(fmt: str, path: Path, row: int, field: str | None, file: Path | None = None, **kw) -> LogFormatError:
    """Loading `path` fails on `file` (default: `path` itself) at `row`, naming `field` (None: not known)."""
    with pytest.raises(LogFormatError) as e:
        load_logs(fmt, path, **kw)
    err = e.value
    file = file or path
    assert (err.file, err.row, err.field) == (str(file), row, field), str(err)
    msg = str(err)
    assert str(file) in msg and f"row {row}" in msg and "not valid UTF-8" in msg
    assert (f"field {field!r}" in msg) if field else ("line is not valid UTF-8" in msg)
    assert r"\xff\xfe" in msg  # the bytes themselves
    return err


def test_jsonl_query_with_bad_bytes_names_file_line_and_field(tmp_path):
    f = _write(tmp_path / "log.jsonl", _fusion_line("a") + "\n" + _fusion_line("b" + BAD, perf=0.0) + "\n")
    err = _raises("llmfusionbench", f, 2, "query")
    assert f"{f}: row 2: field 'query': not valid UTF-8" in str(err)
    _raises("llmfusionbench", f, 2, "query", on_error="quarantine")  # a file-level error: never quarantined


def test_jsonl_bad_bytes_in_an_unread_response_are_not_accepted_silently(tmp_path):
    """data.responses=false (the router recipes) drops the response column after reading: its bytes are checked."""
    f = _write(tmp_path / "log.jsonl", _fusion_line("a") + "\n" + _fusion_line("b", response="x" + BAD) + "\n")
    with pytest.raises(LogFormatError) as e:
        read_source("llmfusionbench", f, ReaderOptions(responses=False))
    assert (e.value.row, e.value.field) == (2, "response")


def test_jsonl_bad_bytes_outside_a_string_and_counted_lines(tmp_path):
    lines = [_fusion_line("a"), '{"task_name": "gsm8k", ' + BAD + '"query": "b", "llm": "m", "performance": 1}',
             _fusion_line("c" + BAD)]
    f = _write(tmp_path / "log.jsonl", "\n".join(lines) + "\n")
    err = _raises("llmfusionbench", f, 2, None)
    assert "2 lines of this file are not valid UTF-8" in str(err)


def test_utf16_file_is_named_as_such(tmp_path):
    f = tmp_path / "log.jsonl"
    f.write_bytes(_fusion_line("a").encode("utf-16"))  # starts with the byte-order mark \xff\xfe
    err = _raises("llmfusionbench", f, 1, None)
    assert "UTF-16 byte-order mark" in str(err)


def test_llmfusionbench_csv(tmp_path):
    f = _write(tmp_path / "log.csv", 'task_name,query,llm,performance\ngsm8k,"a\nb",m,1\ngsm8k,x' + BAD + ',m,0\n')
    _raises("llmfusionbench", f, 4, "query")  # the record starts on line 4 (line 2's quoted text spans two)


def test_routellm_csv_names_line_and_column(tmp_path):
    f = _write(tmp_path / "gsm8k.csv", 'prompt,gpt-4-1106-preview,gpt-4-1106-preview_response\n'
                                       '"p1",True,"x"\n"p2' + BAD + '",False,"y"\n')
    err = _raises("routellm", f, 3, "prompt")
    assert f"{f}: row 3: field 'prompt': not valid UTF-8: b'\"p2\\xff\\xfe\",False,\"y\"'" in str(err)
    f = _write(tmp_path / "h" / "gsm8k.csv", 'prompt,gpt' + BAD + '\n"p1",True\n')
    with pytest.raises(LogFormatError, match="row 1: header line is not valid UTF-8"):
        load_logs("routellm", f)


def test_routerbench_csv_names_the_column(tmp_path):
    f = _write(tmp_path / "rb.csv", "sample_id,prompt,eval_name,m,m|model_response,m|total_cost\n"
                                    "s1,p1,mmlu,1,A,0.1\ns2,p2,mmlu,0,\"B" + BAD + "\",0.2\n")
    _raises("routerbench", f, 3, "m|model_response")


def test_llmrouter_json_array_names_the_record(tmp_path):
    d = tmp_path / "r"
    f = _write(d / "gsm8k.json", '[{"question": "a", "scores": {"m1": 1}},\n'
                                 ' {"question": "b' + BAD + '", "scores": {"m1": 0}}]')
    _raises("llmrouter", d, 2, "question", file=f)
    _write(d / "gsm8k.json", json.dumps([{"question": "a", "scores": {"m1": 1}}]))
    q = _write(d / "queries_test.jsonl", json.dumps({"task_name": "gsm8k", "query": "a"}) + "\n"
               + '{"task_name": "gsm8k", "query": "a", "ground_truth": "4' + BAD + '"}\n')
    _raises("llmrouter", d, 2, "ground_truth", file=q)  # the joined query file is checked too


def test_route_input_lines_report_each_bad_line(tmp_path):
    f = _write(tmp_path / "in.jsonl", '{"query": "ok"}\n{"query": "x' + BAD + '"}\n{"query": 5}\n')

    def check(rec):
        return [] if isinstance(rec.get("query"), str) else ["'query' must be a string"]

    with pytest.raises(ValueError) as e:
        read_input_lines(f, check)
    msg = str(e.value)
    assert f"{f}: 2 bad input line(s)" in msg
    assert "line 2: field 'query' is not valid UTF-8" in msg and "line 3: 'query' must be a string" in msg
