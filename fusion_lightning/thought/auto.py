"""The thought level's choice per target model: which mode (`none`, `templates`, `exemplars`, `both`)
and how many demonstrations (k) help the model that will answer.

This module measures (every candidate's prompts through the target backend on the selection questions
— val, plus train when cross-fitted: `selection_questions`, `fold_of` — each scored by its task's
scorer, a question never shown its own answer nor anything built from it) and keeps the record; the decision (the paired test `router_auto` uses:
`query.metrics.select_over_reference` at `query.auto_selection.selection_z`) is made by the
`thought_auto` recipe's callback (`fusion_lightning.callbacks.thought_selection`), which may import
the query level where this package may not.

The record is `thought_selection.json` next to the library, one entry per target model (its backend
name), merged under a file lock so several models can be selected into one library:

    {"version": 1, "models": {"gemma-3-270m": {"mode": "exemplars", "k": 3, "budget_tokens": 1024,
        "reference": "none", "z": 2.39, "questions": 40, "questions_by_split": {"val": 12, "train": 28},
        "cross_fit": "cross-fitted: ...", "retriever": "...", "rows": [...],
        "per_task": {"agentverse-logicgrid": {"mode": "none", "k": 1, "why": "...", ...}, ...}}}}

`thought.mode: auto` (the pipeline's, `serve`'s and `evaluate`'s default) applies it, a task's own choice to
its queries where `per_task` holds one that differs (a query without a task gets the overall choice); `thought_selection.md`
beside it is the table people read (every model's candidates, like router_auto's `selection.md`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.io import atomic_write, file_lock
from fusion_lightning.thought.prompt import MODES, SELECTION_FILE, ThoughtSettings, TokenCounter

SELECTION_MD = "thought_selection.md"
REFERENCE = "none"


@dataclass(frozen=True)
class Question:
    query_id: str
    query: str
    task: str
    metric: str
    ground_truth: str
    split: str = "val"


def _sample(qs: list[Question], n: int | None, seed: int) -> list[Question]:
    """A seeded sample of n questions spread over tasks (round-robin over each task's shuffled questions)."""
    if n is None or len(qs) <= n:
        return qs
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[Question]] = {}
    for q in qs:
        by_task.setdefault(q.task, []).append(q)
    queues = {t: [v[i] for i in rng.permutation(len(v))] for t, v in sorted(by_task.items())}
    picked: list[Question] = []
    while len(picked) < n:
        for t in queues:
            if queues[t] and len(picked) < n:
                picked.append(queues[t].pop(0))
    return sorted(picked, key=lambda q: q.query_id)


def selection_questions(logs, splits: Sequence[str] = ("val",), max_questions: int | None = None,
                        seed: int = 0) -> list[Question]:
    """The scorable questions (ground truth and a known metric) of `splits`, each tagged with its split.
    With `max_questions`, the earlier splits first: all of the first one's (a seeded sample over tasks if
    they alone are more), then the next ones' fill what is left, again spread over tasks."""
    from fusion_lightning.scoring import resolve_metric

    out: list[Question] = []
    for split in splits:
        rows = [r for r in logs.select(split).query_table().to_pylist()
                if r["ground_truth"] and r["metric"] and resolve_metric(r["metric"]) is not None]
        rows.sort(key=lambda r: r["query_id"])
        qs = [Question(r["query_id"], r["query"], r["task"], r["metric"], r["ground_truth"], split) for r in rows]
        left = None if max_questions is None else max(0, max_questions - len(out))
        out += _sample(qs, left, seed)
    return out


def val_questions(logs, split: str = "val", max_questions: int | None = None, seed: int = 0) -> list[Question]:
    """The scorable questions of `split`; with `max_questions`, a seeded sample spread over tasks."""
    return selection_questions(logs, (split,), max_questions, seed)


def fold_of(query_id: str, folds: int, seed: int = 0) -> int:
    """The cross-fitting fold of a train question: a stable hash of its id (the same in every process and
    run, so the retriever fit without fold f and the selection scoring fold f agree)."""
    return int(hashlib.sha1(f"{seed}:{query_id}".encode()).hexdigest()[:8], 16) % folds


def candidates(modes: Sequence[str] = ("templates", "exemplars", "both"), ks: Sequence[int] = (1, 3),
               budget_tokens: int | None = 1024) -> list[ThoughtSettings]:
    """The zero-shot reference first, then each mode × k (in the order given)."""
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"thought selection modes {bad} unknown; choose from {list(MODES)}")
    out = [ThoughtSettings("none", 1, budget_tokens)]
    out += [ThoughtSettings(m, int(k), budget_tokens) for m in modes if m != "none" for k in ks]
    return out


def measure(augmenter, backend, questions: Sequence[Question], settings: Sequence[ThoughtSettings],
            sampling: Mapping[str, Any] | None = None, count_tokens: TokenCounter | None = None,
            exclude_own: bool = True, augmenter_for: Callable[[Question], Any] | None = None
            ) -> dict[str, dict[str, Any]]:
    """Every candidate's per-question score (0 for a failed call) and mean prompt length, through `backend`.
    A prompt several candidates share is generated once. `exclude_own`: a question never sees its own
    exemplar, nor any template built (even in part) from its answers, which also take no part in the
    ranking (the library may hold the question's answers: the val split's, or a train question's when
    the selection is cross-fitted). `augmenter_for`: the augmenter (retriever) that serves each question,
    default `augmenter` for all (cross-fitting: a retriever that never trained on it)."""
    from fusion_lightning.scoring import score

    route = augmenter_for or (lambda q: augmenter)
    groups: dict[int, tuple[Any, list[int]]] = {}
    for i, q in enumerate(questions):
        a = route(q)
        groups.setdefault(id(a), (a, []))[1].append(i)
    prompts: dict[str, list[str]] = {s.name: [""] * len(questions) for s in settings}
    for a, idx in groups.values():
        sub = [questions[i] for i in idx]
        qs, ts, ms = [q.query for q in sub], [q.task for q in sub], [q.metric for q in sub]
        exclude = [{q.query_id} for q in sub] if exclude_own else None
        for s in settings:
            for i, p in zip(idx, a.render(qs, ts, ms, s, count_tokens, exclude, exclude_built=exclude_own),
                            strict=True):
                prompts[s.name][i] = p
    unique = list(dict.fromkeys(p for ps in prompts.values() for p in ps))
    gens = dict(zip(unique, backend.generate(unique, **dict(sampling or {})), strict=True))
    count = count_tokens or augmenter.count_tokens
    out = {}
    for s in settings:
        ps = prompts[s.name]
        scores = np.array([0.0 if gens[p].error else float(score(gens[p].text, q.ground_truth, q.metric))
                           for p, q in zip(ps, questions, strict=True)])
        out[s.name] = {"settings": s, "scores": scores, "prompt_tokens": float(np.mean([count(p) for p in ps]))}
    return out


def write_selection(entry: Mapping[str, Any], model: str, library_dir: str | Path,
                    out_dir: str | Path | None = None) -> dict[str, str]:
    """Merge one model's choice into `<library>/thought_selection.json` (locked: other models' entries stay)
    and write `thought_selection.md` beside it (and a copy in `out_dir`)."""
    d = Path(library_dir)
    path = d / SELECTION_FILE
    with file_lock(d / ".selection.lock"):
        data = json.loads(path.read_text()) if path.is_file() else {"version": 1, "models": {}}
        data["models"][model] = {**entry, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write(path, json.dumps(data, indent=1, default=float))
        md = selection_markdown(data)
        atomic_write(d / SELECTION_MD, md)
    paths = {"thought_selection_json": str(path), "thought_selection_md": str(d / SELECTION_MD)}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out_dir) / SELECTION_MD, md)
        paths["thought_selection_md"] = str(Path(out_dir) / SELECTION_MD)
    return paths


def _gain(gain: float, se: float | None) -> str:
    return f"{gain:+.4f} ± {'—' if se is None else f'{se:.4f}'}"


def selection_markdown(data: Mapping[str, Any]) -> str:
    lines = ["# Thought-level selection (per target model)", "",
             "Each candidate's prompts go through the target model on the selection questions: val, plus train when "
             "cross-fitted (a train question is answered through a retriever that never trained on it). A question "
             "never sees its own answer, nor a template built from it. Rule: the best mean score among the candidates "
             "whose paired gain over zero-shot (`none`) exceeds z standard errors (router_auto's test); zero-shot "
             "when none does."]
    for model, e in sorted(data["models"].items()):
        chosen = "none" if e["mode"] == "none" else f"{e['mode']}@{e['k']}"
        by = e.get("questions_by_split") or {"val": e["questions"]}
        splits = sorted(by)
        lines += ["", f"## {model}: **{chosen}**", "",
                  f"{e['questions']} questions ({', '.join(f'{by[s]} {s}' for s in splits)}; "
                  f"{e.get('cross_fit') or 'val only'}), z = {e['z']:.2f} ({e.get('rule', '')}), "
                  f"budget {e.get('budget_tokens')} tokens, retriever: {e.get('retriever') or 'frozen encoder'}.", "",
                  "| candidate | mode | k | score | " + "".join(f"{s} score | " for s in splits)
                  + "gain over zero-shot (± SE) | prompt tokens |",
                  "|---|---|---:|---:|" + "---:|" * len(splits) + "---:|---:|"]
        for r in sorted(e["rows"], key=lambda r: -r["val_perf"]):
            name = f"**{r['candidate']}**" if r["selected"] else r["candidate"]
            per = r.get("perf_by_split") or {splits[0]: r["val_perf"]}
            lines.append(f"| {name} | {r['mode']} | {r['k'] if r['mode'] != 'none' else '—'} | {r['val_perf']:.4f} | "
                         + "".join(f"{per[s]:.4f} | " if s in per else "— | " for s in splits)
                         + f"{_gain(r['gain'], r['gain_se'])} | {r['prompt_tokens']:.0f} |")
        if e.get("per_task"):
            lines += ["", f"Per task (a task's own winner needs z_task = {e.get('z_task', float('nan')):.2f} and to beat "
                      "the overall choice there; zero-shot where the overall choice is more than 1 SE below it on the "
                      "task's questions; tasks with fewer than 8 questions keep the overall choice):", "",
                      "| task | questions | choice | gain over zero-shot (± SE) | overall choice's gain | "
                      "strongest mode here (gain ± SE) | why |",
                      "|---|---:|---|---:|---:|---|---|"]
            for t, c in sorted(e["per_task"].items()):
                best = "—" if not c.get("best") else f"{c['best']} {_gain(c['best_gain'], c['best_gain_se'])}"
                lines.append(f"| {t} | {c['questions']} | {c['candidate']} | {_gain(c['gain'], c['gain_se'])} | "
                             f"{c['overall_gain']:+.4f} | {best} | {c['why']} |")
    return "\n".join(lines) + "\n"
