"""RouterDataModule: query embeddings, task ids and the queries × models targets of each split."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from fusion_lightning.data.arrow import as_objects
from fusion_lightning.data.datamodule import LogDataModule
from fusion_lightning.data.embed_job import prepare_embeddings
from fusion_lightning.data.embeddings import build_encoder, embed_texts
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.matrix import QueryMatrix, TaskNormaliser
from fusion_lightning.data.resumable import EpochRandomSampler
from fusion_lightning.query.metrics import RoutingArrays
from fusion_lightning.query.off_policy import OFF_POLICY, BanditTargets, bandit_targets, router_scores
from fusion_lightning.query.task_classifier import fit_task_classifier, task_posterior

UNKNOWN_TASK = "<unk>"


class RouterSplit(Dataset):
    """One split as tensors; items are dicts so every router reads the same batch."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class RouterDataModule(LogDataModule):
    def __init__(self, data: dict | None = None, encoder: str = "minilm", embedding_cache: str | None = None,
                 batch_size: int = 128, num_workers: int = 0, logs: LogTable | None = None,
                 off_policy: str = "auto", max_weight: float | None = 10.0):
        super().__init__(data, logs)
        if off_policy not in OFF_POLICY:
            raise ValueError(f"datamodule.off_policy={off_policy!r}; choose from: {', '.join(OFF_POLICY)}")
        self.encoder_name, self.cache_dir = encoder, embedding_cache
        self.batch_size, self.num_workers = batch_size, num_workers
        self.off_policy, self.max_weight = off_policy, max_weight
        self.splits: dict[str, RouterSplit] = {}
        self.matrices: dict[str, QueryMatrix] = {}
        self.bandit: BanditTargets | None = None  # a bandit log's propensities and reward model, after setup
        self._truth: dict[str, RoutingArrays] = {}  # a simulated log's truth per split, made on first use

    router_scores = staticmethod(router_scores)  # a router logger for data.bandit (fusion_lightning.data.bandit)

    def prepare_data(self) -> None:
        """Embeds every query into the embedding cache once (Lightning runs this on each node's local rank
        0 only); `setup` then reads the vectors from the cache on every rank. Without a cache, setup embeds."""
        if self.cache_dir:  # the embed job (a Lightning predict); concurrent callers wait for the first
            prepare_embeddings(self.prepare_texts(), self.encoder_name, self.cache_dir)

    def prepare_texts(self) -> list[str]:
        """Every text `setup` and the model embed, for the embed job: the queries, then the model and task
        descriptions the graph router reads (of every model and task in the log, a superset of train's)."""
        queries = as_objects(self.logs.query_table()["query"]).tolist()
        return queries + self.description_texts(self.logs.models, [UNKNOWN_TASK, *self.logs.tasks])

    def description_texts(self, models: list[str], tasks: list[str]) -> list[str]:
        """Catalog descriptions of `models` and descriptions of `tasks` (the name where one is empty)."""
        cat, task_desc = self.logs.catalog, self.logs.task_descriptions
        return [(cat[m].description if m in cat else "") or m for m in models] + [task_desc.get(t) or t for t in tasks]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        qm = self.logs.matrix()
        feats = self.features(qm.queries)
        train = qm.split("train")
        if len(train) == 0:
            raise ValueError("the train split has no queries; check data.split and the file names")
        self.normaliser = TaskNormaliser.fit(train)
        self.tasks = [UNKNOWN_TASK, *sorted(set(train.tasks.tolist()))]
        self.embed_dim = feats.shape[1]
        task_index = {t: i for i, t in enumerate(self.tasks)}
        all_tasks = torch.tensor([task_index.get(t, 0) for t in qm.tasks], dtype=torch.long)
        # production traffic has no task label: a classifier on the text infers it (task-blind metrics)
        task_x = self.task_features(qm.queries, feats)
        is_train = torch.from_numpy(qm.splits == "train")
        self.task_classifier = fit_task_classifier(task_x[is_train], all_tasks[is_train], len(self.tasks))
        task_hat, task_hat_p = task_posterior(task_x, *self.task_classifier)
        if self.logs.bandit:
            self.bandit = bandit_targets(qm, feats.numpy() if feats.is_floating_point() else task_x.numpy(),
                                         self.normaliser, self.data_config.get("propensity", "logged"),
                                         self.off_policy, max_weight=self.max_weight)
            self.logs.report.notes.extend(self.bandit.notes)
        for split in ("train", "val", "test"):
            rows = np.flatnonzero(qm.splits == split)
            m = qm.take(rows)
            self.matrices[split] = m
            perf_n = self.normaliser.performance(m.performance, m.tasks)
            cost_n = self.normaliser.cost(m.cost, m.tasks)
            self.splits[split] = RouterSplit({
                "x": feats[rows],
                "task": all_tasks[rows],
                "task_hat": task_hat[rows],  # [N, k] the tasks most probable from the text alone, best first
                "task_hat_p": task_hat_p[rows],  # [N, k] their renormalised probabilities
                "perf": torch.from_numpy(np.nan_to_num(m.performance, nan=0.0)),
                "perf_n": torch.from_numpy(np.nan_to_num(perf_n, nan=0.0)),
                "cost": torch.from_numpy(np.nan_to_num(m.cost, nan=0.0)),
                "cost_n": torch.from_numpy(np.nan_to_num(cost_n, nan=0.0)),
                "mask": torch.from_numpy(m.mask),
                # row of each query in its split: routers that keep the train split as context (graph)
                # find the batch's own rows there, e.g. to hide their answers while training on them
                "index": torch.arange(len(rows)),
                # judge scores for the judge reward setting: NaN -> 0 under their own mask (never scored as 0)
                "judge": torch.from_numpy(np.nan_to_num(m.judge, nan=0.0).astype(np.float32)),
                "judge_mask": torch.from_numpy(m.mask & ~np.isnan(m.judge)),
            })
            if self.bandit is not None:
                self.splits[split].tensors.update(self.bandit.tensors(rows, split))

    def truth_arrays(self, split: str) -> RoutingArrays | None:
        """A simulated bandit log's full-information arrays of `split` (data.bandit keeps the full log), in
        the split's query order: what the off-policy estimates are checked against. None otherwise."""
        truth = self.logs.truth
        if truth is None or split not in self.matrices:
            return None
        if split in self._truth:
            return self._truth[split]
        full = truth.matrix(list(self.matrices["train"].models))
        row = {q: i for i, q in enumerate(full.query_ids.tolist())}
        m = full.take(np.array([row[q] for q in self.matrices[split].query_ids.tolist()], np.int64))
        perf_n, cost_n = self.normaliser.performance(m.performance, m.tasks), self.normaliser.cost(m.cost, m.tasks)
        f = {k: np.nan_to_num(v).astype(np.float64) for k, v in
             (("perf", m.performance), ("cost", m.cost), ("perf_n", perf_n), ("cost_n", cost_n))}
        self._truth[split] = RoutingArrays(f["perf"], f["cost"], f["perf_n"], f["cost_n"], m.mask,
                                           self.splits[split].tensors["task"].numpy().astype(np.int64))
        return self._truth[split]

    def features(self, texts: list[str]) -> torch.Tensor:
        """What a router reads per query: the (cached) query embedding. Subclasses may tokenize instead."""
        encoder = build_encoder(self.encoder_name)
        self.encoder_id = encoder.name
        return torch.from_numpy(embed_texts(texts, encoder, self.cache_dir))

    def task_features(self, texts: list[str], feats: torch.Tensor) -> torch.Tensor:
        """What the task classifier reads: the router's features when they are embeddings, else the
        embeddings of the configured encoder (routers that read token ids)."""
        if feats.is_floating_point():
            return feats
        return torch.from_numpy(embed_texts(texts, build_encoder(self.encoder_name), self.cache_dir))

    def model_kwargs(self) -> dict[str, Any]:
        self.setup()
        cat = self.logs.catalog
        return {
            "embed_dim": self.embed_dim, "models": list(self.matrices["train"].models), "tasks": self.tasks,
            "binary": self.matrices["train"].binary and not (self.bandit and self.bandit.pseudo),
            "encoder": self.encoder_id,
            "normaliser": self.normaliser.state_dict(),
            "model_sizes": [cat[m].params_b if m in cat else None for m in self.matrices["train"].models],
        }

    def description_embeddings(self) -> dict[str, np.ndarray]:
        """Embedded catalog descriptions of the models and descriptions of the tasks (the name where a
        description is empty), in model_kwargs' model/task order: the graph router's LLM and task node
        features."""
        self.setup()
        models = list(self.matrices["train"].models)
        emb = embed_texts(self.description_texts(models, self.tasks), build_encoder(self.encoder_name), self.cache_dir)
        return {"models": emb[:len(models)], "tasks": emb[len(models):]}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.splits[split]
        if len(ds) == 0:
            raise ValueError(f"the {split} split has no queries; adjust data.val_fraction/test_fraction")
        g = torch.Generator().manual_seed(0)
        if not shuffle:
            return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)
        # the order is a function of the epoch and the position is checkpointed: ckpt_path=last resumes exactly
        return StatefulDataLoader(ds, batch_size=self.batch_size, sampler=EpochRandomSampler(ds, seed=0),
                                  num_workers=self.num_workers, generator=g)
