"""Thought level, retrieved exemplars: the library's solved examples, the modes of TemplateAugmenter
(order, whole-example token budget, task filter, own-answer exclusion), the per-backend tokenizer in the
fused pipeline, and the live exemplar column of `evaluate` — on hand-made examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer, last_user
from thought_logs import make_logs

from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.scoring.formats import answer_instruction, zero_shot_prompt
from fusion_lightning.serving.base import Generation
from fusion_lightning.serving.pipeline import FusedPipeline
from fusion_lightning.thought.build import build_library
from fusion_lightning.thought.library import Exemplar, Template, TemplateLibrary
from fusion_lightning.thought.prompt import (
    TemplateAugmenter,
    ThoughtSettings,
    approx_tokens,
    fit_budget,
    token_counter,
)
from fusion_lightning.thought.summarise import RuleSummariser

QUERY = "alpha beta gamma delta epsilon"
# (query id, task, question, template text, best answer): the templates share 4, 2, 1 and 0 words with
# QUERY; an other-task template shares all 5
ROWS = [("qa", "t", "Question A?", "alpha beta gamma delta walk", "Answer A #### 1"),
        ("qb", "t", "Question B?", "alpha beta run jump swim", "Answer B #### 2"),
        ("qc", "t", "Question C?", "alpha fly sing read write", "Answer C #### 3"),
        ("qd", "t", "Question D?", "zeta eta theta iota kappa", "Answer D #### 4"),
        ("qx", "other", "Question X?", "alpha beta gamma delta epsilon", "Answer X #### 5")]


def hand_library(folder: Path | None = None) -> TemplateLibrary:
    enc = build_encoder("hashing")
    templates = [Template(Template.content_id(t, text), t, None, text, [q], [question], ["m"], ["rule"], [1.0], [None])
                 for q, t, question, text, _ in ROWS]
    lib = TemplateLibrary(enc.name)
    lib.add(templates, enc.encode([x.text for x in templates]))
    lib.add_exemplars([Exemplar(q, t, question, answer, "m", 1.0) for q, t, question, _, answer in ROWS])
    if folder is not None:
        lib.save(folder)
    return lib


def frozen(lib: TemplateLibrary, **kw) -> TemplateAugmenter:
    enc = build_encoder(lib.encoder)
    return TemplateAugmenter(lib, lambda texts: enc.encode(list(texts)), lib.embeddings, **kw)


def words(text: str) -> int:
    return len(text.split())


def test_exemplars_come_nearest_first_within_the_task() -> None:
    aug = frozen(hand_library(), k=3, mode="exemplars", budget_tokens=None)
    demos = aug.demonstrations([QUERY], ["t"], aug.settings)[0]
    assert [d.question for d in demos] == ["Question A?", "Question B?", "Question C?"]  # 4, 2, 1 shared words
    assert [d.solution for d in demos] == ["Answer A #### 1", "Answer B #### 2", "Answer C #### 3"]
    prompt = aug.prompts([QUERY], ["t"], ["GSM8K"])[0]
    assert prompt.startswith("Question: Question A?\nSolution: Answer A #### 1\n\nQuestion: Question B?")
    assert prompt.endswith(f"Question: {QUERY}\n\n{answer_instruction('GSM8K')}")
    assert "Thought template" not in prompt and "Answer X" not in prompt  # the task filter
    # without the filter the other task's template (all 5 words shared) comes first
    unfiltered = frozen(hand_library(), k=2, mode="exemplars", task_filter=False, budget_tokens=None)
    assert [d.question for d in unfiltered.demonstrations([QUERY], ["t"], unfiltered.settings)[0]] == \
        ["Question X?", "Question A?"]
    # a query never sees its own answer (a val pass): A is excluded, the next nearest fill in
    own = aug.demonstrations([QUERY], ["t"], aug.settings, exclude=[{"qa"}])[0]
    assert [d.question for d in own] == ["Question B?", "Question C?", "Question D?"]


def test_budget_keeps_whole_examples_in_order_and_skips_what_does_not_fit() -> None:
    lib = hand_library()
    lib.exemplars["qa"] = Exemplar("qa", "t", "Question A?", "stride " * 40 + "#### 1", "m", 1.0)
    blocks = ["Question: Question A?\nSolution: " + "stride " * 40 + "#### 1",
              "Question: Question B?\nSolution: Answer B #### 2", "Question: Question C?\nSolution: Answer C #### 3"]
    assert [words(b) for b in blocks] == [46, 8, 8]
    assert fit_budget(blocks, 16, words) == [1, 2]  # A (46) does not fit: skipped whole, B and C still tried
    assert fit_budget(blocks, 15, words) == [1]  # B fits, C (8 more) does not
    assert fit_budget(blocks, 7, words) == [] and fit_budget(blocks, None, words) == [0, 1, 2]
    aug = frozen(lib, k=3, mode="exemplars", budget_tokens=16, count_tokens=words)
    prompt = aug.prompts([QUERY], ["t"], ["GSM8K"])[0]
    assert "stride" not in prompt and "Question A?" not in prompt  # never cut mid-example
    assert prompt.index("Answer B #### 2") < prompt.index("Answer C #### 3")
    tight = frozen(lib, k=3, mode="exemplars", budget_tokens=7, count_tokens=words)
    assert tight.prompts([QUERY], ["t"], ["GSM8K"])[0] == zero_shot_prompt(QUERY, "GSM8K")  # nothing fits


def test_modes_render_templates_exemplars_both_and_none() -> None:
    aug = frozen(hand_library(), k=2, budget_tokens=None)
    render = {m: aug.render([QUERY], ["t"], ["GSM8K"], ThoughtSettings(m, 2, None))[0]
              for m in ("none", "templates", "exemplars", "both")}
    assert render["none"] == zero_shot_prompt(QUERY, "GSM8K")
    assert render["templates"].count("Thought template:") == 2 and "Solution:" not in render["templates"]
    assert render["exemplars"].count("Solution:") == 2 and "Thought template" not in render["exemplars"]
    both = render["both"]
    assert both.count("Thought template:") == 2 and both.count("Solution:") == 2
    assert both.index("alpha beta gamma delta walk") < both.index("Answer A #### 1") < both.index("Question B?")
    assert render["templates"] == aug.prompts([QUERY], ["t"], ["GSM8K"])[0]  # the default mode: templates
    with pytest.raises(ValueError, match="choose from"):
        ThoughtSettings("fewshot")


def test_build_stores_each_querys_best_answer_uncut_and_adds_them_to_an_old_library(tmp_path) -> None:
    long = "First add the parts. " * 150 + "#### 7"  # longer than the summariser's 2000-character cap
    rows = [("q1", "t", "a", "partly right", 0.5, 1.0, 0.1, "train"), ("q1", "t", "b", long, 1.0, 0.0, 0.2, "train"),
            ("q2", "t", "a", "wrong", 0.0, 1.0, 0.1, "train"), ("q2", "t", "b", "also wrong", 0.0, 1.0, 0.1, "train")]
    logs = make_logs(rows, ["a", "b"])
    lib, report = build_library(logs, RuleSummariser(), build_encoder("hashing"), tmp_path / "lib", progress=False)
    assert report.exemplars_added == 1 and list(lib.exemplars) == [lib.templates[0].query_ids[0]]
    ex = next(iter(lib.exemplars.values()))
    assert ex.response == long and ex.model == "b" and ex.score == 1.0  # the best score, uncut
    assert TemplateLibrary.load(tmp_path / "lib").exemplars == lib.exemplars
    assert json.loads((tmp_path / "lib" / "library.json").read_text())["exemplars"] == 1
    (tmp_path / "lib" / "exemplars.jsonl").unlink()  # a library from before exemplars
    old = TemplateLibrary.load(tmp_path / "lib")
    assert old.exemplars == {}
    with pytest.raises(ValueError, match="has no exemplars"):
        TemplateAugmenter.load(tmp_path / "lib", mode="exemplars")

    class NoCalls(RuleSummariser):
        def summarise(self, groups, metrics=None):
            assert not groups, "the summariser was asked again"
            return []

    _, again = build_library(logs, NoCalls(), build_encoder("hashing"), tmp_path / "lib", progress=False)
    assert again.exemplars_added == 1 and again.skipped == 1
    assert TemplateLibrary.load(tmp_path / "lib").exemplars[ex.query_id].response == long


class _Backend:
    """A backend with (or without) a tokenizer that records the prompts it gets."""

    def __init__(self, name: str, tokenizer=None):
        self.name, self.prompts = name, []
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def generate(self, prompts, **sampling):
        self.prompts += list(prompts)
        return [Generation("#### 1", 1, 1, 0.0) for _ in prompts]


def test_token_counter_is_the_backends_tokenizer_else_bytes_over_four(tmp_path) -> None:
    from tiny_lm import build_tiny_lm

    from fusion_lightning.serving import LocalBackend

    local = LocalBackend(str(build_tiny_lm(tmp_path / "tiny")), progress=False)
    text = "Question: What is 2 + 3?\nSolution: 5"
    assert token_counter(local)(text) == len(local.tokenizer(text, add_special_tokens=False)["input_ids"]) > 0
    assert token_counter(_Backend("http"))(text) == approx_tokens(text) == 9  # 36 bytes / 4


def test_pipeline_writes_each_prompt_in_the_budget_of_the_model_that_answers(tmp_path) -> None:
    lib = hand_library(tmp_path / "lib")
    # "chars": a tokenizer that counts one token per character -> one ~40-char exemplar fits in 60 tokens;
    # "bytes": no tokenizer -> bytes / 4 -> three exemplars fit
    chars = _Backend("chars", tokenizer=lambda text, add_special_tokens=False: {"input_ids": list(text)})
    small = _Backend("bytes")
    aug = TemplateAugmenter.load(tmp_path / "lib", k=3, mode="exemplars", budget_tokens=60)
    pipe = FusedPipeline([chars, small], augmenter=aug)
    pipe.run([QUERY], tasks=["t"], metrics=["GSM8K"], model="chars")
    pipe.run([QUERY], tasks=["t"], metrics=["GSM8K"], model="bytes")
    assert chars.prompts[0].count("Solution:") == 1 and small.prompts[0].count("Solution:") == 3
    assert len(lib.exemplars) == 5


def test_serve_config_mode_exemplars_reaches_the_upstream_model(tmp_path) -> None:
    hand_library(tmp_path / "lib")
    with FakeOpenAIServer(api_key=None, answer=lambda m: "#### 1") as server:
        pipe = FusedPipeline.from_config({
            "backends": [{"type": "openai_compatible", "base_url": server.base_url, "model": "m", "name": "up",
                          "cache_dir": None, "progress": False}],
            "thought": {"library": str(tmp_path / "lib"), "k": 2, "mode": "exemplars", "budget_tokens": None}})
        out = pipe.run(conversations=[[{"role": "user", "content": QUERY}]], tasks=["t"], metrics=["GSM8K"])
        sent = last_user(server.bodies[-1]["messages"])
        assert sent == out[0].prompt[-1]["content"] and sent.count("Solution:") == 2
        assert sent.startswith("Question: Question A?\nSolution: Answer A #### 1\n\nQuestion: Question B?")
        none = FusedPipeline.from_config({
            "backends": [{"type": "openai_compatible", "base_url": server.base_url, "model": "m", "name": "up",
                          "cache_dir": None, "progress": False}],
            "thought": {"library": str(tmp_path / "lib"), "mode": "none"}})
        none.run(conversations=[[{"role": "user", "content": QUERY}]], tasks=["t"])
        assert last_user(server.bodies[-1]["messages"]) == QUERY  # mode none: the conversation goes through as is
        with pytest.raises(ValueError, match="thought.mode='fewshot'"):
            FusedPipeline.from_config({"backends": [], "thought": {"library": str(tmp_path / "lib"), "mode": "fewshot"}})


def test_evaluate_scores_the_exemplar_column_and_never_shows_a_query_its_own_answer(tmp_path) -> None:
    from fusion_lightning.fusion_table import evaluate

    rows = []
    for i in range(12):
        split = "test" if i % 3 == 0 else "train"
        q = f"ask alpha beta number {i} gamma"
        rows += [(q, "t", "m", f"worked answer {i}", 1.0, 1.0, 0.01, split),
                 (q, "t", "w", "wrong", 0.0, 1.0, 0.01, split)]
    logs = make_logs(rows, ["m", "w"])  # ground truth "x", metric "em" (multiple choice: the letter X)
    build_library(logs.select("train"), RuleSummariser(), build_encoder("hashing"), tmp_path / "lib", progress=False)
    lib_all = tmp_path / "lib_all"  # a library that holds the test answers too
    build_library(logs, RuleSummariser(), build_encoder("hashing"), lib_all, progress=False)

    def answer(messages):  # right only when a solved example is in the prompt
        return "The answer is (X)" if "Solution:" in last_user(messages) else "The answer is (A)"

    with FakeOpenAIServer(api_key=None, answer=answer) as server:
        backend = {"type": "openai_compatible", "base_url": server.base_url, "model": "m", "name": "up",
                   "cache_dir": None, "progress": False}
        ev = evaluate(logs, thought={"backend": backend, "library": str(tmp_path / "lib"), "k": 2,
                                     "modes": ["none", "templates", "exemplars", "both"]})
        assert [c for c in ev.columns if c.startswith("thought:")] == [
            "thought:zero_shot", "thought:templates", "thought:exemplars", "thought:both"]
        assert ev.columns["thought:exemplars"][0].mean() == ev.columns["thought:both"][0].mean() == 1.0
        assert ev.columns["thought:zero_shot"][0].mean() == ev.columns["thought:templates"][0].mean() == 0.0
        sent = len(server.bodies)
        assert sent == 4 * len(ev.query_ids)  # every column's prompts differ: none is shared
        # every answer abstracts to one template, merged from all 12 queries (the test ones too): its other
        # sources' exemplars are shown, the query's own never
        assert len(TemplateLibrary.load(lib_all)) == 1
        evaluate(logs, thought={"backend": backend, "library": str(lib_all), "k": 2, "modes": ["exemplars"]})
        assert len(server.bodies) == sent + 4
        for body in server.bodies[sent:]:
            p = last_user(body["messages"])
            n = p.split("number ")[-1].split(" ")[0]  # the query's own number
            assert p.count("Solution: worked answer") == 2 and f"worked answer {n}\n" not in p


def test_random_few_shot_is_like_for_like_with_exemplars(tmp_path) -> None:
    """The few-shot column beside `exemplars`: as many examples (shots defaults to k), drawn from the same
    pool (the library's exemplars, partial answers included: not only the fully solved questions), of the
    query's task (the task filter), in the same prompt and token budget; only the retrieval differs."""
    from fusion_lightning.fusion_table import evaluate

    rows = []
    for i in range(12):
        split = "test" if i % 3 == 0 else "train"
        q = f"ask alpha beta number {i:02d} gamma"
        rows += [(q, "t", "m", f"partial answer {i:02d}", 0.5, 1.0, 0.01, split),  # no question fully solved
                 (f"other task question {i:02d}", "o", "m", f"other answer {i:02d}", 1.0, 1.0, 0.01, split)]
    logs = make_logs(rows, ["m"])
    build_library(logs.select("train"), RuleSummariser(), build_encoder("hashing"), tmp_path / "lib", progress=False)
    block = approx_tokens("Question: ask alpha beta number 01 gamma\nSolution: partial answer 01\n\n")

    with FakeOpenAIServer(api_key=None, answer=lambda m: "The answer is (A)") as server:
        backend = {"type": "openai_compatible", "base_url": server.base_url, "model": "m", "name": "up",
                   "cache_dir": None, "progress": False}
        ev = evaluate(logs, tasks=["t"], thought={"backend": backend, "library": str(tmp_path / "lib"), "k": 2,
                                                  "budget_tokens": block + 1, "modes": ["few_shot", "exemplars"]})
        sent = [last_user(b["messages"]) for b in server.bodies]
        # few_shot_pool: solved (the default without a library): the fully solved train questions, none here
        solved = evaluate(logs, tasks=["t"], thought={"backend": backend, "library": str(tmp_path / "lib"),
                                                      "few_shot_pool": "solved", "modes": ["few_shot"]})
        assert not any("Solution:" in last_user(b["messages"]) for b in server.bodies[len(sent):])
    assert "few-shot: no solved train example for task(s) ['t']: zero-shot there" in solved.notes
    n = len(ev.query_ids)
    assert n == 4 and len(sent) == 2 * n and not any("few-shot: no" in x for x in ev.notes)
    few, ex = sent[:n], sent[n:]
    for f, e in zip(few, ex, strict=True):
        assert f.count("Solution: partial answer") == e.count("Solution: partial answer") == 1  # the budget: 1 of k=2
        assert "other answer" not in f  # the task filter
    assert few != ex  # random, not retrieved
    lib = TemplateLibrary.load(tmp_path / "lib")
    aug = frozen(lib)
    picks = aug.random_demonstrations(["t", "t", "o", None], 3, exclude=[set(), {"x"}, set(), set()])
    assert [len(p) for p in picks] == [3, 3, 3, 3]
    assert all(d.solution.startswith("partial") for p in picks[:2] for d in p)
    assert all(d.solution.startswith("other") for d in picks[2])
    assert picks == aug.random_demonstrations(["t", "t", "o", None], 3, exclude=[set(), {"x"}, set(), set()])  # seeded
