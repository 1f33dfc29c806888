"""Log collection and the LLM judge: records our LLMFusionBench reader reads back, resume, strict judging."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer, last_user
from tiny_lm import build_tiny_lm

from fusion_lightning.collect import main as collect_main
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.schema import LOG_FIELDS, ModelCatalog, ModelInfo
from fusion_lightning.serving import OpenAICompatibleBackend, build_backend
from fusion_lightning.serving.judge import parse_judgement
from fusion_lightning.serving.make_log import THINK_LINE, collect, read_query_file

QUERIES = [{"task_name": "gsm8k", "query": f"What is {a} plus {b}?", "ground_truth": f"#### {a + b}", "metric": "GSM8K"}
           for a, b in ((2, 3), (10, 7), (4, 4))]
QUERIES.append({"task_name": "mmlu", "query": "Pick B. (A) no (B) yes", "ground_truth": "B", "metric": "em_mc"})


def _solver(messages: list[dict]) -> str:
    """Right on arithmetic; right on multiple choice only when asked to think step by step."""
    text = last_user(messages)
    m = re.search(r"What is (\d+) plus (\d+)", text)
    if m:
        return f"{m.group(1)} + {m.group(2)} = {int(m.group(1)) + int(m.group(2))}\n#### {int(m.group(1)) + int(m.group(2))}"
    return "The answer is (B)" if THINK_LINE in text else "The answer is (A)"


def _judge(messages: list[dict]) -> str:
    text = last_user(messages)
    if "10 plus 7" in text:
        return "I think it is fine."  # no score line: missing, not 0
    return "Correct and well reasoned.\nScore: 0.8" if "####" in text.split("Model's answer:")[1] else "Score: 0"


@pytest.fixture()
def servers():
    with FakeOpenAIServer(api_key=None, answer=_solver) as solver, FakeOpenAIServer(api_key=None, answer=_judge) as judge:
        yield solver, judge


def _queries(tmp_path: Path, rows=QUERIES) -> Path:
    p = tmp_path / "queries.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _catalog() -> ModelCatalog:
    cat = ModelCatalog(source="test")
    cat.add(ModelInfo("solver", params_b=7, input_price=2.0, output_price=4.0, description="a solver"))
    return cat


def test_collect_writes_scored_priced_judged_records_the_reader_reads_back(servers, tmp_path: Path) -> None:
    solver, judge = servers
    out = tmp_path / "log_test.jsonl"
    backend = OpenAICompatibleBackend(solver.base_url, "m", name="solver", cache_dir=tmp_path / "cache", progress=False)
    jb = OpenAICompatibleBackend(judge.base_url, "j", cache_dir=tmp_path / "cache", progress=False)
    report = collect(read_query_file(_queries(tmp_path)), [backend], out, catalog=_catalog(), think=True, judge=jb,
                     progress=False)
    assert report.written == 8 and report.per_model == {"solver": 4, "solver_think": 4}
    assert report.judged == 8 and report.judge_missing == 2  # the two "10 plus 7" judgements
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["cost"] == rows[0]["input_tokens_num"] * 2.0 + rows[0]["output_tokens_num"] * 4.0  # µ$

    logs = load_logs("llmfusionbench", out)
    t = logs.table.to_pylist()
    assert len(t) == 8 and sorted(logs.models) == ["solver", "solver_think"]
    assert logs.catalog["solver_think"].base_model == "solver"
    by = {(r["model"], r["query"][:12]): r for r in t}
    assert by[("solver", "What is 2 pl")]["performance"] == 1.0
    assert by[("solver", "Pick B. (A) ")]["performance"] == 0.0
    assert by[("solver_think", "Pick B. (A) ")]["performance"] == 1.0
    assert by[("solver", "What is 10 p")]["judge"] is None  # unparseable -> null, never 0
    assert by[("solver", "What is 2 pl")]["judge"] == 0.8
    assert by[("solver", "Pick B. (A) ")]["judge"] == 0.0
    first = by[("solver", "What is 2 pl")]
    assert first["cost"] == pytest.approx((first["input_tokens"] * 2.0 + first["output_tokens"] * 4.0) / 1e6)
    assert logs.table.column("split").to_pylist()[0] == "test"  # from the file name


def test_collect_resumes_without_resending(servers, tmp_path: Path) -> None:
    solver, _ = servers
    out = tmp_path / "log.jsonl"
    qs = read_query_file(_queries(tmp_path))
    mk = lambda: OpenAICompatibleBackend(solver.base_url, "m", name="solver", cache_dir=None, progress=False)  # noqa: E731
    first = collect(qs[:2], [mk()], out, progress=False)
    assert first.written == 2 and "costs are null" in first.notes[0]
    sent = sum(solver.requests.values())
    with out.open("a") as fh:
        fh.write('{"query_id": "torn')  # a crash in the middle of a write
    again = collect(qs, [mk()], out, progress=False)
    assert again.skipped == 2 and again.written == 2
    assert sum(solver.requests.values()) == sent + 2  # only the new queries were sent
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and len({r["query_id"] for r in rows}) == 4


def test_bad_query_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps(QUERIES[0]) + "\nnot json\n" + json.dumps({"query": "x", "task_name": "t"}) + "\n"
                 + json.dumps({**QUERIES[0], "metric": "bleu"}) + "\n")
    with pytest.raises(ValueError) as e:
        read_query_file(p)
    msg = str(e.value)
    assert "3 bad input line(s)" in msg and "line 2: invalid JSON" in msg
    assert "line 3: field 'ground_truth' missing" in msg and "line 4: field 'metric': unknown metric 'bleu'" in msg


def test_multiple_choice_options_are_written_below_the_question(tmp_path: Path) -> None:
    # LLMRouter's query files keep the options in `choices`; a question sent without them is unanswerable
    mc = {"task_name": "arc_challenge", "query": "Which is a gas?", "ground_truth": "B", "metric": "em_mc",
          "choices": "{'text': ['ice', 'steam'], 'label': ['A', 'B']}"}
    code = {"task_name": "mbpp", "query": "Write f.", "ground_truth": "assert f()", "metric": "code_eval",
            "choices": "['assert f() == 1']"}  # MBPP stores its tests there: not options
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps(mc) + "\n" + json.dumps(code) + "\n" + json.dumps({**mc, "choices": "[oops"}) + "\n")
    with pytest.raises(ValueError, match=r"line 3: field 'choices': choices is not a list"):
        read_query_file(p)
    p.write_text(json.dumps(mc) + "\n" + json.dumps(code) + "\n")
    a, b = read_query_file(p)
    assert a.query == "Which is a gas?\n\n(A) ice\n(B) steam" and b.query == "Write f."
    assert a.query_id != read_query_file(_write(tmp_path / "bare.jsonl", {**mc, "choices": None}))[0].query_id


def _write(path: Path, rec: dict) -> Path:
    path.write_text(json.dumps(rec) + "\n")
    return path


@pytest.mark.parametrize(("text", "want"), [
    ("Reasoning...\nScore: 0.6", 0.6), ("**Score:** 1.0", 1.0), ("Score = 0", 0.0), ("0.3", 0.3),
    ("Score: 0.5", None), ("Score: 0.8\nScore: 0.3", None), ("I give it a 0.8", None), ("", None),
    ("score: 1\nScore: 1.0.", 1.0),
])
def test_judgements_are_parsed_strictly(text: str, want) -> None:
    assert parse_judgement(text) == want


def test_cli_with_inline_backends_and_catalog(servers, tmp_path: Path, capsys) -> None:
    solver, _ = servers
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"solver": {"params_b": 7, "input_price": 1.0, "output_price": 1.0}}))
    out = tmp_path / "cli.jsonl"
    args = [f"queries={_queries(tmp_path)}", f"out={out}", f"catalog={cat}", "progress=false",
            f"backends=[{{type:openai_compatible,base_url:'{solver.base_url}',model:m,name:solver,cache_dir:null}}]"]
    assert collect_main(args) == 0
    assert "wrote 4 record(s)" in capsys.readouterr().out
    assert collect_main(args) == 0
    assert "wrote 0 record(s), skipped 4" in capsys.readouterr().out
    assert collect_main([*args, "bogus=1"]) == 1
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    bad = [a.replace("name:solver", "name:other") for a in args]
    assert collect_main(bad) == 1
    assert "not in the catalog" in capsys.readouterr().err


def test_collect_with_a_local_model_writes_canonical_records(tmp_path: Path) -> None:
    """A real in-process model (the tiny random Llama, as a zoo model is once cached) on 3 questions,
    plain and `_think`: 6 records that the reader turns into valid canonical rows."""
    model = build_tiny_lm(tmp_path / "tiny-local")
    backend = build_backend({"type": "local", "model": str(model), "device": "cpu", "progress": False})
    out = tmp_path / "log_train.jsonl"
    report = collect(read_query_file(_queries(tmp_path, QUERIES[:3])), [backend], out, think=True, progress=False,
                     sampling={"max_new_tokens": 6})
    assert report.written == 6 and report.failed == 0 and report.per_model == {"tiny-local": 3, "tiny-local_think": 3}
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r in rows:
        assert r["performance"] in (0.0, 1.0) and 0 < r["output_tokens_num"] <= 6 and r["input_tokens_num"] > 0
        assert r["cost"] is None and r["llm_judge"] is None and r["latency_s"] >= 0
    think = {r["query_id"]: r for r in rows if r["llm"].endswith("_think")}
    plain = {r["query_id"]: r for r in rows if not r["llm"].endswith("_think")}
    assert set(think) == set(plain) and all(think[q]["input_tokens_num"] > plain[q]["input_tokens_num"] for q in plain)
    logs = load_logs("llmfusionbench", out)  # the reader validates every row
    t = logs.table
    assert set(LOG_FIELDS) <= set(t.column_names) and t.num_rows == 6
    assert set(t.column("task").to_pylist()) == {"gsm8k"} and set(t.column("domain").to_pylist()) == {"math"}
    assert set(t.column("split").to_pylist()) <= {"train", "val"} and logs.catalog["tiny-local_think"].base_model == "tiny-local"
    assert t.column("ground_truth").to_pylist()[0] == "#### 5"
