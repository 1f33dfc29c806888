"""RouterDC (Chen et al. 2024, "RouterDC: Query-Based Router by Dual Contrastive Learning"):
score(q, m) = cos(E(q), k_m) / τ between a query encoder E and a learned embedding k_m per model.

Two contrastive losses train E and the k_m (following llmrouter-lib's port of the authors' code,
`llmrouter/models/routerdc/dcmodel.py`: `compute_sample_llm_loss`, `compute_cluster_loss`):

- sample–LLM: for each query, each of its `top_k` best-scoring models (score > 0) is a positive
  against its `last_k` worst (those scoring > 0.5 never count as negatives, as in the peer; here
  also never the positive itself or a model scoring as well as it, and never a pair the log lacks);
- sample–sample: queries are clustered by k-means on their frozen embeddings (the paper's choice; the
  peer clusters the score vectors); a query's positive is a random same-cluster query of the batch,
  its `negatives` (H) random other-cluster ones. `task_loss_weight` adds the same loss with tasks
  as the groups (the peer's task-tag variant, off by default as in the authors' script).

The encoder here is a trainable projection head over the frozen (cached) MiniLM query embedding,
not the fine-tuned mDeBERTa of the paper: what fits a CPU and the embedding cache. The project's
interface wants a score in [0, 1] and a cost per model, so two small heads read the router's
output with the gradient stopped (the contrastive losses alone shape E and k_m): a calibration
sigmoid(a · score + b) with a > 0, which keeps RouterDC's argmax at λ = 0, and a cost head on E(q)
(as MF's cost vectors on u_q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion_lightning.query.base import RouterModule, mlp_body
from fusion_lightning.query.objectives import score_cost_loss


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Centroids [k, D] of spherical k-means (k-means++ start) on L2-normalised rows of x."""
    x = F.normalize(x.float(), dim=-1)
    k = max(1, min(k, len(x)))
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d = torch.cdist(x, c).min(1).values ** 2
        p = d / d.sum() if d.sum() > 0 else torch.ones(len(x)) / len(x)
        c = torch.cat([c, x[torch.multinomial(p, 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        n = torch.bincount(assign, minlength=k).float()[:, None]
        c = torch.where(n > 0, sums / n.clamp_min(1), c)
    return c


def sample_llm_loss(score: torch.Tensor, perf: torch.Tensor, mask: torch.Tensor, top_k: int,
                    last_k: int) -> torch.Tensor:
    """RouterDC's sample–LLM contrastive loss: Σ over the top_k positives of the batch mean of
    −log softmax([s_pos, s_negatives])[pos]. Ties between equally scored models break at random."""
    perf, mask = perf.float(), mask.bool()
    jitter = 1e-6 * torch.rand_like(perf)
    top_val, top_idx = torch.where(mask, perf + jitter, float("-inf")).sort(dim=1, descending=True)
    low_val, low_idx = torch.where(mask, perf + jitter, float("inf")).sort(dim=1)
    low_val, low_idx = low_val[:, :last_k], low_idx[:, :last_k]
    neg_score = score.gather(1, low_idx)
    loss = score.new_zeros(())
    for i in range(min(top_k, perf.shape[1])):
        pos, pos_val = top_idx[:, i], top_val[:, i]
        neg_ok = (torch.isfinite(low_val) & (low_val <= 0.5 + 1e-6) & (low_val < pos_val[:, None])
                  & (low_idx != pos[:, None]))
        logits = torch.cat([score.gather(1, pos[:, None]), neg_score.masked_fill(~neg_ok, float("-inf"))], 1)
        valid = torch.isfinite(pos_val) & (pos_val > 1e-6)
        nll = -torch.log_softmax(logits, dim=1)[:, 0]
        loss = loss + torch.where(valid, nll, 0.0).mean()
    return loss


def group_contrastive_loss(h: torch.Tensor, groups: torch.Tensor, negatives: int) -> torch.Tensor:
    """RouterDC's sample–sample loss: for each query with a same-group partner and ≥ `negatives`
    other-group queries in the batch, −log softmax over cos(h, [partner, negatives]) (no temperature,
    as in the peer). 0 when no query of the batch qualifies."""
    hn = F.normalize(h, dim=-1)
    sim = hn @ hn.T
    same = groups[:, None] == groups[None, :]
    pos_ok = same & ~torch.eye(len(h), dtype=torch.bool, device=h.device)
    neg_ok = ~same
    rows = pos_ok.any(1) & (neg_ok.sum(1) >= negatives)
    if negatives < 1 or not bool(rows.any()):
        return h.new_zeros(())
    pos = torch.multinomial(pos_ok[rows].float(), 1)
    neg = torch.multinomial(neg_ok[rows].float(), negatives, replacement=False)
    logits = sim[rows].gather(1, torch.cat([pos, neg], 1))
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=h.device))


class DCRouter(RouterModule):
    """Dual-contrastive router over the frozen query embedding (see the module docstring)."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], dim: int = 128,
                 hidden_dims: tuple[int, ...] = (256,), dropout: float = 0.1, temperature: float = 1.0,
                 top_k: int = 3, last_k: int = 3, n_clusters: int = 5, cluster_loss_weight: float = 1.0,
                 task_loss_weight: float = 0.0, negatives: int = 3, cost_loss_weight: float = 0.5,
                 lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if top_k < 1 or last_k < 1:
            raise ValueError(f"model.top_k and model.last_k must be >= 1, got {top_k} and {last_k}")
        m = len(models)
        body, d = mlp_body(embed_dim, hidden_dims, dropout)
        self.encoder = nn.Sequential(body, nn.Linear(d, dim))  # E(q): a projection head on the frozen embedding
        self.model_emb = nn.Parameter(torch.randn(m, dim) * 0.78)  # k_m, the peer's N(0, 0.78²) start
        self.calib = nn.Parameter(torch.tensor([1.0, 0.0]))  # softplus(a), b of sigmoid(a·score + b)
        self.cost_head = nn.Linear(dim, m)
        self.register_buffer("centroids", torch.zeros(0, embed_dim))  # k-means on train embeddings, at fit start

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.cluster_loss_weight > 0:
            x = self.trainer.datamodule.splits["train"].tensors["x"]
            self.centroids = kmeans(x, self.hparams.n_clusters, seed=0).to(self.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if prefix + "centroids" in state_dict:  # sized at fit start: take the checkpoint's shape
            self._buffers["centroids"] = torch.empty_like(state_dict[prefix + "centroids"],
                                                          device=self._buffers["centroids"].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def clusters(self, x: torch.Tensor) -> torch.Tensor:
        """Each query's nearest k-means centroid (cosine), for the sample–sample loss."""
        return (F.normalize(x.float(), dim=-1) @ self.centroids.T).argmax(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score [B, M] = cos(E(q), k_m) / τ, E(q) [B, dim])."""
        h = self.encoder(x.float())
        score = F.normalize(h, dim=-1) @ F.normalize(self.model_emb, dim=-1).T
        return score / self.hparams.temperature, h

    def heads(self, score: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated performance logits, normalised cost), with no gradient into E or the k_m."""
        logits = F.softplus(self.calib[0]) * score.detach() + self.calib[1]
        return logits, self.cost_head(h.detach())

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cost = self.heads(*self(x))
        return torch.sigmoid(logits), cost

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        score, h = self(batch["x"])
        loss = sample_llm_loss(score, batch["perf"], batch["mask"], hp.top_k, hp.last_k)
        if hp.cluster_loss_weight > 0 and len(self.centroids):
            loss = loss + hp.cluster_loss_weight * group_contrastive_loss(h, self.clusters(batch["x"]), hp.negatives)
        if hp.task_loss_weight > 0:
            loss = loss + hp.task_loss_weight * group_contrastive_loss(h, batch["task"], hp.negatives)
        logits, cost = self.heads(score, h)
        return loss + score_cost_loss(logits, cost, batch, hp.binary, hp.cost_loss_weight)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
