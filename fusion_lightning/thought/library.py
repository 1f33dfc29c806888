"""The template library on disk: `templates.jsonl` + `embeddings.npy` + `library.json` (+ `failures.jsonl`,
`exemplars.jsonl`).

Each template has a content-hash id (sha1 of task + text), task, domain, text, and its provenance:
the source query ids, questions and models, the summariser(s) that wrote it, and the scores of the
source responses. Adding a template whose embedding has cosine above `dedup_threshold` with an
existing template of the same task merges it into that one (provenance concatenated), so the
library can be appended to without rebuilding. Rows of `embeddings.npy` are the L2-normalised
template texts under `library.json`'s `encoder`; retrieval and dedup both use them.

`exemplars.jsonl` holds one solved example per source query (`Exemplar`: the question and the log's
best response to it, uncut, with the model that wrote it and its score): what the thought level's
`exemplars` and `both` modes show, reached through the templates a query retrieves (a template's
`query_ids` name its exemplars). A library written before exemplars existed has none; building it
again from its log (`python -m fusion_lightning.templates build`, resumable) adds them without a
summariser call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.io import atomic_open, atomic_write

FILES = ("templates.jsonl", "embeddings.npy", "library.json")  # required; failures/exemplars are optional


@dataclass
class Exemplar:
    """A solved train question and the log's best response to it (the highest score among those its
    template was built from; ties: the selection's order)."""

    query_id: str
    task: str
    question: str
    response: str
    model: str
    score: float | None = None


@dataclass
class Template:
    id: str
    task: str
    domain: str | None
    text: str
    query_ids: list[str]
    questions: list[str]
    models: list[str]
    summarisers: list[str]
    scores: list[float | None] = field(default_factory=list)
    judges: list[float | None] = field(default_factory=list)

    @staticmethod
    def content_id(task: str, text: str) -> str:
        return "t" + hashlib.sha1(f"{task}\x00{text}".encode()).hexdigest()[:16]

    def merge(self, other: Template) -> None:
        """Keep `other`'s provenance on this template (order kept, no repeats of a query)."""
        seen = set(self.query_ids)
        for i, q in enumerate(other.query_ids):
            if q not in seen:
                seen.add(q)
                self.query_ids.append(q)
                self.questions.append(other.questions[i] if i < len(other.questions) else "")
        self.models += [m for m in other.models if m not in self.models]
        self.summarisers += [s for s in other.summarisers if s not in self.summarisers]
        self.scores += other.scores
        self.judges += other.judges


class TemplateLibrary:
    def __init__(self, encoder: str, dedup_threshold: float = 0.95, templates: list[Template] | None = None,
                 embeddings: np.ndarray | None = None, failures: list[dict] | None = None,
                 exemplars: Sequence[Exemplar] | None = None):
        if not 0 < dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {dedup_threshold}")
        self.encoder, self.dedup_threshold = encoder, float(dedup_threshold)
        self.templates = list(templates or [])
        self.embeddings = np.zeros((0, 0), np.float32) if embeddings is None else np.asarray(embeddings, np.float32)
        self.failures = list(failures or [])
        self._by_id = {t.id: i for i, t in enumerate(self.templates)}
        self.exemplars: dict[str, Exemplar] = {e.query_id: e for e in exemplars or []}

    def __len__(self) -> int:
        return len(self.templates)

    @property
    def query_ids(self) -> set[str]:
        return {q for t in self.templates for q in t.query_ids}

    @property
    def summarisers(self) -> list[str]:
        return sorted({s for t in self.templates for s in t.summarisers})

    def add(self, new: Sequence[Template], vectors: np.ndarray) -> dict[str, int]:
        """Append templates with their (unit) vectors, merging near-duplicates; returns counts."""
        vectors = np.asarray(vectors, np.float32)
        if len(new) != len(vectors):
            raise ValueError(f"{len(new)} templates but {len(vectors)} embedding rows")
        if len(self.templates) == 0 and self.embeddings.size == 0:
            self.embeddings = np.zeros((0, vectors.shape[1] if vectors.ndim == 2 else 0), np.float32)
        if len(new) and vectors.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embedding dim {vectors.shape[1]} != library dim {self.embeddings.shape[1]} "
                             f"(library encoder {self.encoder!r})")
        tasks = np.array([t.task for t in self.templates], dtype=object)
        added, merged, blocks = 0, 0, []
        n0 = len(self.templates)
        for t, v in zip(new, vectors, strict=True):
            target = self._by_id.get(t.id)
            if target is None and len(self.templates):
                sims = self.embeddings @ v
                if blocks:
                    sims = np.concatenate([sims, np.stack(blocks) @ v])
                sims[tasks != t.task] = -np.inf
                j = int(np.argmax(sims))
                if sims[j] > self.dedup_threshold:
                    target = j
            if target is not None:
                self.templates[target].merge(t)
                merged += 1
                continue
            self._by_id[t.id] = len(self.templates)
            self.templates.append(t)
            tasks = np.append(tasks, t.task)
            blocks.append(v)
            added += 1
        if blocks:
            self.embeddings = np.concatenate([self.embeddings, np.stack(blocks)])
        assert len(self.embeddings) == len(self.templates) == n0 + added
        return {"added": added, "merged": merged}

    def add_exemplars(self, new: Sequence[Exemplar]) -> int:
        """Store each source query's exemplar (a query already there keeps its own); returns how many were new."""
        added = 0
        for e in new:
            if e.query_id not in self.exemplars:
                self.exemplars[e.query_id] = e
                added += 1
        return added

    # -- disk -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write all files atomically (each complete or untouched)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in self.templates)
        atomic_write(d / "templates.jsonl", lines)
        with atomic_open(d / "embeddings.npy") as f:
            np.save(f, self.embeddings)
        atomic_write(d / "failures.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in self.failures))
        atomic_write(d / "exemplars.jsonl", "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n"
                                                    for e in self.exemplars.values()))
        meta = {"encoder": self.encoder, "dedup_threshold": self.dedup_threshold, "templates": len(self),
                "summarisers": self.summarisers, "failures": len(self.failures), "exemplars": len(self.exemplars),
                "tasks": sorted({t.task for t in self.templates})}
        atomic_write(d / "library.json", json.dumps(meta, indent=2))  # last: a complete library.json means complete files
        return d

    @classmethod
    def load(cls, directory: str | Path) -> TemplateLibrary:
        d = Path(directory)
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} is not a template library: missing {', '.join(missing)}")
        meta = json.loads((d / "library.json").read_text())
        templates = []
        fields = set(Template.__dataclass_fields__)
        with (d / "templates.jsonl").open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec: dict[str, Any] = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{d / 'templates.jsonl'} line {i}: invalid JSON ({e.msg})") from None
                bad = sorted(set(rec) ^ fields)
                if bad:
                    raise ValueError(f"{d / 'templates.jsonl'} line {i}: unexpected or missing field(s) {bad}")
                if not isinstance(rec["text"], str) or not rec["text"].strip():
                    raise ValueError(f"{d / 'templates.jsonl'} line {i}: field 'text' is empty")
                templates.append(Template(**rec))
        emb = np.load(d / "embeddings.npy", allow_pickle=False)
        if emb.shape[0] != len(templates):
            raise ValueError(f"{d}: embeddings.npy has {emb.shape[0]} rows for {len(templates)} templates")
        failures = []
        if (d / "failures.jsonl").is_file():
            failures = [json.loads(x) for x in (d / "failures.jsonl").read_text().splitlines() if x.strip()]
        exemplars = []
        if (d / "exemplars.jsonl").is_file():  # split on "\n" only: a response may hold U+2028
            exemplars = [Exemplar(**json.loads(x)) for x in (d / "exemplars.jsonl").read_text(encoding="utf-8").split("\n")
                         if x.strip()]
        return cls(meta["encoder"], meta.get("dedup_threshold", 0.95), templates, emb, failures, exemplars)
