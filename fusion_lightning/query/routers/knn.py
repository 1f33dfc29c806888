"""kNN router: a model's predicted score is its mean observed score on the k most similar train queries.

Averaging observed scores (rather than voting on argmax labels) keeps ties between models honest:
with 0/1 scores many models tie on a query, and argmax labels would all go to the first of them.
"Training" is building the index from the train split; it lives in buffers, so the checkpoint alone
routes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion_lightning.query.base import RouterModule

_INDEX = ("keys", "key_task", "perf", "cost_n", "mask")


class KNNRouter(RouterModule):
    """Cosine kNN over query embeddings; per-model masked (optionally similarity-weighted) means."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], k: int = 50, same_task: bool = True,
                 weighting: str = "uniform", temperature: float = 0.1, cost_loss_weight: float = 0.5,
                 chunk_size: int = 4096):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        if weighting not in ("uniform", "softmax"):
            raise ValueError(f"weighting must be 'uniform' or 'softmax', got {weighting!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.automatic_optimization = False  # nothing to optimise: fitting is indexing
        m = len(models)
        self.register_buffer("keys", torch.zeros(0, embed_dim))
        self.register_buffer("key_task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("perf", torch.zeros(0, m))
        self.register_buffer("cost_n", torch.zeros(0, m))
        self.register_buffer("mask", torch.zeros(0, m, dtype=torch.bool))
        self.register_buffer("prior_perf", torch.zeros(m))  # per-model train means, for models no neighbour has
        self.register_buffer("prior_cost", torch.zeros(m))

    # the index ---------------------------------------------------------------------------------
    def build_index(self, x: torch.Tensor, task: torch.Tensor, perf: torch.Tensor, cost_n: torch.Tensor,
                    mask: torch.Tensor) -> None:
        """Store the (normalised) train embeddings and their targets; masked pairs are zeroed and ignored."""
        dev = self.keys.device
        mask = mask.bool().to(dev)
        self.keys = F.normalize(x.float(), dim=-1).to(dev)
        self.key_task = task.long().to(dev)
        self.perf = torch.where(mask, perf.float().to(dev), 0.0)
        self.cost_n = torch.where(mask, cost_n.float().to(dev), 0.0)
        self.mask = mask
        n = mask.sum(0).clamp_min(1)
        self.prior_perf, self.prior_cost = self.perf.sum(0) / n, self.cost_n.sum(0) / n

    def on_fit_start(self) -> None:
        super().on_fit_start()
        t = self.trainer.datamodule.splits["train"].tensors
        self.build_index(t["x"], t["task"], t["perf"], t["cost_n"], t["mask"])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # the index size is only known once built: take the checkpoint's shapes before loading
        for name in _INDEX:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # prediction ----------------------------------------------------------------------------------
    def neighbours(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices [B, k] of the nearest train queries and their weights [B, k] (0 for non-neighbours)."""
        if len(self.keys) == 0:
            raise RuntimeError("the kNN index is empty: fit the router or load a checkpoint first")
        sim = F.normalize(x.float(), dim=-1) @ self.keys.T  # [B, N] cosine similarity
        if self.hparams.same_task:  # unknown task (0) searches everything
            other = (task[:, None] != self.key_task[None, :]) & (task[:, None] != 0)
            sim = sim.masked_fill(other, float("-inf"))
        top, idx = sim.topk(min(self.hparams.k, sim.shape[1]), dim=1)
        valid = torch.isfinite(top)
        if self.hparams.weighting == "softmax":
            w = torch.softmax((top / self.hparams.temperature).masked_fill(~valid, float("-inf")), dim=1)
            w = torch.nan_to_num(w, nan=0.0)  # rows without any valid neighbour
        else:
            w = valid.float()
        return idx, w

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perfs, costs = [], []
        for i in range(0, len(x), self.hparams.chunk_size):  # bounds the [B, N] similarity matrix
            idx, w = self.neighbours(x[i:i + self.hparams.chunk_size], task[i:i + self.hparams.chunk_size])
            wm = w[..., None] * self.mask[idx].float()  # [B, k, M]: weight of each observed pair
            den = wm.sum(1)
            seen = den > 0
            den = den.clamp_min(1e-12)
            perfs.append(torch.where(seen, (wm * self.perf[idx]).sum(1) / den, self.prior_perf))
            costs.append(torch.where(seen, (wm * self.cost_n[idx]).sum(1) / den, self.prior_cost))
        return torch.cat(perfs), torch.cat(costs)

    # Lightning -----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """BCE (0/1 scores) or MSE of the neighbour means, plus cost MSE: a val/loss to monitor."""
        perf_hat, cost_hat = self.predict(batch["x"], batch["task"])
        mask = batch["mask"].float()
        target = batch["perf"].float()
        if self.hparams.binary:
            perf_loss = F.binary_cross_entropy(perf_hat.clamp(1e-4, 1 - 1e-4), target, reduction="none")
        else:
            perf_loss = (perf_hat - target) ** 2
        cost_loss = (cost_hat - batch["cost_n"].float()) ** 2
        return ((perf_loss + self.hparams.cost_loss_weight * cost_loss) * mask).sum() / mask.sum().clamp_min(1.0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """No gradients: the index was built in `on_fit_start`. The step of an empty optimiser only
        advances `global_step`, which ModelCheckpoint needs before it saves the (index-holding) best."""
        self.optimizers().step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=0.0)
