"""Route API: load any router checkpoint and pick a model per query.

    router = Router.load("checkpoints/runs/router_mlp/<ts>/checkpoints/best-07.ckpt")
    result = router.route(["What is 17 * 23?"], tasks=["gsm8k"], lam=0.5)
    result.models       # chosen model per query
    result.scores       # predicted reward per (query, model)

The checkpoint holds everything routing needs: the router class, the model list, the encoder name,
the task list and the normalisation constants; after `route calibrate.strong_fraction=F` (or `calibrate.budget=`) also a strong/weak threshold
(`router.calibration`, used by `route_strong_weak`; fusion_lightning/query/calibrate.py).

Two decision rules over one checkpoint's predictions: `lam=λ`, the argmax of predicted performance −
λ · predicted normalised cost; and `tolerance=τ`, the cheapest model (by predicted cost) among those
predicted within τ of the query's best predicted performance. Where costs differ by orders of
magnitude a price per unit of score jumps from the best model to the cheapest; τ is said in the
score's own units ("give up at most 0.02 of accuracy") and reaches the operating points in between.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fusion_lightning.zoo  # noqa: F401  registers the zoo's model names with the hf: encoders (a checkpoint's)
from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.data.encoders import Encoder
from fusion_lightning.query.base import RouterModule
from fusion_lightning.query.metrics import check_decision, tolerance_decision
from fusion_lightning.query.routers import current_path

CALIBRATION_KEY = "fusion_lightning_strong_weak"  # checkpoint entry written by `route calibrate.*=`


@dataclass
class RouteResult:
    models: list[str]  # chosen model per query
    scores: np.ndarray  # [N, M] predicted reward perf − λ·cost
    perf: np.ndarray  # [N, M] predicted performance
    cost: np.ndarray  # [N, M] predicted normalised cost
    candidates: list[str]  # column names of the arrays
    tasks: list[str | None] | None = None  # route(): the task each query was routed under (given, else the
    # most probable inferred one; None where it stays unknown)
    strong_score: np.ndarray | None = None  # route_strong_weak(): [N] predicted perf of strong − weak



def load_router_module(path: str | Path) -> RouterModule:
    """Rebuild the router LightningModule a checkpoint was saved from (weights-only load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    target = ckpt.get("router_class") if isinstance(ckpt, dict) else None
    if not target:
        raise ValueError(f"{path}: not a fusion_lightning router checkpoint (no 'router_class' entry)")
    target = current_path(target)  # a checkpoint from before the routers moved to query/routers/
    module_name, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{path}: router class {target!r} is not importable: {e}") from None
    router = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    router.calibration = ckpt.get(CALIBRATION_KEY)  # the strong/weak threshold, when calibrated
    return router.eval()


class Router:
    """A trained router plus its query encoder; batched, CPU or GPU."""

    def __init__(self, module: RouterModule, encoder: Encoder | None = None, memo_size: int = 4096):
        self.module = module
        self._encoder = encoder
        # served traffic repeats prompts (retries, templates, the same question from many users): the last
        # `memo_size` distinct texts' embeddings are kept, so a repeat costs no encoder call
        self.memo_size = int(memo_size)
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_lock = threading.Lock()
        self.memo_hits = 0
        self.encode_seconds = 0.0  # in the encoder so far: a server reads it to split routing time
        self.models: list[str] = list(module.hparams.models)
        self.calibration: dict | None = getattr(module, "calibration", None)
        self._task_index = {t: i for i, t in enumerate(module.hparams.tasks)}

    @property
    def encoder(self) -> Encoder:
        """The checkpoint's query encoder, built on first use (routers that tokenize never need it)."""
        if self._encoder is None:
            self._encoder = build_encoder(self.module.hparams.encoder)
        return self._encoder

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None, memo_size: int = 4096) -> Router:
        return cls(load_router_module(path), encoder, memo_size)

    def embed(self, queries: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """[N, D] the encoder's vectors of `queries`, remembered ones from the memo, the rest encoded in one
        call (each distinct text once)."""
        with self._memo_lock:
            known = {q: self._memo[q] for q in dict.fromkeys(queries) if q in self._memo}
            for q in known:
                self._memo.move_to_end(q)
            self.memo_hits += sum(q in known for q in queries)
        todo = [q for q in dict.fromkeys(queries) if q not in known]
        t0 = time.perf_counter()
        fresh = dict(zip(todo, self.encoder.encode(todo, batch_size=batch_size), strict=True)) if todo else {}
        self.encode_seconds += time.perf_counter() - t0
        if self.memo_size > 0 and fresh:
            with self._memo_lock:
                self._memo.update(fresh)
                while len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
        vectors = {**known, **fresh}
        if not queries:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([vectors[q] for q in queries]).astype(np.float32, copy=False)

    def task_ids(self, tasks: Sequence[str | None] | None, n: int) -> torch.Tensor:
        """Task indices; unknown or missing tasks map to 0 (the router's 'unknown task')."""
        if tasks is None:
            return torch.zeros(n, dtype=torch.long)
        if len(tasks) != n:
            raise ValueError(f"got {n} queries but {len(tasks)} tasks")
        return torch.tensor([self._task_index.get(t, 0) if t else 0 for t in tasks], dtype=torch.long)

    def task_weights(self, queries: Sequence[str], features: torch.Tensor,
                     tasks: Sequence[str | None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, k] task indices, [N, k] weights): a known task with weight 1; for a missing or unknown one
        the tasks its text suggests, from the checkpoint's task classifier (the unknown task 0 when the
        checkpoint has none)."""
        known = self.task_ids(tasks, len(queries))
        idx, w = known[:, None], torch.ones(len(queries), 1)
        if bool((known == 0).any()) and self.module.task_clf_weight.numel():
            emb = features if features.is_floating_point() else torch.as_tensor(
                self.encoder.encode(list(queries)))
            post = self.module.task_posterior(emb.float().to(self.module.task_clf_weight.device))
            if post is not None:
                inf_idx, inf_w = (t.cpu() for t in post)
                one = torch.zeros_like(inf_w)
                one[:, 0] = 1.0
                unknown = (known == 0)[:, None]
                idx = torch.where(unknown, inf_idx, torch.cat([known[:, None], inf_idx[:, 1:]], 1))
                w = torch.where(unknown, inf_w, one)
        return idx, w

    @torch.inference_mode()
    def route_embeddings(self, features: np.ndarray | torch.Tensor, task_ids: torch.Tensor, lam: float = 0.0,
                         batch_size: int = 4096, task_weights: torch.Tensor | None = None,
                         tolerance: float | None = None) -> RouteResult:
        """Route pre-computed query features (embeddings, or token ids for routers that tokenize).

        `task_ids` [N], or [N, k] candidate tasks with `task_weights` [N, k] (predictions averaged over them).
        `tolerance` τ: the cheapest model predicted within τ of the best instead of the argmax (module docstring)."""
        check_decision(lam, tolerance)
        x = torch.as_tensor(features)
        x = x.float() if x.is_floating_point() else x  # token ids stay integers
        device = next(self.module.parameters(), torch.zeros(0)).device
        if task_ids.ndim == 1:
            task_ids, task_weights = task_ids[:, None], torch.ones(len(task_ids), 1)
        perf, cost = [], []
        for i in range(0, len(x), batch_size):
            p, c = self.module.predict_mixture(x[i:i + batch_size].to(device), task_ids[i:i + batch_size],
                                               task_weights[i:i + batch_size])
            perf.append(p.float().cpu())
            cost.append(c.float().cpu())
        perf_t = torch.cat(perf) if perf else torch.zeros(0, len(self.models))
        cost_t = torch.cat(cost) if cost else torch.zeros(0, len(self.models))
        scores = perf_t - lam * cost_t
        choice = (scores.argmax(dim=1).tolist() if tolerance is None
                  else tolerance_decision(perf_t.numpy(), cost_t.numpy(), tolerance).tolist())
        return RouteResult([self.models[i] for i in choice], scores.numpy(), perf_t.numpy(), cost_t.numpy(),
                           list(self.models))

    def route(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None, lam: float = 0.0,
              batch_size: int = 256, tolerance: float | None = None) -> RouteResult:
        """Choose a model for each query: argmax of predicted performance − λ · predicted normalised cost,
        or with `tolerance` τ the cheapest model predicted within τ of the best.

        Queries without a task (or with one the router never saw) get the task inferred from their text.
        """
        check_decision(lam, tolerance)
        feats = self.module.featurize(list(queries))
        if feats is None:
            feats = self.embed(list(queries), batch_size=batch_size)
        feats = torch.as_tensor(feats)
        idx, w = self.task_weights(queries, feats, tasks)
        result = self.route_embeddings(feats, idx, lam=lam, task_weights=w, tolerance=tolerance)
        names = list(self.module.hparams.tasks)
        result.tasks = [names[i] if i else None for i in idx[:, 0].tolist()]  # task 0: the unknown task
        return result

    def scores_over(self, queries: Sequence[str], tasks: Sequence[str | None] | None, models: Sequence[str],
                    lam: float = 0.0) -> tuple[np.ndarray, RouteResult]:
        """[N, len(models)] the predicted reward in `models`' order (a log's columns), −inf for models this
        router does not know, with the route result; ValueError when it knows none of them."""
        res = self.route(list(queries), tasks=tasks, lam=lam)
        col = {m: i for i, m in enumerate(res.candidates)}
        known = [j for j, m in enumerate(models) if m in col]
        if not known:
            raise ValueError(f"none of the router's models {res.candidates} is in the log {list(models)}")
        scores = np.full((len(res.models), len(models)), -np.inf)
        for j in known:
            scores[:, j] = res.scores[:, col[models[j]]]
        return scores, res

    def route_strong_weak(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None,
                          calibration: dict | None = None, batch_size: int = 256) -> RouteResult:
        """RouteLLM-style routing: the strong model where predicted perf(strong) − perf(weak) ≥ the calibrated
        threshold, else the weak one. `calibration` defaults to the checkpoint's (`route calibrate.*=`)."""
        cal = calibration or self.calibration
        if not cal:
            raise ValueError("this checkpoint has no strong/weak threshold: calibrate it first "
                             "(python -m fusion_lightning.route ckpt=CKPT calibrate.strong_fraction=0.3)")
        result = self.route(queries, tasks, lam=0.0, batch_size=batch_size)
        s, w = self.models.index(cal["strong"]), self.models.index(cal["weak"])
        result.strong_score = result.perf[:, s] - result.perf[:, w]
        result.models = [cal["strong"] if v >= cal["threshold"] else cal["weak"] for v in result.strong_score]
        return result
