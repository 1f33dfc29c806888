"""Matrix-factorisation router (RouteLLM-style): score(q, m) = u_q · v_m + bias_m.

Every model is a learned vector v_m; a query is its embedding projected to the same space (plus an
optional task embedding). The low-rank bilinear form shares strength across models, which helps when
each model has few observed scores. Cost has its own model vectors on the same u_q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion_lightning.query.base import LogitRouter


class MFRouter(LogitRouter):
    """Bilinear query × model scores: sigmoid(u_q · v_m + b_m) for performance, u_q · c_m + d_m for cost."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], dim: int = 64, task_embedding: bool = True,
                 normalize_models: bool = False, dropout: float = 0.3, lr: float = 3e-3,
                 weight_decay: float = 1e-4, cost_loss_weight: float = 0.5, task_prior: bool = False):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        m = len(models)
        self.query_proj = nn.Linear(embed_dim, dim)
        self.task_emb = nn.Embedding(len(tasks), dim) if task_embedding else None
        if self.task_emb is not None:
            nn.init.zeros_(self.task_emb.weight)  # start from the text alone; tasks add an offset
        self.dropout = nn.Dropout(dropout)
        self.model_vecs = nn.Parameter(torch.randn(m, dim) / dim ** 0.5)
        self.model_bias = nn.Parameter(torch.zeros(m))
        self.cost_vecs = nn.Parameter(torch.randn(m, dim) / dim ** 0.5)
        self.cost_bias = nn.Parameter(torch.zeros(m))

    def query_vector(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """u_q [B, dim]: the projected query embedding plus its task's offset."""
        u = self.query_proj(x.float())
        if self.task_emb is not None:
            u = u + self.task_emb(task)
        return self.dropout(u)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.query_vector(x, task)
        v = F.normalize(self.model_vecs, dim=-1) if self.hparams.normalize_models else self.model_vecs
        return u @ v.T + self.model_bias, u @ self.cost_vecs.T + self.cost_bias

