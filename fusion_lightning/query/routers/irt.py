"""IRT router: multidimensional item response theory, P(correct) = sigmoid(a_q · θ_m − b_q).

Models are examinees with learned ability vectors θ_m; queries are items whose discrimination a_q
(non-negative, so more ability never lowers the odds) and difficulty b_q are predicted from the query
embedding (+ task embedding), so unseen queries get item parameters too. Cost is not part of IRT:
a small head predicts it, as in the MLP, and it enters at decision time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion_lightning.query.base import LogitRouter, mlp_body


def irt_logits(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """a [B, d] ≥ 0, b [B], θ [M, d] -> logits [B, M] = a · θ_m − b."""
    return a @ theta.T - b[:, None]


class IRTRouter(LogitRouter):
    """Per-model abilities θ_m; per-query discrimination a_q (softplus) and difficulty b_q from the text."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], dim: int = 16,
                 hidden_dims: tuple[int, ...] = (128,), task_embedding_dim: int = 32, dropout: float = 0.1,
                 lr: float = 1e-3, weight_decay: float = 1e-4, cost_loss_weight: float = 0.5,
                 task_prior: bool = False):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        m = len(models)
        self.task_emb = nn.Embedding(len(tasks), task_embedding_dim) if task_embedding_dim else None
        self.body, h = mlp_body(embed_dim + (task_embedding_dim or 0), hidden_dims, dropout)
        self.theta = nn.Parameter(torch.randn(m, dim) / dim ** 0.5)  # abilities
        self.disc_head = nn.Linear(h, dim)   # -> a_q after softplus
        self.diff_head = nn.Linear(h, 1)     # -> b_q
        self.cost_head = nn.Linear(h, m)

    def item_params(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a_q [B, d] ≥ 0, b_q [B], hidden [B, h]) for a batch of queries."""
        x = x.float()
        if self.task_emb is not None:
            x = torch.cat([x, self.task_emb(task)], dim=-1)
        hid = self.body(x)
        return F.softplus(self.disc_head(hid)), self.diff_head(hid).squeeze(-1), hid

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, hid = self.item_params(x, task)
        return irt_logits(a, b, self.theta), self.cost_head(hid)
