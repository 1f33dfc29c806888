"""Bradley–Terry (Elo) routers from pairwise battles: global ratings, or RouteLLM's similarity-weighted ones.

P(i beats j) = sigmoid(r_i - r_j). Ratings are the maximum a posteriori fit of the battles (a tie is half a
win for each side, as RouteLLM's `compute_elo_mle_with_tie` counts it: one tie = one win each over the
battles duplicated) under an L2 prior `l2/2 · |r|²`, which keeps an unbeaten model finite. Fitted by batched
Newton steps on the win-count matrices, so a per-query refit is cheap.

`variant: sw` is RouteLLM's "sw_ranking" router (lm-sys/RouteLLM, routellm/routers/routers.py,
SWRankingRouter.get_weightings; the fit in routellm/routers/similarity_weighted/utils.py): the ratings are
re-fit per query with each train battle weighted by 10 · 10^(sim / max sim), sim the cosine similarity of its
prompt's embedding to the query's and max sim the largest over the train prompts. Here the weights are scaled
to average 1 per battle (RouteLLM's factor 10 then cancels), so the prior weighs the same in both variants.

What a router predicts per model is its expected win rate against a uniformly drawn other candidate — a
preference, not a task score (for two models it is RouteLLM's strong-model win rate). The normalised cost is
each model's train mean where the log has costs (zero for a preference log, which has none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from fusion_lightning.query.base import RouterModule

ELO_SCALE = 400.0 / math.log(10.0)  # one rating unit in Elo points (base 10, scale 400)
ELO_INIT = 1000.0
VARIANTS = ("global", "sw")
_FITTED = ("ratings", "keys", "wins", "prior_cost")


def fit_bt(wins: torch.Tensor, l2: float = 1.0, max_iter: int = 100, tol: float = 1e-7,
           max_step: float = 4.0) -> torch.Tensor:
    """Ratings [..., M] maximising sum_ij wins[..., i, j] · log sigmoid(r_i - r_j) - l2/2 · |r|².

    Newton's method, batched over the leading dimensions; a step longer than `max_step` (in any coordinate)
    is scaled down, which keeps it a descent direction on this strictly convex objective."""
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (an unbeaten model's rating is otherwise infinite), got {l2}")
    w = wins.double()
    n = w + w.transpose(-1, -2)
    m = w.shape[-1]
    r = torch.zeros(w.shape[:-1], dtype=torch.float64, device=w.device)
    eye = torch.eye(m, dtype=torch.float64, device=w.device)
    for _ in range(max_iter):
        p = torch.sigmoid(r[..., :, None] - r[..., None, :])
        grad = (n * p - w).sum(-1) + l2 * r
        h = n * p * (1 - p)
        hess = torch.diag_embed(h.sum(-1)) - h + l2 * eye
        step = torch.linalg.solve(hess, grad[..., None])[..., 0]
        longest = step.abs().amax(-1, keepdim=True)
        step = step * torch.clamp(max_step / longest.clamp_min(1e-30), max=1.0)
        r = r - step
        if float(longest.max()) < tol:
            break
    return r.float()


def win_rates(ratings: torch.Tensor) -> torch.Tensor:
    """[B, M] expected win rate of each model against a uniformly drawn other one."""
    m = ratings.shape[-1]
    if m < 2:
        return torch.full_like(ratings, 0.5)
    p = torch.sigmoid(ratings[..., :, None] - ratings[..., None, :])
    return (p.sum(-1) - 0.5) / (m - 1)  # less the diagonal's sigmoid(0)


def similarity_weights(sim: torch.Tensor, base: float = 10.0) -> torch.Tensor:
    """RouteLLM's weights base^(sim / max sim) per query row (its 10x factor dropped: it cancels)."""
    max_sim = sim.amax(-1, keepdim=True).clamp_min(1e-6)
    return torch.pow(torch.tensor(base, dtype=sim.dtype, device=sim.device), sim / max_sim)


class BTRouter(RouterModule):
    """Bradley–Terry ratings from the DataModule's train battles (`PairwiseDataModule.pairs`)."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], pairs_from: str = "scores",
                 variant: str = "sw", l2: float = 1.0, weight_base: float = 10.0, max_iter: int = 100,
                 chunk_size: int = 256):
        super().__init__()
        self.save_hyperparameters()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if weight_base <= 1:
            raise ValueError(f"weight_base must be > 1 (more similar prompts weigh more), got {weight_base}")
        self.automatic_optimization = False  # nothing to optimise by gradient: fitting is the MLE in on_fit_start
        m = len(models)
        self.register_buffer("ratings", torch.zeros(m))  # the global fit (the sw variant's baseline too)
        self.register_buffer("keys", torch.zeros(0, embed_dim))  # sw: normalised train prompt embeddings
        self.register_buffer("wins", torch.zeros(0, m, m))  # sw: per train prompt, wins[i, j] of i over j
        self.register_buffer("prior_cost", torch.zeros(m))
        self.summary_fields: dict = {}

    # fitting -----------------------------------------------------------------------------------------
    def fit_battles(self, wins, keys: torch.Tensor | None = None, cost_n: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> None:
        """Fit from per-prompt win counts [Q, M, M] (and, for sw, the prompts' embeddings [Q, D])."""
        wins = torch.as_tensor(wins, dtype=torch.float32, device=self.ratings.device)
        self.ratings = fit_bt(wins.sum(0), self.hparams.l2, self.hparams.max_iter).to(self.ratings.device)
        if self.hparams.variant == "sw":
            if keys is None:
                raise ValueError("the sw variant needs the train prompts' embeddings")
            self.keys = F.normalize(keys.float(), dim=-1).to(self.ratings.device)
            self.wins = wins
        if cost_n is not None and mask is not None:
            mk = mask.bool()
            self.prior_cost = (torch.where(mk, cost_n.float(), 0.0).sum(0) / mk.sum(0).clamp_min(1)).to(
                self.ratings.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        train = dm.pairs["train"]
        if len(train) == 0:
            hint = (" (a bandit log: one model per query has nothing to compare; battles need two answers to one "
                    "query)") if dm.logs.bandit else ""
            raise ValueError(f"no train battles: the train split has no pair of models to compare{hint}")
        t = dm.splits["train"].tensors
        self.fit_battles(train.wins(), dm.pair_x["train"], t.get("cost_n"), t.get("mask"))
        elo = {m: round(ELO_INIT + ELO_SCALE * float(r), 1) for m, r in zip(self.hparams.models, self.ratings,
                                                                               strict=True)}
        self.summary_fields = {"pairs_from": train.pairs_from, "bt": {
            "variant": self.hparams.variant, "train_battles": len(train),
            "train_ties": int((train.outcome == 0.5).sum()), "elo": dict(sorted(elo.items(), key=lambda kv: -kv[1]))}}
        rank_zero_info(f"router_bt ({self.hparams.variant}): {len(train)} train battles, "
                       f"pairs from {train.pairs_from}")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in _FITTED:  # sized by the data: take the checkpoint's shapes
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # prediction --------------------------------------------------------------------------------------
    def query_ratings(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M] ratings per query: the global ones, or (sw) re-fit from similarity-weighted battles."""
        if self.hparams.variant == "global":
            return self.ratings.expand(len(x), -1)
        if len(self.keys) == 0:
            raise RuntimeError("the sw router has no battles: fit it or load a checkpoint first")
        m = len(self.hparams.models)
        flat = self.wins.reshape(len(self.wins), m * m)
        per_prompt = flat.sum(1)  # battles per train prompt
        total = per_prompt.sum()
        out = []
        for i in range(0, len(x), self.hparams.chunk_size):
            sim = F.normalize(x[i:i + self.hparams.chunk_size].float(), dim=-1) @ self.keys.T
            w = similarity_weights(sim, self.hparams.weight_base)
            w = w * (total / (w @ per_prompt).clamp_min(1e-12))[:, None]  # mean weight 1 per battle
            out.append(fit_bt((w @ flat).reshape(-1, m, m), self.hparams.l2, self.hparams.max_iter))
        return torch.cat(out) if out else torch.zeros(0, m, device=x.device)

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.query_ratings(x)
        return win_rates(r), self.prior_cost.expand(len(x), -1)

    # Lightning ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """No gradients: the ratings were fitted in `on_fit_start`; the empty optimiser's step only advances
        `global_step`, which ModelCheckpoint needs before it saves."""
        self.optimizers().step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=0.0)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "perf" in batch:  # a score log: the shared routing evaluation; the loss is the battles' (epoch end)
            self._accumulate(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._pairwise_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._pairwise_epoch_end("test")

    def _pairwise_epoch_end(self, stage: str) -> None:
        """`<stage>/loss` (mean log loss per held-out battle), `pairwise_acc`, `chosen_win_rate` and the
        global ratings' and best single model's values, over the DataModule's battles of this split."""
        dm = self.trainer.datamodule
        pairs, x = dm.pairs.get(stage), dm.pair_x.get(stage)
        if pairs is None or len(pairs) == 0:
            return
        with torch.no_grad():
            r = self.query_ratings(x.to(self.ratings.device))
        metrics = pairwise_metrics(r, pairs, self.ratings)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)


def pairwise_metrics(ratings: torch.Tensor, pairs, global_ratings: torch.Tensor) -> dict[str, float]:
    """Held-out battle metrics of per-query ratings [Q, M] (pairs: a PreferenceTable of the same queries).

    loss: mean binary log loss of sigmoid(r_a - r_b) against the outcome (ties 0.5); pairwise_acc: share of
    decisive battles whose winner has the higher rating (equal ratings count half); chosen_win_rate: over the
    battles the router's choice for the prompt (its top-rated model) took part in, the share it won (ties
    half), with chosen_battles their share of all battles; global/... and best_single/...: the same for the
    global ratings and for always choosing the globally top-rated model."""
    q = torch.as_tensor(pairs.query, dtype=torch.long, device=ratings.device)
    a = torch.as_tensor(pairs.a, dtype=torch.long, device=ratings.device)
    b = torch.as_tensor(pairs.b, dtype=torch.long, device=ratings.device)
    y = torch.as_tensor(pairs.outcome, dtype=torch.float32, device=ratings.device)
    decisive = y != 0.5

    def scores(r: torch.Tensor) -> dict[str, float]:
        d = r[q, a] - r[q, b]
        loss = F.binary_cross_entropy_with_logits(d, y)
        right = torch.where(d == 0, 0.5, ((d > 0) == (y == 1.0)).float())
        out = {"loss": float(loss), "pairwise_acc": float(right[decisive].mean()) if decisive.any() else float("nan")}
        out.update(_chosen(win_rates(r).argmax(-1)[q], a, b, y))
        return out

    out = scores(ratings)
    glob = scores(global_ratings.to(ratings.device).expand_as(ratings))
    out.update({f"global/{k}": v for k, v in glob.items()})
    best = torch.full_like(q, int(global_ratings.argmax()))
    out.update({f"best_single/{k}": v for k, v in _chosen(best, a, b, y).items()})
    return out


def _chosen(choice: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    in_a, in_b = choice == a, choice == b
    played = in_a | in_b
    won = torch.where(in_a, y, 1.0 - y)
    return {"chosen_win_rate": float(won[played].mean()) if played.any() else float("nan"),
            "chosen_battles": float(played.float().mean())}
