"""MLP router: query embedding (+ learned task embedding) -> every model's score and cost."""

from __future__ import annotations

import torch
from torch import nn

from fusion_lightning.query.base import LogitRouter, mlp_body


class MLPRouter(LogitRouter):
    """Predicts performance (BCE for 0/1 scores, MSE otherwise) and normalised cost per model."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], hidden_dims: tuple[int, ...] = (128,),
                 task_embedding_dim: int = 32, dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-4,
                 cost_loss_weight: float = 0.5, lam: float = 0.0, task_prior: bool = False):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        m = len(models)
        self.task_emb = nn.Embedding(len(tasks), task_embedding_dim) if task_embedding_dim else None
        self.body, d = mlp_body(embed_dim + (task_embedding_dim or 0), hidden_dims, dropout)
        self.perf_head = nn.Linear(d, m)
        self.cost_head = nn.Linear(d, m)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task_emb is not None:
            x = torch.cat([x, self.task_emb(task)], dim=-1)
        h = self.body(x)
        return self.perf_head(h), self.cost_head(h)
