"""TemplateDataModule: the library (loaded, or built from the log with the configured summariser),
InfoNCE training triples, and evaluation rows with the baselines' scores.

Positives of a train query: templates from its own best answers and from its `n_neighbors` nearest
same-task train queries' (cosine of the library encoder's query embeddings). Hard negatives: a
template of another task and a same-task template of one of the query's least similar queries.
Evaluation (val/test queries): the index is the whole library minus the query's own templates (and
other tasks' with `task_filter`); a template's gain is the similarity of its closest source query
to the query (same task only, clipped at 0); "relevant" (Recall, MRR) means a source among the
query's `n_relevant` nearest same-task queries. Frozen-encoder and BM25 scores ride in the batch.

What the retriever is trained for (`objective`): similarity of source queries says a template is
*about* a similar question, not that showing it helps. With `objective: outcome` (the default) a
template's worth for a query is also its *skill* there: the logged score, on that query, of the models
whose answers the template (and its exemplar) came from (their mean; unknown where the log has no
such call). A train row's positives are its own templates and its neighbours' (templates of related
queries); it samples one with probability proportional to that template's skill on the row's query
(would the models behind it have answered this question?), so a neighbour's template from a model
that fails on this question is no longer pulled closer; a row whose positives all score 0 there is
left out. The distillation teacher's gains are weighted the same way. Evaluation adds `outcome@k` (`metrics.outcome_at_k`): the mean skill,
on the held-out query, of the top-k retrieved templates (0 for another task's) — the template_retriever
recipe early-stops and checkpoints on `val/outcome@3`; nDCG, recall and MRR stay as diagnostics.
`objective: similarity` is the earlier behaviour (uniform positives).

Cross-fitting (`cross_fit_fold`, `cross_fit_folds`, `cross_fit_seed`): the train questions of that fold
(`thought.auto.fold_of`) are left out of the training rows, so the retriever never trains on them and
the thought selection may score them with it (`leave_out` does the same to a set-up datamodule).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from fusion_lightning.data.arrow import as_objects
from fusion_lightning.data.datamodule import LogDataModule
from fusion_lightning.data.embed_job import prepare_embeddings
from fusion_lightning.data.embeddings import build_encoder, embed_texts
from fusion_lightning.data.resumable import EpochRandomSampler
from fusion_lightning.io import file_lock
from fusion_lightning.thought.auto import fold_of
from fusion_lightning.thought.build import build_library
from fusion_lightning.thought.library import TemplateLibrary
from fusion_lightning.thought.metrics import bm25_scores
from fusion_lightning.thought.select import TemplateSelection
from fusion_lightning.thought.summarise import build_summariser

OBJECTIVES = ("outcome", "similarity")


class _Triples(Dataset):
    """Train rows: one positive and `n_hard` hard negatives resampled from each row's pools at every draw."""

    def __init__(self, rows: list[int], positives: list[list[int]], hard: list[list[int]],
                 pools: list[tuple[np.ndarray, np.ndarray]] | None = None, n_hard: int = 0,
                 weights: list[np.ndarray] | None = None):
        self.rows, self.positives, self.hard = rows, positives, hard
        self.pools, self.n_hard = pools, n_hard
        # per row, its positives' sampling weights (objective outcome); None: uniform
        self.weights = None if weights is None else [torch.as_tensor(w, dtype=torch.float64) for w in weights]

    def __len__(self) -> int:
        return len(self.rows)

    def without(self, rows: set[int]) -> _Triples:
        """The same rows less those of the given query-table rows (a cross-fitting fold)."""
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return _Triples([self.rows[i] for i in keep], pick(self.positives), pick(self.hard), pick(self.pools),
                        self.n_hard, pick(self.weights))

    def __getitem__(self, i: int) -> tuple[int, int, list[int], set[int]]:
        pos = self.positives[i]
        hard = self.hard[i]
        if self.pools is not None:  # n_hard > 0
            other, mid = self.pools[i]
            hard = [int(other[int(torch.randint(len(other), ()))])] if len(other) else []
            if len(mid):
                hard += [int(mid[int(j)]) for j in torch.randperm(len(mid))[: self.n_hard]]
        if self.weights is not None:
            pick = int(torch.multinomial(self.weights[i], 1))
        else:
            pick = int(torch.randint(len(pos), ()))
        return self.rows[i], pos[pick], hard, set(pos)


class TemplateDataModule(LogDataModule):
    def __init__(self, data: Mapping[str, Any] | None = None, logs=None, library_dir: str | None = None,
                 encoder: str = "minilm", summariser: Mapping[str, Any] | None = None,
                 selection: Mapping[str, Any] | None = None, dedup_threshold: float = 0.95,
                 embedding_cache: str | None = None, n_neighbors: int = 3, n_relevant: int = 3,
                 task_filter: bool = True, batch_size: int = 32, eval_batch_size: int = 128,
                 num_workers: int = 0, n_hard: int = 0, hard_band: tuple[int, int] = (10, 100),
                 own_positive: bool = True, objective: str = "outcome", cross_fit_fold: int | None = None,
                 cross_fit_folds: int = 2, cross_fit_seed: int = 0):
        super().__init__(data, logs)
        self.library_dir = Path(library_dir) if library_dir else None
        self.encoder_name, self.summariser_cfg = encoder, dict(summariser or {"type": "rule"})
        self.selection = TemplateSelection(**dict(selection or {}))
        self.dedup_threshold, self.embedding_cache = dedup_threshold, embedding_cache
        self.n_neighbors, self.n_relevant, self.task_filter = n_neighbors, n_relevant, task_filter
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.n_hard, self.hard_band, self.own_positive = int(n_hard), tuple(int(x) for x in hard_band), own_positive
        if objective not in OBJECTIVES:
            raise ValueError(f"datamodule.objective={objective!r}; choose from: {', '.join(OBJECTIVES)}")
        self.objective = objective
        if cross_fit_fold is not None and not 0 <= int(cross_fit_fold) < int(cross_fit_folds):
            raise ValueError(f"datamodule.cross_fit_fold={cross_fit_fold} must be in [0, cross_fit_folds={cross_fit_folds})")
        self.cross_fit = None if cross_fit_fold is None else (int(cross_fit_fold), int(cross_fit_folds), int(cross_fit_seed))
        self.library: TemplateLibrary | None = None
        self._built = None

    # -- setup ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """One-time work, written to disk; Lightning runs it on each node's local rank 0 only. Builds the
        library into `library_dir` unless it is there (the summariser may call an LLM once per query) and
        embeds the queries into `embedding_cache` when one is set; `setup` loads both on every rank."""
        if self.library_dir is None:  # an in-memory library is built in setup: a single process
            return
        lib = self._library()
        if self.embedding_cache:
            texts = as_objects(self.logs.query_table()["query"]).tolist()
            prepare_embeddings(texts, lib.encoder, self.embedding_cache)

    def _library(self) -> TemplateLibrary:
        d = self.library_dir
        if d is None:
            return self._build(None)
        # concurrent callers (ranks before their process group exists, nodes sharing the disk) wait for the
        # first one's library instead of building, and summarising, again
        with file_lock(d / ".build.lock"):
            if not (d / "library.json").is_file():
                self._build(d)
        return TemplateLibrary.load(d)

    def _build(self, out: Path | None) -> TemplateLibrary:
        summariser = build_summariser(self.summariser_cfg, self.logs.task_descriptions)
        lib, self.build_report = build_library(self.logs, summariser, build_encoder(self.encoder_name), out,
                                               self.selection, self.dedup_threshold, progress=False)
        return lib

    def setup(self, stage: str | None = None) -> None:
        if self._built is not None:
            return
        lib = self.library = self._library()
        if len(lib) == 0:
            raise ValueError(f"template library {self.library_dir or '(in memory)'} is empty: no query in the "
                             "log has a correct response to summarise")
        qt = self.logs.query_table()
        ids, texts = as_objects(qt["query_id"]), as_objects(qt["query"]).tolist()
        tasks, splits = as_objects(qt["task"]), as_objects(qt["split"])
        row = {q: i for i, q in enumerate(ids)}
        enc = build_encoder(lib.encoder)
        qv = embed_texts(texts, enc, self.embedding_cache)
        self.index_texts = [t.text for t in lib.templates]
        t_tasks = np.array([t.task for t in lib.templates], dtype=object)
        sources = [[row[q] for q in t.query_ids if q in row] for t in lib.templates]
        by_source: dict[int, list[int]] = {}
        for j, srcs in enumerate(sources):
            for s in srcs:
                by_source.setdefault(s, []).append(j)
        has_t = np.zeros(len(ids), bool)
        has_t[list(by_source)] = True
        sim = qv @ qv.T
        np.fill_diagonal(sim, -np.inf)
        same = tasks[:, None] == tasks[None, :]
        self._skill_tables(ids, lib)
        is_train = splits == "train"
        self._train = self._triples(np.flatnonzero(is_train), sim, same, is_train & has_t, by_source,
                                    t_tasks, tasks, sources)
        self._ids = [str(q) for q in ids]
        if self.cross_fit is not None:  # a fold retriever: never trains on its fold's train questions
            fold, folds, seed = self.cross_fit
            self._train = self._train.without({i for i, (q, s) in enumerate(zip(self._ids, splits, strict=True))
                                               if s == "train" and fold_of(q, folds, seed) == fold})
        self._eval = {s: self._eval_rows(np.flatnonzero(splits == s), sim, same, has_t, sources, t_tasks, tasks,
                                         [texts[i] for i in np.flatnonzero(splits == s)],
                                         qv[splits == s] @ lib.embeddings.T)
                      for s in ("val", "test")}
        self._qv, self._sources, self._q_tasks, self._t_tasks = np.asarray(qv, np.float32), sources, tasks, t_tasks
        self._texts, self._built = texts, True

    def _skill_tables(self, ids, lib: TemplateLibrary) -> None:
        """The log's per-model scores on every query (rows in query-table order; 0 + unknown where not
        logged) and each template's models, for `skill`."""
        qm = self.logs.matrix()
        where = {q: i for i, q in enumerate(qm.query_ids.tolist())}
        order = np.array([where.get(q, -1) for q in ids], np.int64)
        known = order >= 0
        perf = np.where(qm.mask, np.nan_to_num(qm.performance), 0.0).astype(np.float32)
        self._perf = np.zeros((len(ids), len(qm.models)), np.float32)
        self._known = np.zeros((len(ids), len(qm.models)), np.float32)
        self._perf[known], self._known[known] = perf[order[known]], qm.mask[order[known]]
        col = {m: i for i, m in enumerate(qm.models)}
        self._t_models = np.zeros((len(lib), len(qm.models)), np.float32)
        for j, t in enumerate(lib.templates):
            for m in t.models:
                if m in col:
                    self._t_models[j, col[m]] = 1.0
        if self.objective == "outcome" and not (self._known @ self._t_models.T).any():
            raise ValueError("datamodule.objective=outcome needs the log's scores of the models the templates were "
                             "built from, and this log has none of them; use datamodule.objective=similarity")

    def skill(self, rows, cols) -> np.ndarray:
        """[rows, cols]: the mean logged score, on each row's query, of the models template `col` was built
        from; NaN where the log has none of their calls on that query."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        w = self._t_models[cols].T
        num, den = self._perf[rows] @ w, self._known[rows] @ w
        return np.divide(num, den, out=np.full(num.shape, np.nan, np.float32), where=den > 0)

    def _triples(self, rows, sim, same, eligible, by_source, t_tasks, tasks, sources):
        """Positives: the row's own templates (`own_positive`) and its `n_neighbors` nearest same-task
        train queries'. Hard negatives: with `n_hard` = 0, one other-task template and one template of a
        far same-task query, fixed; with `n_hard` > 0, pools resampled at every draw: other-task
        templates and templates of the same-task queries ranked `hard_band` (near but not neighbours)."""
        rng = np.random.default_rng(0)
        keep, positives, hard, pools, weights = [], [], [], [], []
        outcome = self.objective == "outcome"
        other_by_task: dict = {}
        lo, hi = self.hard_band
        for i in rows:
            s = np.where(same[i] & eligible, sim[i], -np.inf)
            order = np.argsort(-s)
            near = [n for n in order[: self.n_neighbors] if np.isfinite(s[n])]
            pos = sorted({j for n in ([i] if self.own_positive else []) + near for j in by_source.get(int(n), [])})
            if not pos:
                continue
            if outcome:  # each positive's skill on the row's query: would its models have answered it?
                w = np.nan_to_num(self.skill([int(i)], pos)[0], nan=1.0)
                if not (w > 0).any():
                    continue  # every positive comes from models that fail here: nothing to pull closer
                weights.append(w)
            if tasks[i] not in other_by_task:  # other-task templates: one array per task, shared by its rows
                other_by_task[tasks[i]] = np.flatnonzero(t_tasks != tasks[i])
            other = other_by_task[tasks[i]]
            negs: list[int] = []
            if self.n_hard:  # resampled from pools at every draw
                own = set(by_source.get(int(i), []))
                mid = np.array(sorted({j for n in order[lo:hi] if np.isfinite(s[n])
                                       for j in by_source.get(int(n), []) if j not in pos and j not in own}),
                               dtype=np.int64)
                pools.append((other, mid))
            else:  # fixed: one other-task template and one of a far same-task query
                far = [n for n in np.argsort(s)[: max(4, len(s) // 4)] if np.isfinite(s[n]) and n not in near]
                far_t = [j for n in far for j in by_source.get(int(n), []) if j not in pos]
                negs = ([int(rng.choice(other))] if len(other) else []) + ([int(rng.choice(far_t))] if far_t else [])
            keep.append(int(i))
            positives.append(pos)
            hard.append(negs)
        return _Triples(keep, positives, hard, pools if self.n_hard else None, self.n_hard,
                        weights if outcome else None)

    def _teacher_gains(self, rows: list[int], cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, cols] gains as in evaluation (similarity of a template's closest other source query,
        same task only, clipped at 0) and a mask of the row's own templates (never in its eval index)."""
        qv, srcs, tasks, t_tasks = self._qv, self._sources, self._q_tasks, self._t_tasks
        gains = np.zeros((len(rows), len(cols)), np.float32)
        own = np.zeros((len(rows), len(cols)), bool)
        r_idx = np.asarray(rows)
        for c, j in enumerate(cols):
            s = np.asarray(srcs[j], dtype=np.int64)
            if not len(s):
                continue
            is_self = r_idx[:, None] == s[None, :]
            sim = np.where(is_self, -np.inf, qv[r_idx] @ qv[s].T).max(1)
            own[:, c] = is_self.any(1)
            gains[:, c] = np.where(np.isfinite(sim) & (tasks[r_idx] == t_tasks[j]), np.maximum(sim, 0.0), 0.0)
        if self.objective == "outcome":  # a similar source counts as much as its models' score on the row
            gains *= np.nan_to_num(self.skill(r_idx, cols), nan=1.0)
        return torch.from_numpy(gains), torch.from_numpy(own)

    def _eval_rows(self, rows, sim, same, has_t, sources, t_tasks, tasks, texts, frozen) -> dict[str, Any]:
        n_t = len(sources)
        gains = np.zeros((len(rows), n_t), np.float32)
        relevant = np.zeros((len(rows), n_t), bool)
        exclude = np.zeros((len(rows), n_t), bool)
        for r, i in enumerate(rows):
            s = np.where(same[i] & has_t, sim[i], -np.inf)
            nearest = {int(n) for n in np.argsort(-s)[: self.n_relevant] if np.isfinite(s[n])}
            for j, srcs in enumerate(sources):
                if i in srcs:
                    exclude[r, j] = True
                others = [x for x in srcs if x != i]
                if others and t_tasks[j] == tasks[i]:
                    gains[r, j] = max(0.0, float(sim[i, others].max()))
                    relevant[r, j] = any(x in nearest for x in others)
            if self.task_filter:
                exclude[r] |= t_tasks != tasks[i]
        bm25 = bm25_scores(texts, self.index_texts)
        # outcome@k's values: the templates' skill on the query, 0 for another task's (never helpful)
        outcome = self.skill(rows, np.arange(n_t)) if len(rows) else np.zeros((0, n_t), np.float32)
        outcome[t_tasks[None, :] != tasks[np.asarray(rows, np.int64)][:, None]] = 0.0
        return {"query": texts, "frozen": torch.from_numpy(np.asarray(frozen, np.float32)),
                "bm25": torch.from_numpy(bm25), "exclude": torch.from_numpy(exclude),
                "relevant": torch.from_numpy(relevant), "gains": torch.from_numpy(gains),
                "outcome": torch.from_numpy(outcome)}

    def leave_out(self, query_ids: set[str]) -> TemplateDataModule:
        """A copy that never trains on these questions (their train rows dropped: a cross-fitting fold's
        retriever); the library, the index and the evaluation rows are shared."""
        self.setup()
        dm = copy.copy(self)
        dm._train = self._train.without({i for i, q in enumerate(self._ids) if q in query_ids})
        return dm

    # -- loaders --------------------------------------------------------------------------------
    def _collate_train(self, items):
        rows, pos, hard, pos_sets = zip(*items, strict=True)
        negs = [j for h in hard for j in h]
        cols = list(pos) + negs
        mask = torch.tensor([[c in pos_sets[i] and c_i != i for c_i, c in enumerate(cols)]
                             for i in range(len(rows))])
        t = self.index_texts
        gains, own = self._teacher_gains(list(rows), cols)
        return {"query": [self._texts[r] for r in rows], "positive": [t[j] for j in pos],
                "negatives": [t[j] for j in negs], "mask": mask, "gains": gains, "own": own}

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        if split == "train":
            if len(self._train) == 0:
                raise ValueError("no train query has a template positive; check data splits and the library")
            # the order is a function of the epoch and Lightning checkpoints the position: exact mid-epoch resume
            return StatefulDataLoader(self._train, batch_size=self.batch_size, sampler=EpochRandomSampler(self._train),
                                      drop_last=len(self._train) > self.batch_size, collate_fn=self._collate_train,
                                      num_workers=self.num_workers, generator=torch.Generator().manual_seed(0))
        ev = self._eval[split]
        idx = list(range(len(ev["query"])))
        return DataLoader(idx, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=lambda b: {k: ([v[i] for i in b] if k == "query" else v[b]) for k, v in ev.items()})

    def model_kwargs(self) -> dict[str, Any]:
        self.setup()
        return {"encoder": self.library.encoder}  # the retriever starts from the encoder the library was embedded with

    def summary(self) -> dict[str, int]:
        self.setup()
        return {**super().summary(), "templates": len(self.library), "train_queries_with_positives": len(self._train),
                "val_eval_queries": len(self._eval["val"]["query"]), "test_eval_queries": len(self._eval["test"]["query"])}

    def write_artifacts(self, run_dir: Path) -> dict[str, str]:
        out = super().write_artifacts(run_dir)
        if self.library_dir is not None:
            try:
                self.library_dir.resolve().relative_to(Path(run_dir).resolve())
                out["template_library"] = str(self.library_dir.resolve())
            except ValueError:
                pass
        return out
