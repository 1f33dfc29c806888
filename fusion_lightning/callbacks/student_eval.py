"""After testing a distilled student: generate on held-out queries and score them, against the base model.

The paper's Table 5 layout: per task, the base model zero-shot vs the student, scored by the task's
scorer. Both generate through the serving layer's local backend (the student as base + adapter for
LoRA runs), so what is measured is what would be served.
"""

from __future__ import annotations

import csv
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fusion_lightning.io import atomic_open, atomic_write
from fusion_lightning.scoring import get_scorer


class StudentEvaluation(L.Callback):
    def __init__(self, max_queries: int = 64, max_new_tokens: int = 128, batch_size: int = 8,
                 out_dir: str | None = None):
        self.max_queries, self.max_new_tokens, self.batch_size = max_queries, max_new_tokens, batch_size
        self.out_dir = out_dir
        self.artifacts: dict[str, str] = {}

    def _queries(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Test queries that a scorer can score, spread over tasks (round-robin), at most max_queries."""
        rows = trainer.datamodule.logs.select("test").query_table().to_pylist()
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in sorted(rows, key=lambda r: r["query_id"]):
            if r["ground_truth"] and r["metric"]:
                try:
                    get_scorer(r["metric"])
                except ValueError:
                    continue
                by_task[r["task"]].append(r)
        picked: list[dict] = []
        while len(picked) < self.max_queries and any(by_task.values()):
            for task in sorted(by_task):
                if by_task[task] and len(picked) < self.max_queries:
                    picked.append(by_task[task].pop(0))
        return picked

    def _score(self, backend, queries: list[dict]) -> list[float]:
        gens = backend.generate([q["query"] for q in queries], max_new_tokens=self.max_new_tokens, temperature=0)
        return [get_scorer(q["metric"])(g.text, q["ground_truth"]) for q, g in zip(queries, gens, strict=True)]

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "trainable_names"):
            return
        if trainer.fast_dev_run:
            if trainer.is_global_zero:
                print("student evaluation skipped under fast_dev_run (a smoke run)")
            return
        from fusion_lightning.serving.local import LocalBackend

        queries = self._queries(trainer) if trainer.is_global_zero else []
        base_path = pl_module.hparams.name_or_path
        device = str(pl_module.device)
        with tempfile.TemporaryDirectory() as tmp:
            with _gathered(pl_module.model):  # every rank, before rank 0 alone goes on
                if queries:
                    pl_module.model.save_pretrained(tmp)  # LoRA: the adapter only
            if not queries:
                return
            if pl_module.hparams.lora:
                student = LocalBackend(base_path, adapter=tmp, name="student", device=device,
                                       batch_size=self.batch_size, progress=False)
            else:
                student = LocalBackend(tmp, tokenizer=base_path, name="student", device=device,
                                       batch_size=self.batch_size, progress=False)
            student_scores = self._score(student, queries)
            del student
        base = LocalBackend(base_path, name="base", device=device, batch_size=self.batch_size, progress=False)
        base_scores = self._score(base, queries)
        del base

        per_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"base": [], "student": []})
        for q, b, s in zip(queries, base_scores, student_scores, strict=True):
            per_task[q["task"]]["base"].append(b)
            per_task[q["task"]]["student"].append(s)
        rows = [(t, len(v["base"]), sum(v["base"]) / len(v["base"]), sum(v["student"]) / len(v["student"]))
                for t, v in sorted(per_task.items())]
        n = len(queries)
        overall = ("all", n, sum(base_scores) / n, sum(student_scores) / n)
        metrics = {"test/base/perf": overall[2], "test/student/perf": overall[3]}
        for t, _, b, s in rows:
            metrics[f"test/base/perf/{t}"], metrics[f"test/student/perf/{t}"] = b, s
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._write(Path(self.out_dir or trainer.default_root_dir), [*rows, overall])

    def _write(self, out: Path, rows: list[tuple]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / "student_eval.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["task", "queries", "base_perf", "student_perf"])
            w.writerows([(t, k, f"{b:.4f}", f"{s:.4f}") for t, k, b, s in rows])
        lines = ["| task | queries | base (zero-shot) | student |", "|---|---|---|---|"]
        lines += [f"| {t} | {k} | {b:.3f} | {s:.3f} |" for t, k, b, s in rows]
        atomic_write(out / "student_eval.md", "\n".join(lines) + "\n")
        self.artifacts = {"student_eval_md": str(out / "student_eval.md"),
                          "student_eval_csv": str(out / "student_eval.csv")}


def _gathered(model: torch.nn.Module):
    """Whole parameters for the duration (`save_pretrained` of a student trained under DeepSpeed ZeRO-3,
    whose parameters are partitioned: empty tensors outside this); a no-op for any other model. A
    collective under ZeRO-3: every rank must enter it."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
