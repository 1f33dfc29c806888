"""The `thought_auto` step: after the retriever is tested, choose the thought level's mode and k for
the target model, and write the choice where the pipeline reads it.

Candidates: zero-shot (`none`, the reference) and each of `modes` × `ks`. Each one's prompts (the
trained retriever, the library's task filter, the token budget in the target backend's tokenizer)
go through the target backend, and the answers are scored by each task's scorer. The winner is
router_auto's rule, reused (not copied): the best mean score among the candidates whose paired gain
over zero-shot exceeds z standard errors (`query.metrics.select_over_reference`), z from
`query.auto_selection.selection_z` (`bonferroni`: the one-sided 5 % test corrected for the
comparisons); zero-shot when none does. So the thought level is off for a model it does not
measurably help.

Which questions (`cross_fit`): a val split of a few dozen questions cannot show a gain of 0.1-0.2
past that bar, so by default (`auto`) the selection is **cross-fitted**: the val questions plus the
train questions, each train question scored leave-own-out — never shown its own exemplar, nor any
template built (even in part) from its answers, which also take no part in the ranking — and with a
retriever that never trained on it: the train questions are split into `folds` folds
(`thought.auto.fold_of`) and fold f is answered through a retriever fitted, like the main one (same
hyper-parameters, as many epochs as its best checkpoint), on the other folds' rows. The paired test
then runs over train + val. `auto` falls back to val only, saying why, where cross-fitting is not
possible (no scorable train question, `folds` < 2, `split` is train, or `max_questions` filled by
the val questions alone); `cross_fit: false` is the val-only rule.

Per task (`per_task`, default true): one mode for every task can hide a task it harms, so the same
scores also give each task a choice (`per_task_choices`), for tasks with at least 8 selection
questions: its own winner where its questions alone pass the paired test (with `bonferroni`, corrected
for candidates × tasks) and it beats the overall choice there, zero-shot where the overall choice is
more than one SE below zero-shot on its questions, else the overall choice. `thought.mode: auto` applies a
query's task's choice; a query without a task gets the overall one.

Written: `<library>/thought_selection.json` (the model's entry merged in; `thought.mode: auto`, the
pipeline's, serve's and evaluate's default, applies it) and `thought_selection.md` (the table) there
and in the run dir. `select_thought` is the same step without Lightning (bench/fusion_e2e.py uses it).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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
    fold_of,
    measure,
    selection_questions,
    write_selection,
)
from fusion_lightning.thought.prompt import DEFAULT_BUDGET_TOKENS, per_task_exceptions, token_counter


def select_thought(augmenter, backend, questions: Sequence[Question], modes: Sequence[str] = ("templates", "exemplars", "both"),
                   ks: Sequence[int] = (1, 3), budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
                   se_factor: float | str = "bonferroni", sampling: Mapping[str, Any] | None = None,
                   retriever: str | None = None, augmenter_for: Callable[[Question], Any] | None = None,
                   cross_fit: str | None = None, per_task: bool = True) -> dict[str, Any]:
    """Measure every candidate on `questions` through `backend` and choose; returns the selection entry
    (`mode`, `k`, `budget_tokens`, the rule and a row per candidate). `augmenter_for`: the augmenter that
    serves each question (cross-fitting: a fold's retriever for its train questions), default `augmenter`;
    `cross_fit`: how the questions were cross-fitted, for the record (None: val only); `per_task`: also a
    choice per task (`per_task_choices`), under `per_task` in the entry."""
    if not questions:
        raise ValueError("thought selection needs val questions with a ground truth and a known metric; there are none")
    start = time.perf_counter()
    settings = candidates(modes, ks, budget_tokens)
    measured = measure(augmenter, backend, questions, settings, sampling, token_counter(backend),
                       augmenter_for=augmenter_for)
    rewards = {name: m["scores"] for name, m in measured.items()}
    z = selection_z(se_factor, len(rewards))
    winner = select_over_reference(rewards, REFERENCE, z)
    ref = rewards[REFERENCE]
    splits = np.array([q.split for q in questions])
    rows = []
    for name, m in measured.items():
        gain, se = _paired_gain(m["scores"], ref)
        rows.append({"candidate": name, "mode": m["settings"].mode, "k": m["settings"].k,
                     "val_perf": float(m["scores"].mean()), "gain": gain, "gain_se": se if se is not None else 0.0,
                     "perf_by_split": {s: float(m["scores"][splits == s].mean()) for s in sorted(set(splits.tolist()))},
                     "prompt_tokens": m["prompt_tokens"], "selected": name == winner})
    chosen = measured[winner]["settings"]
    entry = {"mode": chosen.mode, "k": chosen.k, "budget_tokens": budget_tokens, "reference": REFERENCE, "z": z,
             "rule": str(se_factor), "questions": len(questions), "questions_by_split": dict(Counter(splits.tolist())),
             "cross_fit": cross_fit, "retriever": retriever, "tasks": sorted({q.task for q in questions}),
             "rows": rows}
    if per_task:
        tasks = np.array([q.task for q in questions])
        z_task = selection_z(se_factor, (len(rewards) - 1) * len(set(tasks.tolist())) + 1)
        entry["per_task"] = per_task_choices(rewards, tasks, winner, z_task,
                                             {n: m["settings"] for n, m in measured.items()})
        entry["z_task"] = z_task
    return entry | {"seconds": round(time.perf_counter() - start, 1)}


MIN_TASK_QUESTIONS = 8  # fewer: a task keeps the overall choice (8 of 8 paired wins is p = 0.004 by the sign test)
HARM_Z = 1.0  # the overall choice is dropped for a task where it is this many SEs below zero-shot


def _paired_gain(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error of a − b over paired questions (SE None for a single question)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), (float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None)


def per_task_choices(rewards: Mapping[str, np.ndarray], tasks: np.ndarray, overall: str, z_task: float,
                     settings: Mapping[str, Any], min_questions: int = MIN_TASK_QUESTIONS,
                     harm_z: float = HARM_Z) -> dict[str, dict[str, Any]]:
    """task -> its choice, why, and the paired gain over zero-shot on its questions. One mode for every task
    hides a task it harms (a demonstration that misleads one task's format), and a task's own questions are
    few, so the overall choice stays unless the task's questions say otherwise, in the safe direction more
    readily than in the other:
    - a task with fewer than `min_questions` questions keeps the overall choice (a paired SE over a
      handful of questions, or none differing, is no evidence);
    - a candidate whose gain over zero-shot on the task's questions passes the paired test at `z_task`
      (with `se_factor: bonferroni`, corrected for candidates × tasks), and whose mean there beats the
      overall choice's, is the task's own choice;
    - else, where the overall choice is more than `harm_z` standard errors below zero-shot on the task's
      questions, zero-shot;
    - else the overall choice."""
    ref = np.asarray(rewards[REFERENCE], float)
    out: dict[str, dict[str, Any]] = {}
    for t in sorted(set(tasks.tolist())):
        m = tasks == t
        n = int(m.sum())
        task_rewards = {name: np.asarray(r, float)[m] for name, r in rewards.items()}
        g, se = _paired_gain(task_rewards[overall], ref[m])
        own = select_over_reference(task_rewards, REFERENCE, z_task) if n >= min_questions else REFERENCE
        if n < min_questions:
            pick, why = overall, f"too few questions (< {min_questions}): the overall choice"
        elif own not in (REFERENCE, overall) and task_rewards[own].mean() > task_rewards[overall].mean():
            og, ose = _paired_gain(task_rewards[own], ref[m])
            pick, why = own, f"its own paired test: gain {og:+.3f} ± {ose:.3f}, past z_task = {z_task:.2f} SE"
        elif overall != REFERENCE and se is not None and g < -harm_z * se:
            pick, why = REFERENCE, (f"the overall choice is below zero-shot on this task's questions by more than "
                                    f"{harm_z:g} SE ({g:+.3f} ± {se:.3f})")
        else:
            pick, why = overall, "the overall choice"
        pg, pse = _paired_gain(task_rewards[pick], ref[m])
        # the strongest mode on the task, chosen or not: how far the task's questions were from a choice of
        # its own (the bar is z_task standard errors)
        best = max((c for c in task_rewards if c != REFERENCE), key=lambda c: task_rewards[c].mean(), default=None)
        bg, bse = _paired_gain(task_rewards[best], ref[m]) if best is not None else (0.0, None)
        out[t] = {"mode": settings[pick].mode, "k": settings[pick].k, "candidate": pick, "questions": n,
                  "gain": pg, "gain_se": pse, "overall_gain": g, "why": why,
                  "best": best, "best_gain": bg, "best_gain_se": bse}
    return out


def cross_fit_plan(cross_fit: bool | str, split: str, folds: int, train_questions: int,
                   blocked: str = "") -> tuple[bool, str]:
    """(cross-fit or not, why): `auto` cross-fits wherever it can, `true` must, `false` never does.
    `blocked`: another reason it cannot (`selection_plan`: no train question was sampled)."""
    if cross_fit not in ("auto", True, False):
        raise ValueError(f"thought selection cross_fit={cross_fit!r}: choose auto, true or false")
    if cross_fit is False:
        return False, f"val only (cross_fit: false): {split} questions"
    why = ("folds < 2" if folds < 2 else f"the selection split is {split!r}" if split == "train"
           else "the log has no scorable train question" if not train_questions else blocked)
    if why and cross_fit is True:
        raise ValueError(f"thought selection cross_fit=true is not possible here: {why}")
    if why:
        return False, f"val only (cross-fitting not possible: {why})"
    return True, (f"cross-fitted: {split} + train questions, each train question leave-own-out and through a "
                  f"retriever of {folds} folds that never trained on it")


def selection_plan(logs, cross_fit: bool | str, split: str, folds: int, max_questions: int | None,
                   seed: int) -> tuple[list[Question], bool, str]:
    """The selection's questions and (cross-fit or not, why), decided after sampling: cross-fitted only
    where a train question was drawn, so a `max_questions` the `split` questions fill alone is val only
    (`auto`, saying so) or an error (`true`)."""
    train_qs = selection_questions(logs, ("train",)) if cross_fit is not False else []
    use, why = cross_fit_plan(cross_fit, split, folds, len(train_qs))
    questions = selection_questions(logs, (split, "train") if use else (split,), max_questions, seed)
    if use and not any(q.split == "train" for q in questions):
        use, why = cross_fit_plan(cross_fit, split, folds, len(train_qs), blocked=(
            f"max_questions={max_questions} is filled by the {len(questions)} {split} questions alone"))
    return questions, use, why


def best_checkpoint_epochs(trainer: L.Trainer) -> int:
    """How many epochs the best checkpoint had trained (a fold retriever trains as many): its saved
    `epoch` (the 0-based epoch it was saved in) + 1; without a best checkpoint file, the epochs run.
    Read from the checkpoint: the recipe's file names (`best-03.ckpt`) do not say `epoch=`."""
    from fusion_lightning.checkpointing import AtomicCheckpointIO

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    if not best or not Path(best).is_file():
        return max(1, trainer.current_epoch)
    return int(AtomicCheckpointIO().load_checkpoint(best, map_location="cpu")["epoch"]) + 1


def train_fold_retrievers(pl_module: L.LightningModule, dm, folds: int, seed: int, epochs: int) -> list[L.LightningModule]:
    """One retriever per fold, like `pl_module` (same class and hyper-parameters, `epochs` epochs) fitted
    on the datamodule's train rows without that fold's train questions (`dm.leave_out`)."""
    import torch

    out = []
    accelerator = "gpu" if pl_module.device.type == "cuda" else "cpu"
    with torch.inference_mode(False), torch.enable_grad():  # on_test_end runs under the test loop's inference mode
        for f in range(folds):
            L.seed_everything(seed + 1 + f, workers=True, verbose=False)
            model = type(pl_module)(**dict(pl_module.hparams))
            fold_dm = dm.leave_out({q for q in dm._ids if fold_of(q, folds, seed) == f})
            trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                limit_val_batches=0, num_sanity_val_steps=0)
            trainer.fit(model, train_dataloaders=fold_dm.train_dataloader())
            model.eval()
            out.append(model)
    return out


class ThoughtSelection(L.Callback):
    """After test (the best retriever checkpoint is loaded): `select_thought` with `backend` (the target
    model: a zoo name or model path, served in-process, or a `build_backend` config) on the val split,
    cross-fitted over the train split too by default (`cross_fit`, `folds`; see the module docstring),
    written next to the library."""

    def __init__(self, backend: Mapping[str, Any] | str, modes: Sequence[str] = ("templates", "exemplars", "both"),
                 ks: Sequence[int] = (1, 3), budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
                 se_factor: float | str = "bonferroni", max_questions: int | None = 200, split: str = "val",
                 sampling: Mapping[str, Any] | None = None, seed: int = 0, out_dir: str | None = None,
                 cross_fit: bool | str = "auto", folds: int = 2, per_task: bool = True):
        if not backend:
            raise ValueError("callbacks.thought_selection.backend: the target model is required (a zoo name or "
                             "model path, or a backend config such as {type: openai_compatible, base_url: ..., model: ...})")
        if isinstance(backend, str):
            backend = {"type": "local", "model": backend}  # its progress bar: generation is the long part
        self.backend_cfg, self.modes, self.ks = dict(backend), list(modes), [int(k) for k in ks]
        self.budget_tokens, self.se_factor, self.max_questions = budget_tokens, se_factor, max_questions
        self.split, self.sampling, self.seed, self.out_dir = split, dict(sampling or {}), seed, out_dir
        cross_fit_plan(cross_fit, split, int(folds), 1)  # a bad value fails at construction
        self.cross_fit, self.folds, self.per_task = cross_fit, int(folds), bool(per_task)
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
        if dm.library_dir is None:
            raise ValueError("thought selection writes next to the library: set datamodule.library_dir")
        lib = dm.library

        def augmenter_of(module) -> TemplateAugmenter:
            return TemplateAugmenter(lib, module.encode_queries, module.encode_templates(dm.index_texts),
                                     task_filter=dm.task_filter, budget_tokens=self.budget_tokens)

        augmenter = augmenter_of(pl_module)
        questions, use, why = selection_plan(dm.logs, self.cross_fit, self.split, self.folds, self.max_questions,
                                             self.seed)
        augmenter_for = None
        if use:
            start = time.perf_counter()
            epochs = best_checkpoint_epochs(trainer)
            fold_augs = [augmenter_of(m) for m in train_fold_retrievers(pl_module, dm, self.folds, self.seed, epochs)]
            print(f"thought selection: {self.folds} fold retrievers ({epochs} epochs each) in "
                  f"{time.perf_counter() - start:.0f} s")

            def augmenter_for(q: Question):
                return fold_augs[fold_of(q.query_id, self.folds, self.seed)] if q.split == "train" else augmenter
        backend = build_backend(self.backend_cfg)
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        entry = select_thought(augmenter, backend, questions, self.modes, self.ks, self.budget_tokens, self.se_factor,
                               self.sampling, retriever=ckpt, augmenter_for=augmenter_for, cross_fit=why,
                               per_task=self.per_task)
        out = Path(self.out_dir or trainer.default_root_dir)
        paths = write_selection(entry, backend.name, dm.library_dir, out)
        self.artifacts = {"thought_selection_md": paths["thought_selection_md"]}  # the run dir's copy
        self.summary_fields = {"thought_selection": {"model": backend.name, "mode": entry["mode"], "k": entry["k"],
                                                     "questions": entry["questions"],
                                                     "questions_by_split": entry["questions_by_split"],
                                                     "cross_fit": use, "file": paths["thought_selection_json"]}}
        exceptions = per_task_exceptions(entry)
        if self.per_task:
            self.summary_fields["thought_selection"]["per_task_exceptions"] = exceptions
        chosen = "none (zero-shot)" if entry["mode"] == "none" else f"{entry['mode']}@{entry['k']}"
        by = ", ".join(f"{n} {s}" for s, n in entry["questions_by_split"].items())
        extra = "".join(f"; {c} on {t}" for t, c in sorted(exceptions.items()))
        print(f"thought selection for {backend.name}: {chosen}{extra} over {entry['questions']} questions ({by}; "
              f"{why}) ({entry['seconds']} s)")
