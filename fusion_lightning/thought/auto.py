"""The thought level's choice per target model, measured on val: which mode (`none`, `templates`,
`exemplars`, `both`) and how many demonstrations (k) help the model that will answer.

This module measures (every candidate's prompts through the target backend on val questions, each
scored by its task's scorer) and keeps the record; the decision (the paired test `router_auto` uses:
`query.metrics.select_over_reference` at `query.auto_selection.selection_z`) is made by the
`thought_auto` recipe's callback (`fusion_lightning.callbacks.thought_selection`), which may import
the query level where this package may not.

The record is `thought_selection.json` next to the library, one entry per target model (its backend
name), merged under a file lock so several models can be selected into one library:

    {"version": 1, "models": {"gemma-3-270m": {"mode": "exemplars", "k": 3, "budget_tokens": 1024,
        "reference": "none", "z": 2.39, "questions": 40, "retriever": "...", "rows": [...]}}}

`thought.mode: auto` (the pipeline's, `serve`'s and `evaluate`'s default) applies it; `thought_selection.md`
beside it is the table people read (every model's candidates, like router_auto's `selection.md`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
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


def val_questions(logs, split: str = "val", max_questions: int | None = None, seed: int = 0) -> list[Question]:
    """The scorable questions of `split` (ground truth and a known metric); with `max_questions`, a seeded
    sample spread over tasks (round-robin over each task's shuffled questions)."""
    from fusion_lightning.scoring import resolve_metric

    rows = [r for r in logs.select(split).query_table().to_pylist()
            if r["ground_truth"] and r["metric"] and resolve_metric(r["metric"]) is not None]
    rows.sort(key=lambda r: r["query_id"])
    qs = [Question(r["query_id"], r["query"], r["task"], r["metric"], r["ground_truth"]) for r in rows]
    if max_questions is None or len(qs) <= max_questions:
        return qs
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[Question]] = {}
    for q in qs:
        by_task.setdefault(q.task, []).append(q)
    queues = {t: [v[i] for i in rng.permutation(len(v))] for t, v in sorted(by_task.items())}
    picked: list[Question] = []
    while len(picked) < max_questions:
        for t in queues:
            if queues[t] and len(picked) < max_questions:
                picked.append(queues[t].pop(0))
    return sorted(picked, key=lambda q: q.query_id)


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
            exclude_own: bool = True) -> dict[str, dict[str, Any]]:
    """Every candidate's per-question score (0 for a failed call) and mean prompt length, through `backend`.
    A prompt several candidates share is generated once. `exclude_own`: a question never sees its own
    template or exemplar (the library may hold the val split's answers)."""
    from fusion_lightning.scoring import score

    qs, ts, ms = [q.query for q in questions], [q.task for q in questions], [q.metric for q in questions]
    exclude = [{q.query_id} for q in questions] if exclude_own else None
    prompts = {s.name: augmenter.render(qs, ts, ms, s, count_tokens, exclude) for s in settings}
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


def selection_markdown(data: Mapping[str, Any]) -> str:
    lines = ["# Thought-level selection (per target model, on val)", "",
             "Each candidate's prompts go through the target model on the val questions (a question never sees "
             "its own template or answer). Rule: the best mean score among the candidates whose paired gain over "
             "zero-shot (`none`) exceeds z standard errors (router_auto's test); zero-shot when none does."]
    for model, e in sorted(data["models"].items()):
        chosen = "none" if e["mode"] == "none" else f"{e['mode']}@{e['k']}"
        lines += ["", f"## {model}: **{chosen}**", "",
                  f"{e['questions']} val questions, z = {e['z']:.2f} ({e.get('rule', '')}), "
                  f"budget {e.get('budget_tokens')} tokens, retriever: {e.get('retriever') or 'frozen encoder'}.", "",
                  "| candidate | mode | k | val score | gain over zero-shot (± SE) | prompt tokens |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in sorted(e["rows"], key=lambda r: -r["val_perf"]):
            name = f"**{r['candidate']}**" if r["selected"] else r["candidate"]
            lines.append(f"| {name} | {r['mode']} | {r['k'] if r['mode'] != 'none' else '—'} | {r['val_perf']:.4f} | "
                         f"{r['gain']:+.4f} ± {r['gain_se']:.4f} | {r['prompt_tokens']:.0f} |")
    return "\n".join(lines) + "\n"
