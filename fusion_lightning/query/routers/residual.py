"""Residual router: the per-task lookup plus a learned, shrunk per-query correction.

Prediction = task prior (each model's train mean score and cost on the query's task) + α · residual(x),
where the residual is a small MLP whose output layers start at zero and α is chosen on val at every
validation epoch from a grid, by val reward. With no within-task signal the selection keeps α = 0
and the router *is* the task-best lookup, decision for decision; with signal (sub-topics, query
difficulty) it gains on it. The one-SE rule (`se_factor`) keeps α at 0 unless a larger α wins on
val by more than noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fusion_lightning.query.base import LogitRouter, mlp_body, split_arrays
from fusion_lightning.query.metrics import per_query_reward, select_over_reference


class ResidualRouter(LogitRouter):
    """Task prior + α · MLP residual; α ∈ `alphas` chosen on val (`alphas: [0.0]` is the pure lookup)."""

    # buffers chosen on val, not trained: router_auto's cross-validated refit takes their median over folds
    val_selected = ("alpha",)

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], hidden_dims: Sequence[int] = (128,),
                 task_embedding_dim: int = 0, dropout: float = 0.1, lr: float = 3e-3, weight_decay: float = 1e-4,
                 cost_loss_weight: float = 0.5, alphas: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
                 se_factor: float = 1.0, setting: str = "performance_first", lam: float = 0.0):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        if not alphas or min(alphas) < 0:
            raise ValueError(f"alphas must be a non-empty list of values >= 0, got {list(alphas)}")
        m = len(models)
        self.task_emb = nn.Embedding(len(tasks), task_embedding_dim) if task_embedding_dim else None
        self.body, d = mlp_body(embed_dim + (task_embedding_dim or 0), hidden_dims, dropout)
        self.perf_head, self.cost_head = nn.Linear(d, m), nn.Linear(d, m)
        for head in (self.perf_head, self.cost_head):  # start exactly at the prior
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.register_buffer("alpha", torch.tensor(float(min(alphas))))
        self.val_alpha_rewards: dict[float, float] = {}  # the last selection's mean val reward per α

    @property
    def uses_task_prior(self) -> bool:
        return True

    @property
    def trains(self) -> bool:
        """False for the pure lookup (α can only be 0): nothing to optimise."""
        return max(self.hparams.alphas) > 0

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual (score logit, normalised cost) per model, before shrinkage."""
        x = x.float()
        if self.task_emb is not None:
            x = torch.cat([x, self.task_emb(task)], dim=-1)
        h = self.body(x)
        return self.perf_head(h), self.cost_head(h)

    def predict_at(self, x: torch.Tensor, task: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        if alpha == 0:  # the lookup itself, no logit round trip (keeps its ties and order exactly)
            return self.prior_perf[task], self.prior_cost[task]
        logits, cost = self.outputs(x, task, scale=alpha)
        return torch.sigmoid(logits), cost

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict_at(x, task, float(self.alpha))

    # α on val ------------------------------------------------------------------------------------
    @torch.no_grad()
    def select_alpha(self, val: dict[str, torch.Tensor]) -> float:
        """Set α to the grid value with the best val reward (one-SE rule against α = 0); returns it."""
        arrays = split_arrays(val)
        x, task = val["x"].to(self.device), val["task"].to(self.device)
        rewards = {}
        for a in sorted(float(v) for v in self.hparams.alphas):
            perf, cost = self.predict_at(x, task, a)
            scores = self.predicted_reward(perf, cost, self.hparams.setting).cpu().numpy()
            rewards[a] = per_query_reward(scores, arrays, self.hparams.setting)
        chosen = select_over_reference(rewards, reference=min(rewards), se_factor=self.hparams.se_factor)
        self.alpha.fill_(chosen)
        self.val_alpha_rewards = {a: float(np.mean(r)) for a, r in rewards.items()}
        return chosen

    def on_validation_epoch_start(self) -> None:
        """While fitting, pick α before the epoch's val predictions are made (weights are fixed here)."""
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        self.select_alpha(self.trainer.datamodule.splits["val"].tensors)
        self.log("val/alpha", self.alpha)
        self.log("val/residual_reward", self.residual_reward())

    def residual_reward(self) -> float:
        """The last selection's best mean val reward over α > 0: how good the residual is getting before
        the one-SE rule, so what early stopping watches (val/reward holds at the lookup's until it wins)."""
        return max([r for a, r in self.val_alpha_rewards.items() if a > 0],
                   default=max(self.val_alpha_rewards.values(), default=float("-inf")))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if not self.trains:  # the lookup: a zero loss keeps Lightning's loop (and global_step) going
            return (self.perf_head.weight * 0).sum()
        return super().training_step(batch, batch_idx)
