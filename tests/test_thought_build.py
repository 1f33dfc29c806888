"""Thought level, template building: selection, summarisers (rule and over HTTP), library dedup, resumable build, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from openai_server import FakeOpenAIServer, last_user
from thought_logs import make_logs

from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.serving import OpenAICompatibleBackend
from fusion_lightning.thought.build import build_library
from fusion_lightning.thought.library import Template, TemplateLibrary
from fusion_lightning.thought.select import TemplateSelection, select_for_templates
from fusion_lightning.thought.summarise import (
    LLMSummariser,
    MalformedTemplate,
    RuleSummariser,
    parse_template,
    summary_prompt,
)

# (model, response, performance, judge, cost) per query
LOG = {
    "q1": [("a", "a1", 1.0, 0.2, 1.0), ("b", "b1", 1.0, 0.9, 3.0), ("c", "c1", 1.0, 0.9, 2.0),
           ("d", "d1", 0.8, 1.0, 0.5), ("e", "e1", 0.7, 1.0, 0.1), ("f", "f1", 0.6, 1.0, 0.1)],
    "q2": [("a", "wrong", 0.0, 1.0, 1.0), ("b", "also wrong", 0.0, 1.0, 1.0), ("c", "no", 0.0, 0.0, 1.0),
           ("d", "x", 0.0, 0.0, 1.0), ("e", "y", 0.0, 0.0, 1.0), ("f", "z", 0.0, 0.0, 1.0)],
}


def _logs():
    rows = [(q, "t", m, r, p, j, c, "train") for q, rs in LOG.items() for m, r, p, j, c in rs]
    return make_logs(rows, list("abcdef"))


def _picked(**kw) -> dict[str, list[str]]:
    groups, _ = select_for_templates(_logs(), TemplateSelection(**kw))
    return {g[0].query: [e.source for e in g] for g in groups.values()}


def test_selection_strategies_on_hand_made_log():
    # performance: score desc (then shorter, cheaper) -> a, c, b (ties on score 1.0 broken by cost)
    assert _picked(strategy="performance", n=3) == {"q1": ["a", "c", "b"]}
    # judge: judge desc, cost asc -> e, f (1.0, cost 0.1) then d; q2 has no correct answer at all
    assert _picked(strategy="judge", n=3) == {"q1": ["e", "f", "d"]}
    # hybrid (paper): top 5 by performance {a, c, b, d, e}, re-ranked by judge then cost -> e, d, c
    assert _picked(strategy="hybrid", n=3) == {"q1": ["e", "d", "c"]}
    assert _picked(strategy="hybrid", n=3, pool=["a", "b"]) == {"q1": ["b", "a"]}
    groups, report = select_for_templates(_logs(), TemplateSelection(max_chars=1))
    assert report.no_usable_response == 1 and report.examples == 3 and report.per_source == {"e": 1, "d": 1, "c": 1}
    assert [e.response for g in groups.values() for e in g] == ["e …", "d …", "c …"]  # the length cap
    with pytest.raises(ValueError, match="choose from"):
        select_for_templates(_logs(), TemplateSelection(strategy="cost_aware"))


VALID = {"task_type": "arithmetic word problem", "reasoning": "Add the parts. Then subtract what is given away.",
         "answer_format": "#### <number>"}


def test_parse_template_is_strict():
    assert parse_template(json.dumps(VALID)).reasoning == VALID["reasoning"]
    assert parse_template("```json\n" + json.dumps(VALID) + "\n```").task_type == "arithmetic word problem"
    for bad, why in [("not json", "not JSON"), ("[1]", "JSON object"), (json.dumps({**VALID, "x": "1"}), "unexpected"),
                     (json.dumps({**VALID, "reasoning": ""}), "non-empty"),
                     (json.dumps({**VALID, "reasoning": "A. B. C. D."}), "1-3 sentences")]:
        with pytest.raises(MalformedTemplate, match=why):
            parse_template(bad)


def _qa_logs(n: int = 6):
    return make_logs([(f"question {i}: what is {i} plus {i}?", "t", "a", f"Add {i} and {i}. #### {2 * i}", 1.0, 1.0,
                       0.1, "train") for i in range(n)], ["a"])


def test_llm_summariser_over_http_valid_malformed_failing(tmp_path):
    def answer(messages):
        text = last_user(messages)
        if "question 1:" in text:
            return "sorry, no JSON here"  # always malformed
        if "question 2:" in text and "rejected" not in text:
            return "{broken"  # malformed once, valid on the retry
        return json.dumps(VALID)

    with FakeOpenAIServer(api_key=None, answer=answer) as server:
        backend = OpenAICompatibleBackend(server.base_url, "summ", cache_dir=tmp_path / "cache", errors="return",
                                          max_retries=0, progress=False)
        logs = _qa_logs()
        groups, _ = select_for_templates(logs, TemplateSelection(n=1))
        failing = next(p for p in map(summary_prompt, groups.values()) if "question 3:" in p)
        server.faults[failing] = ["400"]
        lib, report = build_library(logs, LLMSummariser(backend, retries=2), build_encoder("hashing"),
                                    tmp_path / "lib", TemplateSelection(n=1), progress=False)
    failed = {f["query_id"]: f for f in lib.failures}
    qid = {g[0].query.split(":")[0]: q for q, g in groups.items()}
    assert set(failed) == {qid["question 1"], qid["question 3"]}
    assert failed[qid["question 1"]]["attempts"] == 3 and "malformed" in failed[qid["question 1"]]["error"]
    assert "backend error" in failed[qid["question 3"]]["error"]
    stored = lib.query_ids
    assert qid["question 2"] in stored and not stored & set(failed)  # failures are never stored
    assert report.failed == 2 and report.built + report.deduplicated == 4
    assert all(t.summarisers == ["llm:summ"] for t in lib.templates)
    assert (tmp_path / "lib" / "failures.jsonl").read_text().count("\n") == 2


def test_dedup_merges_provenance_and_appends(tmp_path):
    lib = TemplateLibrary("hashing-256", dedup_threshold=0.9)
    mk = lambda q, task, m: Template(Template.content_id(task, q), task, None, q, [q], [q], [m], ["rule"], [1.0], [None])  # noqa: E731
    v = np.eye(4, dtype=np.float32)
    near = (v[0] + 0.1 * v[1]) / np.linalg.norm(v[0] + 0.1 * v[1])
    counts = lib.add([mk("a", "t", "m1"), mk("b", "t", "m2"), mk("c", "u", "m3"), mk("d", "t", "m4")],
                     np.stack([v[0], near, near, v[2]]))
    assert counts == {"added": 3, "merged": 1}  # b merges into a; c is another task, not a duplicate
    assert lib.templates[0].query_ids == ["a", "b"] and lib.templates[0].models == ["m1", "m2"]
    assert lib.templates[0].scores == [1.0, 1.0]
    lib.save(tmp_path)
    again = TemplateLibrary.load(tmp_path)
    again.add([mk("a", "t", "m9")], v[:1])  # same content id -> merged, never duplicated
    assert len(again) == 3 and again.templates[0].models == ["m1", "m2", "m9"]
    (tmp_path / "templates.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="templates.jsonl line 1"):
        TemplateLibrary.load(tmp_path)


class _Interrupting(RuleSummariser):
    def __init__(self, after: int):
        super().__init__()
        self.calls, self.after = 0, after

    def summarise(self, groups, metrics=None):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return super().summarise(groups, metrics)


def test_build_resumes_after_interruption_without_duplicates(tmp_path):
    rows = [(f"item {i} sum of {i} and {2 * i}", "t", "a", f"Step {i}: combine part {i} with part {i + 7}.", 1.0, 1.0,
             0.1, "train") for i in range(40)]
    logs, enc = make_logs(rows, ["a"]), build_encoder("hashing")
    with pytest.raises(KeyboardInterrupt):
        build_library(logs, _Interrupting(after=2), enc, tmp_path / "lib", batch_size=8, progress=False)
    partial = TemplateLibrary.load(tmp_path / "lib")
    assert 0 < len(partial.query_ids) == 16
    lib, report = build_library(logs, RuleSummariser(), enc, tmp_path / "lib", batch_size=8, progress=False)
    full, _ = build_library(logs, RuleSummariser(), enc, tmp_path / "fresh", batch_size=8, progress=False)
    assert report.skipped == 16 and len(lib) == len(full)
    assert sorted(t.id for t in lib.templates) == sorted(t.id for t in full.templates)
    assert sum(len(t.query_ids) for t in lib.templates) == 40  # every query once, none twice
    assert lib.summarisers == ["rule"]


def test_templates_cli_builds_and_resumes(tmp_path, capsys):
    from fusion_lightning.templates import main

    args = ["build", "data.synthetic.n_queries=80", "data.synthetic.models=4", "encoder=hashing", f"out={tmp_path}"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "built" in first and "summariser: rule" in first
    n = len(TemplateLibrary.load(tmp_path))
    assert main(args) == 0 and "built 0," in capsys.readouterr().out and len(TemplateLibrary.load(tmp_path)) == n
    assert main(["build", "backend=nope"]) == 1
    assert "choose from: local, openai_compatible, rule" in capsys.readouterr().err
