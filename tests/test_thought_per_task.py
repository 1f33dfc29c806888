"""Thought level, per-task exceptions to the selection (issue 28): one mode for every task hides a task
it harms (agentverse-logicgrid −0.5 under `both` in the real-model run), so the selection also decides
per task — a task's own winner where its questions alone pass the paired test, zero-shot where the
overall choice is below zero-shot on its questions, else the overall choice — and the pipeline applies
each query's task's choice."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from test_thought_exemplars import QUERY, hand_library
from test_thought_selection import RuleBackend, augmenter

from fusion_lightning.callbacks.thought_selection import per_task_choices, select_thought
from fusion_lightning.query.auto_selection import selection_z
from fusion_lightning.serving.pipeline import FusedPipeline
from fusion_lightning.thought.auto import Question, write_selection
from fusion_lightning.thought.prompt import (
    SELECTION_FILE,
    TemplateAugmenter,
    ThoughtSettings,
    read_selection,
    read_task_selection,
)


def task_of(i: int) -> str:
    return "t" if i < 40 else "other" if i < 80 else "bare"  # "bare": no template of its task in the library


def questions() -> list[Question]:
    return [Question(f"v{i:03d}", f"{QUERY} item {i}", task_of(i), "GSM8K", f"#### {i}") for i in range(100)]


def right(i: int, prompt: str) -> bool:
    """A solved example lifts task t (0.2 -> 0.8), misleads task other (0.4 -> 0.2); bare is a coin."""
    solved = "Solution:" in prompt
    if task_of(i) == "t":
        return (i % 5 != 0) == solved
    if task_of(i) == "other":
        return i % 5 == 1 or (i % 5 == 2 and not solved)
    return i % 2 == 0


def test_per_task_choices_keep_the_mode_where_it_helps_and_drop_it_where_it_harms() -> None:
    entry = select_thought(augmenter(), RuleBackend(right), questions(), ks=(1,), budget_tokens=None)
    # overall: exemplars@1 gains +0.16 over 100 questions (t +0.6, other -0.2, bare 0), past z = 2.13 SE
    assert (entry["mode"], entry["k"]) == ("exemplars", 1)
    per = entry["per_task"]
    assert per["t"]["candidate"] == "exemplars@1" and per["t"]["why"] == "the overall choice"
    assert per["t"]["gain"] == pytest.approx(0.6) and per["t"]["questions"] == 40
    assert per["other"]["candidate"] == "none" and "below zero-shot" in per["other"]["why"]  # -0.2 ± 0.064
    assert per["other"]["overall_gain"] == pytest.approx(-0.2) and per["other"]["gain"] == 0.0
    assert per["bare"]["candidate"] == "exemplars@1" and per["bare"]["why"] == "the overall choice"
    # a task's own winner is tested with Bonferroni over candidates x tasks (3 x 3 comparisons)
    assert entry["z_task"] == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 9))
    assert "per_task" not in select_thought(augmenter(), RuleBackend(right), questions(), ks=(1,),
                                            budget_tokens=None, per_task=False)


def test_a_task_alone_cannot_overturn_zero_shot_on_noise() -> None:
    # overall nothing helps; on task t exemplars gain 3 of 40 (+0.075): under the task's own bar -> zero-shot there
    def noisy(i: int, prompt: str) -> bool:
        return i % 2 == 0 or (i < 6 and "Solution:" in prompt and "Thought template" not in prompt)

    entry = select_thought(augmenter(), RuleBackend(noisy), questions(), ks=(1,), budget_tokens=None)
    assert entry["mode"] == "none"
    assert {t: c["candidate"] for t, c in entry["per_task"].items()} == {"bare": "none", "other": "none", "t": "none"}


def settings(*names: str) -> dict[str, ThoughtSettings]:
    return {n: ThoughtSettings("none", 1) if n == "none" else ThoughtSettings(n.split("@")[0], int(n.split("@")[1]))
            for n in names}


def test_the_per_task_rule_on_planted_scores() -> None:
    """Each branch of `per_task_choices` on hand-made scores of 40 questions per task."""
    coin = np.arange(40) % 2 == 0  # zero-shot: right on every other question
    lift5 = coin | np.isin(np.arange(40), [1, 3, 5, 7, 9])  # 5 more right: +0.125 ± 0.053 (z 2.36)
    names = settings("none", "templates@3", "exemplars@3")
    z_task = selection_z("bonferroni", 3 * 2 + 1)  # 2 candidates x 3 tasks: 2.64
    # the task's own bar: 2.36 SE is past the overall z (2.13) but not z_task -> zero-shot stays
    r = {"none": coin, "templates@3": coin, "exemplars@3": lift5}
    tasks = np.array(["t"] * 40)
    got = per_task_choices(r, tasks, "none", z_task, names)["t"]
    assert got["candidate"] == "none"
    # the strongest mode is reported beside the choice: how far it was from the bar
    assert got["best"] == "exemplars@3" and got["best_gain"] == pytest.approx(0.125)
    assert got["best_gain"] / got["best_gain_se"] == pytest.approx(2.36, abs=0.01)
    assert per_task_choices(r, tasks, "none", 2.0, names)["t"]["candidate"] == "exemplars@3"  # a lower bar: switches
    # a task's own winner must also beat the overall choice there: templates (the overall choice) +0.25 ± 0.133
    # (+20 -10, not past z 2.0), exemplars +0.125 ± 0.053 (past it) -> templates stays
    tpl = np.arange(40) % 2 == 1
    tpl[20:] = True
    r2 = {"none": coin, "templates@3": tpl, "exemplars@3": lift5}
    got = per_task_choices(r2, tasks, "templates@3", 2.0, names)["t"]
    assert got["candidate"] == "templates@3" and got["why"] == "the overall choice"
    assert got["gain"] == pytest.approx(0.25) and got["gain"] < 2.0 * got["gain_se"]
    # harm: the overall choice 1 SE below zero-shot drops to zero-shot; within 1 SE it stays
    hurt = coin & ~np.isin(np.arange(40), [0, 2, 4, 6, 8, 10])  # -6: -0.15 ± 0.057
    mild = (coin & ~np.isin(np.arange(40), [0, 2])) | np.isin(np.arange(40), [1])  # -2 +1: -0.025 ± 0.044
    for scores, want in ((hurt, "none"), (mild, "exemplars@3")):
        got = per_task_choices({"none": coin, "templates@3": coin, "exemplars@3": scores}, tasks, "exemplars@3",
                               z_task, names)["t"]
        assert got["candidate"] == want, got
    # a task of 7 questions keeps the overall choice whatever its scores (7 of 7 wins for templates)
    few = np.array(["few"] * 7)
    got = per_task_choices({"none": np.zeros(7), "templates@3": np.ones(7), "exemplars@3": np.zeros(7)}, few,
                           "exemplars@3", 0.5, names)["few"]
    assert got["candidate"] == "exemplars@3" and got["why"].startswith("too few questions")
    one = per_task_choices({"none": np.zeros(1), "templates@3": np.ones(1), "exemplars@3": np.zeros(1)},
                           np.array(["solo"]), "none", 0.5, names)["solo"]
    assert one["candidate"] == "none" and one["gain_se"] is None


def test_the_pipeline_applies_each_querys_task_choice(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    hand_library(lib)
    entry = select_thought(augmenter(), RuleBackend(right), questions(), ks=(1,), budget_tokens=None)
    write_selection(entry, "alpha", lib)
    # beta: zero-shot overall, exemplars on task t only
    write_selection({**entry, "mode": "none", "k": 1,
                     "per_task": {"t": {**entry["per_task"]["t"]}, "other": {**entry["per_task"]["other"]}}}, "beta", lib)
    assert read_selection(lib / SELECTION_FILE) == {"alpha": ThoughtSettings("exemplars", 1, None),
                                                    "beta": ThoughtSettings("none", 1, None)}
    # only the exceptions to each model's overall choice are read
    assert read_task_selection(lib / SELECTION_FILE) == {"alpha": {"other": ThoughtSettings("none", 1, None)},
                                                         "beta": {"t": ThoughtSettings("exemplars", 1, None)}}
    md = (lib / "thought_selection.md").read_text()
    assert "| other | 40 | none |" in md and "below zero-shot" in md
    assert "| t | 40 | exemplars@1 | +0.6000 ± " in md and "| exemplars@1 +0.6000 ± " in md  # strongest mode column

    aug = TemplateAugmenter.load(lib, mode="auto", k=2)
    assert aug.describe("alpha") == "exemplars@1 (none on other)" and aug.describe("beta") == "none (exemplars@1 on t)"
    backends = {n: RuleBackend(lambda i, p: True, n) for n in ("alpha", "beta")}
    pipe = FusedPipeline(list(backends.values()), augmenter=aug)
    for n, b in backends.items():
        pipe.run([f"{QUERY} item 1", f"{QUERY} item 41", f"{QUERY} item 2"], tasks=["t", "other", None],
                 metrics=["GSM8K"] * 3, model=n)
        assert len(b.prompts) == 3
    alpha, beta = backends["alpha"].prompts, backends["beta"].prompts
    assert "Solution:" in alpha[0] and "Question:" not in alpha[1] and "Solution:" in alpha[2]  # no task: overall
    assert "Solution:" in beta[0] and "Question:" not in beta[1] and "Question:" not in beta[2]
    # a chat message is rewritten only where its query's own settings are not none: beta's exception on t
    # does not touch a conversation of another task or of none
    chat = [{"role": "user", "content": "hello there"}]
    plans = pipe.plan(conversations=[chat, chat, chat], tasks=[None, "other", "t"], models=["beta"] * 3)
    assert [p.prompt[-1]["content"] == "hello there" for p in plans] == [True, True, False]
    # an explicit mode applies to every task, exceptions aside
    explicit = FusedPipeline([backends["alpha"]], augmenter=TemplateAugmenter.load(lib, mode="templates", k=1))
    explicit.run([f"{QUERY} item 41"], tasks=["other"], metrics=["GSM8K"], model="alpha")
    assert "Thought template" in backends["alpha"].prompts[-1]
