"""Thought level, selection per target model on val (recipe thought_auto): a planted better mode is
chosen, zero-shot when nothing beats it beyond noise (router_auto's paired test), and the choice in
`thought_selection.json` is what the fused pipeline, `serve` and `evaluate` apply."""

from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from pathlib import Path
from statistics import NormalDist

import pytest
from openai_server import FakeOpenAIServer, last_user
from test_thought_exemplars import QUERY, hand_library

from fusion_lightning.callbacks.thought_selection import select_thought
from fusion_lightning.serving.base import Generation
from fusion_lightning.serving.pipeline import FusedPipeline
from fusion_lightning.thought.auto import Question, write_selection
from fusion_lightning.thought.prompt import SELECTION_FILE, TemplateAugmenter, ThoughtSettings, read_selection

N = 40  # val questions


def questions(n: int = N) -> list[Question]:
    return [Question(f"v{i}", f"{QUERY} item {i}", "t", "GSM8K", f"#### {i}") for i in range(n)]


class RuleBackend:
    """Answers question i right when `right(i, prompt)`; the prompt's last 'item N' is the question."""

    def __init__(self, right, name: str = "rule"):
        self.right, self.name, self.prompts = right, name, []

    def generate(self, prompts, **sampling):
        self.prompts += list(prompts)
        out = []
        for p in prompts:
            i = int(re.findall(r"item (\d+)", p)[-1])
            out.append(Generation(f"#### {i}" if self.right(i, p) else "#### -1", 1, 1, 0.0))
        return out


def augmenter() -> TemplateAugmenter:
    lib = hand_library()
    from fusion_lightning.data.embeddings import build_encoder

    enc = build_encoder(lib.encoder)
    return TemplateAugmenter(lib, lambda texts: enc.encode(list(texts)), lib.embeddings)


def test_selection_picks_the_planted_better_mode() -> None:
    # right on 4 in 5 questions with a solved example (exemplars, both) and on 1 in 5 without
    def right(i: int, prompt: str) -> bool:
        return (i % 5 != 0) == ("Solution:" in prompt and "Thought template" not in prompt)

    entry = select_thought(augmenter(), RuleBackend(right), questions(), ks=(1, 3), budget_tokens=None)
    assert (entry["mode"], entry["k"]) == ("exemplars", 1)  # exemplars@1 and @3 tie: the first listed
    rows = {r["candidate"]: r for r in entry["rows"]}
    assert list(rows) == ["none", "templates@1", "templates@3", "exemplars@1", "exemplars@3", "both@1", "both@3"]
    assert rows["none"]["val_perf"] == 0.2 and rows["exemplars@3"]["val_perf"] == 0.8
    assert rows["both@1"]["val_perf"] == rows["templates@3"]["val_perf"] == 0.2
    assert rows["exemplars@1"]["gain"] == pytest.approx(0.6) and rows["exemplars@1"]["selected"]
    assert entry["z"] == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 6))  # bonferroni over 6 comparisons


def test_selection_keeps_zero_shot_when_nothing_beats_it_beyond_noise() -> None:
    aug = augmenter()
    flat = select_thought(aug, RuleBackend(lambda i, p: i % 2 == 0), questions(), ks=(2,), budget_tokens=None)
    assert flat["mode"] == "none" and all(r["gain"] == 0 for r in flat["rows"])
    # templates help on 3 more questions of 40: +0.075 with SE 0.042, under z = 2.13 SEs -> still zero-shot
    noisy = select_thought(aug, RuleBackend(lambda i, p: i % 2 == 0 or (i < 6 and "Thought template" in p)),
                           questions(), ks=(2,), budget_tokens=None)
    rows = {r["candidate"]: r for r in noisy["rows"]}
    assert rows["templates@2"]["gain"] == pytest.approx(0.075) and noisy["mode"] == "none"
    assert rows["templates@2"]["gain"] < noisy["z"] * rows["templates@2"]["gain_se"]
    with pytest.raises(ValueError, match="needs val questions"):
        select_thought(aug, RuleBackend(lambda i, p: True), [])


def test_a_val_question_never_sees_its_own_answer() -> None:
    backend = RuleBackend(lambda i, p: True)
    qs = [Question("qa", QUERY + " item 0", "t", "GSM8K", "#### 0")]  # the library holds qa's answer
    select_thought(augmenter(), backend, qs, modes=("exemplars", "both", "templates"), ks=(3,), budget_tokens=None)
    assert backend.prompts and not any("Answer A" in p or "alpha beta gamma delta walk" in p for p in backend.prompts)


def split_questions(n_val: int, n_train: int) -> list[Question]:
    """n_val val questions (items 0..) then n_train train ones, none of them in the hand library."""
    return [Question(f"{s}{i}", f"{QUERY} item {i}", "t", "GSM8K", f"#### {i}", s)
            for s, r in (("val", range(n_val)), ("train", range(n_val, n_val + n_train))) for i in r]


def test_cross_fitting_finds_the_planted_mode_that_val_alone_is_too_small_to_show() -> None:
    # right on 4 in 5 questions with a solved example in the prompt, on the 5th only without one
    def right(i: int, prompt: str) -> bool:
        return (i % 5 != 0) == ("Solution:" in prompt)

    qs = split_questions(6, 40)
    val_only = select_thought(augmenter(), RuleBackend(right), [q for q in qs if q.split == "val"], ks=(1,),
                              budget_tokens=None)
    rows = {r["candidate"]: r for r in val_only["rows"]}
    assert rows["exemplars@1"]["gain"] == pytest.approx(2 / 6)  # +0.33 ± 0.42: 6 questions cannot show it
    assert val_only["mode"] == "none" and val_only["questions_by_split"] == {"val": 6}
    both = select_thought(augmenter(), RuleBackend(right), qs, ks=(1,), budget_tokens=None, cross_fit="cross-fitted")
    rows = {r["candidate"]: r for r in both["rows"]}
    assert (both["mode"], both["k"]) == ("exemplars", 1) and both["questions_by_split"] == {"val": 6, "train": 40}
    assert rows["exemplars@1"]["gain"] > both["z"] * rows["exemplars@1"]["gain_se"]
    assert rows["exemplars@1"]["perf_by_split"] == {"train": 0.8, "val": pytest.approx(4 / 6)}
    assert both["cross_fit"] == "cross-fitted"


def test_cross_fitting_keeps_zero_shot_when_no_mode_is_better() -> None:
    entry = select_thought(augmenter(), RuleBackend(lambda i, p: i % 3 == 0), split_questions(6, 60), ks=(1, 2),
                           budget_tokens=None)
    assert entry["mode"] == "none" and all(r["gain"] == 0 for r in entry["rows"])
    # a gain on 2 more of 66 questions (+0.03 ± 0.02) stays under the bar (z = 2.13): zero-shot
    noisy = select_thought(augmenter(), RuleBackend(lambda i, p: i % 3 == 0 or (i < 4 and "Solution:" in p)),
                           split_questions(6, 60), ks=(1,), budget_tokens=None)
    rows = {r["candidate"]: r for r in noisy["rows"]}
    assert rows["exemplars@1"]["gain"] == pytest.approx(2 / 66) and noisy["mode"] == "none"
    assert rows["exemplars@1"]["gain"] < noisy["z"] * rows["exemplars@1"]["gain_se"]


def test_a_train_question_never_sees_its_own_exemplar_nor_anything_built_from_it() -> None:
    """Cross-fitting scores train questions, whose answers are in the library: qa's own exemplar and
    template never reach its prompt, and neither does a template merged from qa and qb (in exemplars mode
    it would lead to qb's exemplar, ranked by a text summarised partly from qa's answer)."""
    from test_thought_exemplars import ROWS

    from fusion_lightning.data.embeddings import build_encoder
    from fusion_lightning.thought.library import Exemplar, Template, TemplateLibrary

    enc = build_encoder("hashing")
    # qa's template ("alpha beta gamma delta walk") with qb's merged into it: qb has no template of its own
    templates = [Template(Template.content_id(t, text), t, None, text, ["qa", "qb"] if q == "qa" else [q],
                          ["Question A?", "Question B?"] if q == "qa" else [question], ["m"], ["rule"], [1.0], [None])
                 for q, t, question, text, _ in ROWS if q != "qb"]
    lib = TemplateLibrary(enc.name)
    lib.add(templates, enc.encode([x.text for x in templates]))
    lib.add_exemplars([Exemplar(q, t, question, answer, "m", 1.0) for q, t, question, _, answer in ROWS])
    aug = TemplateAugmenter(lib, lambda texts: enc.encode(list(texts)), lib.embeddings)
    backend = RuleBackend(lambda i, p: True)
    qa = Question("qa", QUERY + " item 0", "t", "GSM8K", "#### 0", "train")
    select_thought(aug, backend, [qa], modes=("exemplars", "both", "templates"), ks=(3,), budget_tokens=None)
    assert len(backend.prompts) == 4  # none + 3 modes
    for p in backend.prompts:
        assert "Answer A" not in p and "alpha beta gamma delta walk" not in p  # own exemplar, own template
        assert "Answer B" not in p  # qb's exemplar reached through the template built partly from qa
    assert any("Answer C" in p for p in backend.prompts)  # the others still come
    # without the cross-fitting rule (a test query's view) the merged template still leads to qb's answer
    shown = aug.render([qa.query], ["t"], ["GSM8K"], ThoughtSettings("exemplars", 3, None), exclude=[{"qa"}])[0]
    assert "Answer B" in shown and "Answer A" not in shown


def test_a_fold_retriever_never_trains_on_its_folds_questions() -> None:
    from thought_logs import planted_logs

    from fusion_lightning.thought.auto import fold_of
    from fusion_lightning.thought.datamodule import TemplateDataModule

    logs = planted_logs(n_per_task=20, tasks=2)
    full = TemplateDataModule(logs=logs, encoder="hashing", objective="similarity")
    full.setup()
    train = {full._ids[r] for r in full._train.rows}
    assert {fold_of(q, 2) for q in train} == {0, 1}
    for f in range(2):
        dm = TemplateDataModule(logs=logs, encoder="hashing", objective="similarity", cross_fit_fold=f)
        dm.setup()
        kept = {dm._ids[r] for r in dm._train.rows}
        assert kept == {q for q in train if fold_of(q, 2) != f}
        left = full.leave_out({q for q in full._ids if fold_of(q, 2) == f})
        assert [left._ids[r] for r in left._train.rows] == [dm._ids[r] for r in dm._train.rows]
    assert {fold_of(q, 2) for q in kept} == {0}  # fold 1's questions: none left in fold 1's training rows
    with pytest.raises(ValueError, match="cross_fit_fold"):
        TemplateDataModule(logs=logs, encoder="hashing", cross_fit_fold=2)


def test_cross_fit_plan_falls_back_to_val_only_and_says_why() -> None:
    from fusion_lightning.callbacks.thought_selection import cross_fit_plan

    assert cross_fit_plan("auto", "val", 2, 30)[0] is True
    assert cross_fit_plan("auto", "val", 2, 0) == (False, "val only (cross-fitting not possible: the log has no "
                                                          "scorable train question)")
    assert cross_fit_plan(False, "val", 2, 30) == (False, "val only (cross_fit: false): val questions")
    with pytest.raises(ValueError, match="folds < 2"):
        cross_fit_plan(True, "val", 1, 30)
    with pytest.raises(ValueError, match="choose auto"):
        cross_fit_plan("sometimes", "val", 2, 30)


def test_cross_fitting_is_decided_after_sampling_from_the_train_questions_used() -> None:
    from thought_logs import planted_logs

    from fusion_lightning.callbacks.thought_selection import selection_plan

    logs = planted_logs(n_per_task=20, tasks=2)  # 8 scorable val questions, 24 train ones
    qs, use, why = selection_plan(logs, "auto", "val", 2, max_questions=20, seed=0)
    assert Counter(q.split for q in qs) == {"val": 8, "train": 12} and use is True and why.startswith("cross-fitted")
    # max_questions filled by the val questions alone: no train question, so no fold retriever - and the
    # record says val only, and why (it said "cross-fitted" and cross_fit: true)
    for room in (8, 5):
        qs, use, why = selection_plan(logs, "auto", "val", 2, max_questions=room, seed=0)
        assert {q.split for q in qs} == {"val"} and len(qs) == room and use is False
        assert why == (f"val only (cross-fitting not possible: max_questions={room} is filled by the "
                       f"{room} val questions alone)")
    with pytest.raises(ValueError, match="cross_fit=true is not possible here: max_questions=8"):
        selection_plan(logs, True, "val", 2, max_questions=8, seed=0)
    qs, use, why = selection_plan(logs, False, "val", 2, max_questions=20, seed=0)
    assert {q.split for q in qs} == {"val"} and use is False and why == "val only (cross_fit: false): val questions"


def test_fold_retrievers_train_as_many_epochs_as_the_best_checkpoint(tmp_path: Path) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from fusion_lightning.callbacks.thought_selection import best_checkpoint_epochs
    from fusion_lightning.checkpointing import checkpoint_plugins

    class BestAtEpoch2(BoringModel):
        def validation_step(self, batch, batch_idx):
            loss = torch.tensor(abs(self.current_epoch - 2.0))
            self.log("val/loss", loss)
            return loss

    # the checkpoint callback as recipes/callbacks/default.yaml has it: best-02.ckpt, no "epoch=" in the name
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best-{epoch:02d}", monitor="val/loss", mode="min",
                           save_top_k=1, auto_insert_metric_name=False)
    trainer = L.Trainer(max_epochs=5, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=False, callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                        plugins=checkpoint_plugins(None))
    trainer.fit(BestAtEpoch2())
    assert Path(ckpt.best_model_path).name == "best-02.ckpt" and trainer.current_epoch == 5
    assert best_checkpoint_epochs(trainer) == 3  # epochs 0, 1 and 2; not the 5 run (patience included)
    ckpt.best_model_path = ""  # no best checkpoint (checkpointing off): the epochs run
    assert best_checkpoint_epochs(trainer) == 5


def test_the_file_merges_models_and_the_pipeline_applies_each_ones_choice(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    hand_library(lib)
    entry = {"budget_tokens": None, "reference": "none", "z": 2.0, "rule": "bonferroni", "questions": 40,
             "retriever": None, "rows": [{"candidate": "none", "mode": "none", "k": 1, "val_perf": 0.2, "gain": 0.0,
                                          "gain_se": 0.0, "prompt_tokens": 10.0, "selected": False}]}
    write_selection({**entry, "mode": "exemplars", "k": 1}, "alpha", lib, tmp_path / "run")
    write_selection({**entry, "mode": "none", "k": 1}, "beta", lib)
    assert read_selection(lib / SELECTION_FILE) == {"alpha": ThoughtSettings("exemplars", 1, None),
                                                     "beta": ThoughtSettings("none", 1, None)}
    md = (lib / "thought_selection.md").read_text()
    assert "## alpha: **exemplars@1**" in md and "## beta: **none**" in md and (tmp_path / "run" / "thought_selection.md").is_file()

    backends = {n: RuleBackend(lambda i, p: True, n) for n in ("alpha", "beta", "gamma")}
    pipe = FusedPipeline(list(backends.values()), augmenter=TemplateAugmenter.load(lib, mode="auto", k=2))
    for n in backends:
        pipe.run([QUERY + " item 1"], tasks=["t"], metrics=["GSM8K"], model=n)
    assert backends["alpha"].prompts[0].count("Solution:") == 1 and "Thought template" not in backends["alpha"].prompts[0]
    assert backends["beta"].prompts[0] == f"{QUERY} item 1\n\n" + backends["beta"].prompts[0].split("\n\n", 1)[1]
    assert "Question:" not in backends["beta"].prompts[0]  # val chose zero-shot for beta
    assert backends["gamma"].prompts[0].count("Thought template:") == 2  # no entry: templates with k
    explicit = FusedPipeline([backends["alpha"]], augmenter=TemplateAugmenter.load(lib, mode="both", k=2))
    explicit.run([QUERY + " item 1"], tasks=["t"], metrics=["GSM8K"], model="alpha")
    assert backends["alpha"].prompts[-1].count("Solution:") == 2  # an explicit mode wins over the file
    with pytest.raises(FileNotFoundError, match="thought.selection"):
        TemplateAugmenter.load(lib, mode="auto", selection=tmp_path / "nope.json")


def hydra(d: dict) -> str:
    """A flat dict as a Hydra override value."""
    def v(x):
        return "null" if x is None else str(x).lower() if isinstance(x, bool) else f"'{x}'"
    return "{" + ",".join(f"{k}:{v(x)}" for k, x in d.items()) + "}"


def _sum_answer(text: str) -> str:
    a, b = re.findall(r"What is (\d+) plus (\d+)", text)[-1]
    return f"#### {int(a) + int(b)}"


def letters(n: int) -> str:
    return "".join("abcdefghij"[int(c)] for c in str(n))  # a tag the summariser does not abstract as a number


def _gsm_log(folder: Path) -> None:
    """GSM8K-style sums: model `solver` right with worked answers, `weak` wrong; train, val, test files."""
    from fusion_lightning.serving import OpenAICompatibleBackend
    from fusion_lightning.serving.make_log import QueryRecord, collect

    def worked(messages):  # a distinct tag per question, so the rule summariser's templates do not all merge
        text = last_user(messages)
        tag = re.findall(r"tag(\w+)", text)[-1]
        return f"Add the two numbers of {tag}. {_sum_answer(text)}"

    solver = FakeOpenAIServer(api_key=None, answer=worked).start()
    weak = FakeOpenAIServer(api_key=None, answer=lambda m: "#### 0").start()
    try:
        backends = [OpenAICompatibleBackend(s.base_url, "m", name=n, cache_dir=None, progress=False)
                    for n, s in (("solver", solver), ("weak", weak))]
        for split, n, start in (("train", 30, 1), ("val", 12, 100), ("test", 4, 200)):
            qs = [QueryRecord(f"{split}{a}", "gsm8k", f"What is {a} plus {a + 1} for tag{letters(a)}?", f"#### {2 * a + 1}", "GSM8K", 0)
                  for a in range(start, start + n)]
            collect(qs, backends, folder / f"calls_{split}.jsonl", progress=False)
    finally:
        solver.stop()
        weak.stop()


def test_thought_auto_recipe_writes_the_choice_that_serve_and_evaluate_apply(tmp_path: Path, monkeypatch) -> None:
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit
    from fusion_lightning.fusion_table import evaluate
    from fusion_lightning.serve import compose, pipeline_config, serve_in_thread

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _gsm_log(tmp_path / "log")

    def needs_an_example(messages):  # the target model: right only with a solved example in the prompt
        text = last_user(messages)
        return _sum_answer(text) if "Solution:" in text else "#### -1"

    with FakeOpenAIServer(api_key=None, answer=needs_an_example) as target:
        backend = {"type": "openai_compatible", "base_url": target.base_url, "model": "m", "name": "target",
                   "cache_dir": None, "progress": False}
        run = tmp_path / "run"
        summary = fit(compose_recipe("thought_auto", [
            "data=llmfusionbench", f"data.path={tmp_path / 'log'}", "encoder=hashing", "model.mode=head",
            "trainer.max_epochs=1", "logger=none", f"run_dir={run}", "callbacks.thought_selection.ks=[1,2]",
            f"callbacks.thought_selection.backend={hydra(backend)}"]))
        chosen = summary["thought_selection"]
        # cross-fitted by default: the 12 val questions and the 30 train ones, each train question through a
        # fold retriever that never trained on it
        assert (chosen["model"], chosen["mode"], chosen["k"], chosen["questions"]) == ("target", "exemplars", 1, 42)
        assert chosen["questions_by_split"] == {"val": 12, "train": 30} and chosen["cross_fit"] is True
        data = json.loads((run / "library" / SELECTION_FILE).read_text())["models"]["target"]
        assert {r["candidate"]: r["val_perf"] for r in data["rows"]} == {
            "none": 0.0, "templates@1": 0.0, "templates@2": 0.0, "exemplars@1": 1.0, "exemplars@2": 1.0,
            "both@1": 1.0, "both@2": 1.0}
        assert data["cross_fit"].startswith("cross-fitted") and "30 train" in (run / "thought_selection.md").read_text()
        # no question, val or train, ever saw its own answer or a template built from it: its tag is in the
        # prompt once (the question itself), never in a shown solution or template
        prompts = [last_user(b["messages"]) for b in target.bodies]
        assert len(prompts) > 42 and any("Solution:" in x for x in prompts)
        for text in prompts:
            tag = re.findall(r"tag(\w+)", text)[-1]
            assert len(re.findall(rf"\btag{tag}\b", text)) == 1, text
        assert summary["artifacts"]["thought_selection_md"] == "thought_selection.md"

        # serve: thought={library} (mode auto by default) applies the file's choice for this backend
        cfg = compose([f"backends=[{hydra(backend)}]", f"thought={{library: '{run / 'library'}'}}"])
        pipe = FusedPipeline.from_config(pipeline_config(cfg))
        server, url = serve_in_thread(pipe, api_key_env=None)
        try:
            body = json.dumps({"model": "target", "messages": [{"role": "user", "content": "What is 7 plus 8 for taghi?"}],
                               "task": "gsm8k", "metric": "GSM8K"}).encode()
            req = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
        finally:
            server.shutdown()
            server.server_close()
        sent = last_user(target.bodies[-1]["messages"])
        assert sent.count("Solution:") == 1 and "Thought template" not in sent
        assert reply["choices"][0]["message"]["content"] == "#### 15"

        # evaluate: the `selected` column is exemplars@1 for this backend
        from fusion_lightning.data.datamodule import load_from_config

        logs = load_from_config({"format": "llmfusionbench", "path": str(tmp_path / "log")})
        ev = evaluate(logs, thought={"backend": backend, "library": str(run / "library"),
                                     "modes": ["zero_shot", "selected"]})
        assert ev.info["thought_selected"] == {"target": "exemplars@1"}
        assert ev.columns["thought:selected"][0].mean() == 1.0 and ev.columns["thought:zero_shot"][0].mean() == 0.0
