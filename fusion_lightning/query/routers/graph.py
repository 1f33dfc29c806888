"""Graph router (GraphRouter, Feng et al., ICLR 2025): routing as edge prediction on a task–query–LLM
graph.

LLM nodes carry the embedding of their catalog description, task nodes that of the task description,
query nodes the query embedding; query–LLM edges carry the observed normalised performance and cost.
A small heterogeneous graph transformer (TransformerConv with edge features) encodes the graph; a
query–LLM edge is then predicted from the two node embeddings plus an *edge readout*: the query
attends over the queries that LLM was observed on and reads their scores. Training scores a batch of
training queries with their own LLM edges left out of the graph, so it never reads its answers.

Nothing is keyed by a learned LLM id, so a model can join after training from its description and a
handful of scores (`add_model`). Training prepares for that: each step shows some LLMs with only
4–32 of their edges and without their node embedding in the decoder, exactly as an added model is
seen; the decoder corrects the readout's estimate rather than replacing it. New queries join through
their task node and their nearest training queries. The training graph is the context and lives in
buffers, so the checkpoint alone routes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import HeteroConv, TransformerConv

from fusion_lightning.data.matrix import TaskNormaliser
from fusion_lightning.io import atomic_open
from fusion_lightning.query.base import RouterModule
from fusion_lightning.query.graph_data import (
    CONTEXT_KEYS,
    EDGE_DIMS,
    LLM,
    LLM_TO_QUERY,
    NODE_TYPES,
    QUERY,
    build_graph,
    knn,
)


class GraphRouter(RouterModule):
    """Heterogeneous GNN over task, query and LLM nodes; predicts score (BCE/MSE) and cost per
    query–LLM edge."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], hidden_dim: int = 64, num_layers: int = 2,
                 heads: int = 2, knn_k: int = 8, dropout: float = 0.1, edge_dropout: float = 0.2,
                 description_dropout: float = 0.5, few_shot_prob: float = 0.3,
                 readout_temperature: float = 0.1, lr: float = 2e-3, weight_decay: float = 1e-4,
                 cost_loss_weight: float = 0.5, lam: float = 0.0, predict_chunk: int = 1024):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser; the graph itself is in buffers
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by heads ({heads})")
        m, d, h = len(models), embed_dim, hidden_dim
        # the context graph (sizes known once built; `_load_from_state_dict` takes a checkpoint's shapes)
        self.register_buffer("ctx_x", torch.zeros(0, d))
        self.register_buffer("ctx_task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ctx_perf_n", torch.zeros(0, m))
        self.register_buffer("ctx_cost_n", torch.zeros(0, m))
        self.register_buffer("ctx_mask", torch.zeros(0, m, dtype=torch.bool))
        self.register_buffer("ctx_knn", torch.zeros(0, knn_k, dtype=torch.long))
        self.register_buffer("ctx_knn_sim", torch.zeros(0, knn_k))
        self.register_buffer("llm_x", torch.zeros(m, d))
        self.register_buffer("task_x", torch.zeros(len(tasks), d))
        self.register_buffer("llm_new", torch.zeros(m, dtype=torch.bool))  # added after training
        self.proj = nn.ModuleDict({t: nn.Linear(d, h) for t in NODE_TYPES})
        self.convs = nn.ModuleList(
            HeteroConv({et: TransformerConv(h, h // heads, heads=heads, edge_dim=e, dropout=dropout)
                        for et, e in EDGE_DIMS.items()}, aggr="sum")
            for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.ModuleDict({t: nn.LayerNorm(h) for t in NODE_TYPES})
                                   for _ in range(num_layers))
        # edge readout: each query attends over the queries an LLM was observed on and reads their scores
        self.read_q, self.read_k = nn.Linear(h, h), nn.Linear(h, h)
        self.read_log_temp = nn.Parameter(torch.tensor(float(np.log(readout_temperature))))
        self.decoder = nn.Sequential(nn.Linear(3 * h + 2 * heads + 2, h), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(h, 2))

    # the context graph -------------------------------------------------------------------------
    @property
    def context(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in CONTEXT_KEYS}

    def build_context(self, x: torch.Tensor, task: torch.Tensor, perf_n: torch.Tensor, cost_n: torch.Tensor,
                      mask: torch.Tensor, llm_x: torch.Tensor, task_x: torch.Tensor) -> None:
        """Store the training queries, their observed edges and the description features as the context."""
        dev = self.ctx_x.device
        mask = mask.bool().to(dev)
        self.ctx_x, self.ctx_task = x.float().to(dev), task.long().to(dev)
        self.ctx_perf_n = torch.where(mask, perf_n.float().to(dev), 0.0)
        self.ctx_cost_n = torch.where(mask, cost_n.float().to(dev), 0.0)
        self.ctx_mask = mask
        self.ctx_knn, self.ctx_knn_sim = knn(self.ctx_x, self.ctx_x, self.hparams.knn_k, exclude_offset=0)
        self.llm_x, self.task_x = llm_x.float().to(dev), task_x.float().to(dev)
        self.llm_new = torch.zeros(len(llm_x), dtype=torch.bool, device=dev)

    def setup(self, stage: str) -> None:
        """The train split becomes the context (a checkpoint restored afterwards brings its own)."""
        dm = getattr(self.trainer, "datamodule", None)
        if len(self.ctx_x) or dm is None or not hasattr(dm, "description_embeddings"):
            return
        t, desc = dm.splits["train"].tensors, dm.description_embeddings()
        self.build_context(t["x"], t["task"], t["perf_n"], t["cost_n"], t["mask"],
                           torch.from_numpy(desc["models"]), torch.from_numpy(desc["tasks"]))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in CONTEXT_KEYS:  # the context's size is the checkpoint's, not the constructor's
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name],
                                                       device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # the network -------------------------------------------------------------------------------
    def forward(self, g: HeteroData, rows: torch.Tensor, new: torch.Tensor,
                hide: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the graph, then score every LLM for query nodes `rows`: (perf logits, cost) [B, M].

        new: [M] bool, LLMs known by their edges only (added after training, or simulated in training):
          the decoder does not see their node embedding, which it could only mistake for a trained LLM's.
        hide: [M] bool, LLMs whose description features are zeroed (description dropout).
        """
        x = dict(g.x_dict)
        if hide is not None:
            x[LLM] = x[LLM] * ~hide[:, None]
        h = {t: self.proj[t](x[t]) for t in NODE_TYPES}
        for conv, norm in zip(self.convs, self.norms, strict=True):
            out = conv(h, g.edge_index_dict, g.edge_attr_dict)
            h = {t: norm[t](h[t] + F.dropout(F.gelu(out[t]), self.hparams.dropout, self.training))
                 for t in NODE_TYPES}
        hq, hl = h[QUERY][rows], h[LLM] * ~new[:, None]
        b, m = len(hq), len(hl)
        read = self._readout(hq, h[QUERY], x[QUERY], rows, g[LLM_TO_QUERY].edge_index,
                             g[LLM_TO_QUERY].edge_attr, m)
        flag = new.float()[None, :, None].expand(b, m, 1)
        pair = torch.cat([hq[:, None].expand(b, m, -1), hl[None].expand(b, m, -1), hq[:, None] * hl[None],
                          read, flag], -1)
        # the decoder corrects the readout's estimate rather than replacing it, so a model that joins
        # with a handful of edges is scored from those edges
        seen = read[..., -1:] > 0
        prior = torch.cat([torch.logit(read[..., 0:-1:2].mean(-1, keepdim=True).clamp(0.02, 0.98)),
                           read[..., 1:-1:2].mean(-1, keepdim=True)], -1)
        out = self.decoder(pair) + torch.where(seen, prior, 0.0)
        return out[..., 0], out[..., 1]

    def _readout(self, hq: torch.Tensor, hctx: torch.Tensor, xctx: torch.Tensor, rows: torch.Tensor,
                 edges: torch.Tensor, attr: torch.Tensor, m: int) -> torch.Tensor:
        """[B, M, 2·heads + 1]: per LLM, attention-weighted (perf_n, cost_n) over the queries it was
        observed on, and log(1 + #edges). Why: a model added with ten scores is best judged by how
        the query compares with those ten queries; a node embedding pooled from them is too coarse.
        Attention = embedding cosine / temperature (a kNN prior that works from step one) + learned."""
        heads = self.hparams.heads
        b, d = len(hq), hq.shape[1] // heads
        q, k = self.read_q(hq).view(b, heads, d), self.read_k(hctx).view(len(hctx), heads, d)
        xn = F.normalize(xctx, dim=-1)
        cos = (xn[rows] @ xn.T / self.read_log_temp.exp())[:, None]  # [B, 1, N]
        out = hq.new_zeros(b, m, 2 * heads + 1)
        for j in range(m):
            sel = edges[0] == j
            if not sel.any():
                continue
            src = edges[1][sel]
            a = (torch.einsum("bhd,nhd->bhn", q, k[src]).mul(d ** -0.5) + cos[..., src]).softmax(-1)
            out[:, j, :-1] = (a @ attr[sel]).reshape(b, 2 * heads)
            out[:, j, -1] = torch.log1p(sel.sum().float())
        return out

    def _scores(self, x: torch.Tensor | None, task: torch.Tensor | None,
                index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context rows `index` with their LLM edges hidden (training), else `x` as new query nodes."""
        if len(self.ctx_x) == 0:
            raise RuntimeError("the graph router has no context graph: fit it or load a checkpoint first")
        k = self.hparams.knn_k
        if index is not None:
            keep, few = self._edge_sample()
            hide = torch.rand(len(few), device=few.device) < self.hparams.description_dropout
            g = build_graph(self.context, drop=index, k=k, keep=keep)
            return self(g, index, few | self.llm_new, hide)
        g = build_graph(self.context, new_x=x, new_task=task, k=k)
        return self(g, len(self.ctx_x) + torch.arange(len(x), device=x.device), self.llm_new)

    def _edge_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Context edges kept in a training step: each with 1 - edge_dropout, and for LLMs drawn with
        few_shot_prob only 4-32 of them, as `add_model` will give a new model. Returns (keep, few)."""
        mask = self.ctx_mask
        keep = torch.rand(mask.shape, device=mask.device) >= self.hparams.edge_dropout
        few = torch.rand(mask.shape[1], device=mask.device) < self.hparams.few_shot_prob
        if few.any():
            want = torch.randint(4, 33, (mask.shape[1],), device=mask.device).float()
            few_keep = torch.rand(mask.shape, device=mask.device) < want / mask.sum(0).clamp_min(1)
            keep[:, few] = few_keep[:, few]
        return keep, few

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked: new queries do not see each other, so chunks only bound memory, never change results."""
        out = [self._scores(x[i:i + self.hparams.predict_chunk], task[i:i + self.hparams.predict_chunk])
               for i in range(0, len(x), self.hparams.predict_chunk)]
        if not out:
            return x.new_zeros(0, len(self.llm_x)), x.new_zeros(0, len(self.llm_x))
        return torch.sigmoid(torch.cat([o[0] for o in out])), torch.cat([o[1] for o in out])

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.training:
            if "index" not in batch:
                raise ValueError("GraphRouter trains on RouterDataModule batches: they carry each query's "
                                 "train-split `index`, whose edges are hidden while it is scored")
            logits, cost = self._scores(batch["x"], batch["task"], index=batch["index"])
        else:
            logits, cost = self._scores(batch["x"], batch["task"])
        mask = batch["mask"].float()
        if self.hparams.binary:
            perf_loss = F.binary_cross_entropy_with_logits(logits, batch["perf"].float(), reduction="none")
        else:
            perf_loss = (torch.sigmoid(logits) - batch["perf"].float()) ** 2
        cost_loss = (cost - batch["cost_n"].float()) ** 2
        total = (perf_loss + self.hparams.cost_loss_weight * cost_loss) * mask
        return total.sum() / mask.sum().clamp_min(1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)

    # new models without retraining -------------------------------------------------------------
    @torch.no_grad()
    def add_model(self, name: str, description_embedding: torch.Tensor | np.ndarray,
                  observed: Mapping[Any, float], cost_per_call: float | None = None,
                  params_b: float | None = None, match_threshold: float = 0.999) -> int:
        """Insert an LLM node with its observed scores into the context; `predict` then has its column.

        observed: score per query, keyed by context row (index into the train split) or by query
          embedding (the context query with cosine >= match_threshold, else a new context query of
          unknown task).
        cost_per_call: cost of one call in the log's units (e.g. USD), normalised per task like the
          training costs; None assumes the context's mean normalised cost.
        Returns the new model's column.
        """
        if name in self.hparams.models:
            raise ValueError(f"model {name!r} is already a candidate")
        if not observed:
            raise ValueError("add_model needs at least one observed score to place the model in the graph")
        dev = self.ctx_x.device
        rows: list[int] = []
        for key in observed:
            if isinstance(key, (int, np.integer)):
                if not 0 <= int(key) < len(self.ctx_x):
                    raise ValueError(f"observed query row {key} is outside the context "
                                     f"(0..{len(self.ctx_x) - 1})")
                rows.append(int(key))
                continue
            e = torch.as_tensor(key, dtype=torch.float32, device=dev).reshape(1, -1)
            j, s = knn(e, self.ctx_x, 1)
            rows.append(int(j[0, 0]) if s.numel() and s[0, 0] >= match_threshold else self._append_query(e))
        scores = np.array([float(v) for v in observed.values()], np.float32)
        norm = TaskNormaliser.from_state_dict(self.hparams.normaliser)
        r = torch.tensor(rows, device=dev)
        tasks = np.array(self.hparams.tasks, dtype=object)[self.ctx_task[r].cpu().numpy()]
        if cost_per_call is None:
            cost_n = np.full(len(rows), float(self.ctx_cost_n[self.ctx_mask].mean()), np.float32)
        else:
            cost_n = norm.cost(np.full(len(rows), cost_per_call, np.float32), tasks)

        def column(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, torch.zeros(len(t), 1, dtype=t.dtype, device=dev)], dim=1)

        self.ctx_perf_n, self.ctx_cost_n, self.ctx_mask = column(self.ctx_perf_n), column(self.ctx_cost_n), \
            column(self.ctx_mask)
        self.ctx_perf_n[r, -1] = torch.as_tensor(norm.performance(scores, tasks), device=dev)
        self.ctx_cost_n[r, -1] = torch.as_tensor(cost_n, device=dev)
        self.ctx_mask[r, -1] = True
        desc = torch.as_tensor(description_embedding, dtype=torch.float32, device=dev).reshape(1, -1)
        self.llm_x = torch.cat([self.llm_x, desc])
        self.llm_new = torch.cat([self.llm_new, self.llm_new.new_ones(1)])
        self.hparams.models = [*self.hparams.models, name]
        self.hparams.model_sizes = [*self.hparams.model_sizes, params_b]
        return len(self.hparams.models) - 1

    def _append_query(self, e: torch.Tensor) -> int:
        """A query the context lacks becomes a context node (unknown task) linked to its neighbours."""
        j, s = knn(e, self.ctx_x, self.ctx_knn.shape[1])
        self.ctx_knn, self.ctx_knn_sim = torch.cat([self.ctx_knn, j]), torch.cat([self.ctx_knn_sim, s])
        self.ctx_x = torch.cat([self.ctx_x, e])
        self.ctx_task = torch.cat([self.ctx_task, self.ctx_task.new_zeros(1)])
        for name in ("ctx_perf_n", "ctx_cost_n", "ctx_mask"):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(1, t.shape[1])]))
        return len(self.ctx_x) - 1

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint that `Router.load` reads, e.g. after `add_model` (no Trainer needed)."""
        ckpt = {"state_dict": self.state_dict(), "hyper_parameters": dict(self.hparams),
                "pytorch-lightning_version": L.__version__}
        self.on_save_checkpoint(ckpt)
        with atomic_open(path) as fh:
            torch.save(ckpt, fh)
        return Path(path)
