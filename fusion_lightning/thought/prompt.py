"""Prompt assembly for thought-level fusion, and the `TemplateAugmenter` the fused pipeline and
`evaluate` call.

The paper's prompt: the k retrieved (question, template) pairs, then the query, then the answer
instruction of the query's scorer (`scoring.formats.answer_instruction`: `####` for GSM8K,
`\\boxed{}` for MATH, `(letter)` for multiple choice, a code fence for code). `few_shot_prompt` is the
few-shot baseline: k solved same-task examples instead of templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.scoring.formats import answer_instruction, zero_shot_prompt
from fusion_lightning.thought.library import Template, TemplateLibrary
from fusion_lightning.thought.retriever import TemplateIndex

__all__ = ["TemplateAugmenter", "few_shot_prompt", "template_prompt", "zero_shot_prompt"]


def template_prompt(query: str, pairs: Sequence[tuple[str, str]], metric: str | None) -> str:
    """k (question, template) pairs, the query, its answer instruction; no pairs -> the zero-shot prompt."""
    if not pairs:
        return zero_shot_prompt(query, metric)
    shown = "\n\n".join(f"Question: {q.strip()}\nThought template:\n{t.strip()}" for q, t in pairs)
    return (f"Here are similar questions with thought templates that solve them:\n\n{shown}\n\n"
            f"Use the most relevant template to solve this question:\n{query.strip()}\n\n{answer_instruction(metric)}")


def few_shot_prompt(query: str, examples: Sequence[tuple[str, str]], metric: str | None) -> str:
    """k solved (question, solution) examples of the same task, the query, its answer instruction."""
    if not examples:
        return zero_shot_prompt(query, metric)
    shown = "\n\n".join(f"Question: {q.strip()}\nSolution: {a.strip()}" for q, a in examples)
    return f"{shown}\n\nQuestion: {query.strip()}\n\n{answer_instruction(metric)}"


class TemplateAugmenter:
    """Retrieve the top-k templates of a library for each query and build the template-augmented prompt."""

    def __init__(self, library: TemplateLibrary, encode_queries, template_vectors: torch.Tensor | np.ndarray,
                 k: int = 3, task_filter: bool = True):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.library, self.k, self.task_filter = library, k, task_filter
        self._encode = encode_queries
        self.index = TemplateIndex(template_vectors, [t.task for t in library.templates])

    @classmethod
    def load(cls, library_dir: str | Path, retriever_ckpt: str | Path | None = None, k: int = 3,
             task_filter: bool = True) -> TemplateAugmenter:
        """`retriever_ckpt` None: the frozen encoder the library was embedded with (cosine top-k)."""
        lib = TemplateLibrary.load(library_dir)
        if len(lib) == 0:
            raise ValueError(f"template library {library_dir} is empty")
        if retriever_ckpt is None:
            enc = build_encoder(lib.encoder)
            return cls(lib, lambda texts: torch.from_numpy(enc.encode(list(texts))), lib.embeddings, k, task_filter)
        from fusion_lightning.thought.retriever import TemplateRetriever

        if not Path(retriever_ckpt).is_file():
            raise FileNotFoundError(f"retriever checkpoint {retriever_ckpt} not found")
        model = TemplateRetriever.load_from_checkpoint(str(retriever_ckpt), map_location="cpu")
        model.eval()
        vectors = model.encode_templates([t.text for t in lib.templates])
        return cls(lib, model.encode_queries, vectors, k, task_filter)

    def retrieve(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None) -> list[list[Template]]:
        if not queries:
            return []
        q = torch.as_tensor(self._encode(list(queries)), dtype=torch.float32)
        scores, idx = self.index.search(q, self.k, list(tasks) if self.task_filter and tasks is not None else None)
        return [[self.library.templates[j] for s, j in zip(srow.tolist(), irow.tolist(), strict=True)
                 if j >= 0 and s != float("-inf")] for srow, irow in zip(scores, idx, strict=True)]

    def prompts(self, queries: list[str], tasks: list[str | None], metrics: list[str | None]) -> list[str]:
        if not len(queries) == len(tasks) == len(metrics):
            raise ValueError(f"need one task and metric per query: {len(queries)} queries, {len(tasks)} tasks, "
                             f"{len(metrics)} metrics")
        found = self.retrieve(queries, tasks)
        return [template_prompt(q, [(t.questions[0] if t.questions else "", t.text) for t in ts], m)
                for q, ts, m in zip(queries, found, metrics, strict=True)]
