"""The `thought_auto` step: after the retriever is tested, choose the thought level's mode and k for
the target model on val, and write the choice where the pipeline reads it.

Candidates: zero-shot (`none`, the reference) and each of `modes` × `ks`. Each one's prompts (the
trained retriever, the library's task filter, the token budget in the target backend's tokenizer; a
val question never sees its own template or answer) go through the target backend, and the answers
are scored by each task's scorer. The winner is router_auto's rule, reused (not copied): the best
mean score among the candidates whose paired gain over zero-shot exceeds z standard errors
(`query.metrics.select_over_reference`), z from `query.auto_selection.selection_z` (`bonferroni`:
the one-sided 5 % test corrected for the comparisons); zero-shot when none does. So the thought
level is off for a model it does not measurably help.

Written: `<library>/thought_selection.json` (the model's entry merged in; `thought.mode: auto`, the
pipeline's, serve's and evaluate's default, applies it) and `thought_selection.md` (the table) there
and in the run dir. `select_thought` is the same step without Lightning (bench/fusion_e2e.py uses it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from fusion_lightning.query.auto_selection import selection_z
from fusion_lightning.query.metrics import select_over_reference
from fusion_lightning.thought.auto import (
    REFERENCE,
    Question,
    candidates,
    measure,
    val_questions,
    write_selection,
)
from fusion_lightning.thought.prompt import DEFAULT_BUDGET_TOKENS, token_counter


def select_thought(augmenter, backend, questions: Sequence[Question], modes: Sequence[str] = ("templates", "exemplars", "both"),
                   ks: Sequence[int] = (1, 3), budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
                   se_factor: float | str = "bonferroni", sampling: Mapping[str, Any] | None = None,
                   retriever: str | None = None) -> dict[str, Any]:
    """Measure every candidate on `questions` through `backend` and choose; returns the selection entry
    (`mode`, `k`, `budget_tokens`, the rule and a row per candidate)."""
    if not questions:
        raise ValueError("thought selection needs val questions with a ground truth and a known metric; there are none")
    start = time.perf_counter()
    settings = candidates(modes, ks, budget_tokens)
    measured = measure(augmenter, backend, questions, settings, sampling, token_counter(backend))
    rewards = {name: m["scores"] for name, m in measured.items()}
    z = selection_z(se_factor, len(rewards))
    winner = select_over_reference(rewards, REFERENCE, z)
    ref = rewards[REFERENCE]
    rows = []
    for name, m in measured.items():
        diff = m["scores"] - ref
        rows.append({"candidate": name, "mode": m["settings"].mode, "k": m["settings"].k,
                     "val_perf": float(m["scores"].mean()), "gain": float(diff.mean()),
                     "gain_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
                     "prompt_tokens": m["prompt_tokens"], "selected": name == winner})
    chosen = measured[winner]["settings"]
    return {"mode": chosen.mode, "k": chosen.k, "budget_tokens": budget_tokens, "reference": REFERENCE, "z": z,
            "rule": str(se_factor), "questions": len(questions), "retriever": retriever,
            "tasks": sorted({q.task for q in questions}), "seconds": round(time.perf_counter() - start, 1),
            "rows": rows}


class ThoughtSelection(L.Callback):
    """After test (the best retriever checkpoint is loaded): `select_thought` on the val split with
    `backend` (the target model: a zoo name or model path, served in-process, or a `build_backend`
    config), written next to the library."""

    def __init__(self, backend: Mapping[str, Any] | str, modes: Sequence[str] = ("templates", "exemplars", "both"),
                 ks: Sequence[int] = (1, 3), budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
                 se_factor: float | str = "bonferroni", max_questions: int | None = 200, split: str = "val",
                 sampling: Mapping[str, Any] | None = None, seed: int = 0, out_dir: str | None = None):
        if not backend:
            raise ValueError("callbacks.thought_selection.backend: the target model is required (a zoo name or "
                             "model path, or a backend config such as {type: openai_compatible, base_url: ..., model: ...})")
        if isinstance(backend, str):
            backend = {"type": "local", "model": backend, "progress": False}
        self.backend_cfg, self.modes, self.ks = dict(backend), list(modes), [int(k) for k in ks]
        self.budget_tokens, self.se_factor, self.max_questions = budget_tokens, se_factor, max_questions
        self.split, self.sampling, self.seed, self.out_dir = split, dict(sampling or {}), seed, out_dir
        self.artifacts: dict[str, str] = {}
        self.summary_fields: dict[str, Any] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "encode_templates"):
            return
        if trainer.fast_dev_run:
            print("thought selection skipped under fast_dev_run (a smoke run)")
            return
        from fusion_lightning.serving import build_backend
        from fusion_lightning.thought.prompt import TemplateAugmenter

        dm = trainer.datamodule
        lib = dm.library
        augmenter = TemplateAugmenter(lib, pl_module.encode_queries, pl_module.encode_templates(dm.index_texts),
                                      task_filter=dm.task_filter, budget_tokens=self.budget_tokens)
        questions = val_questions(dm.logs, self.split, self.max_questions, self.seed)
        backend = build_backend(self.backend_cfg)
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        entry = select_thought(augmenter, backend, questions, self.modes, self.ks, self.budget_tokens, self.se_factor,
                               self.sampling, retriever=ckpt)
        if dm.library_dir is None:
            raise ValueError("thought selection writes next to the library: set datamodule.library_dir")
        out = Path(self.out_dir or trainer.default_root_dir)
        paths = write_selection(entry, backend.name, dm.library_dir, out)
        self.artifacts = {"thought_selection_md": paths["thought_selection_md"]}  # the run dir's copy
        self.summary_fields = {"thought_selection": {"model": backend.name, "mode": entry["mode"], "k": entry["k"],
                                                     "questions": entry["questions"],
                                                     "file": paths["thought_selection_json"]}}
        chosen = "none (zero-shot)" if entry["mode"] == "none" else f"{entry['mode']}@{entry['k']}"
        print(f"thought selection for {backend.name}: {chosen} over {entry['questions']} {self.split} questions "
              f"({entry['seconds']} s)")
