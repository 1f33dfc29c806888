"""Training objective shared by routers that predict each model's score and cost."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def score_cost_loss(logits: torch.Tensor, cost: torch.Tensor, batch: dict[str, torch.Tensor], binary: bool,
                    cost_loss_weight: float) -> torch.Tensor:
    """BCE on 0/1 scores (MSE of the sigmoid otherwise) + weighted MSE of normalised cost, over logged pairs only.

    Missing (query, model) pairs are masked out, never treated as a score of 0.
    """
    mask = batch["mask"].float()
    perf = batch["perf"].float()
    if binary:
        perf_loss = F.binary_cross_entropy_with_logits(logits, perf, reduction="none")
    else:
        perf_loss = (torch.sigmoid(logits) - perf) ** 2
    cost_loss = (cost - batch["cost_n"].float()) ** 2
    return ((perf_loss + cost_loss_weight * cost_loss) * mask).sum() / mask.sum().clamp_min(1.0)
