"""Cascade router (FrugalGPT / AutoMix style), evaluated offline from the log's responses.

The models form a chain, cheapest first (train mean cost per call; `chain` names them explicitly).
A query goes to the first model; a learned answer-quality scorer reads the query and that model's
logged response, and the answer is accepted when the predicted score clears the threshold, else
the query escalates to the next model. The last model's answer is always accepted. The cost of a
query is the sum over **every** call it made, the rejected ones included.

The scorer is one MLP shared by all models (with a learned model embedding) over
[query embedding, response embedding, their product, model embedding], trained to predict the
logged score of each (query, response) (BCE on 0/1 scores, MSE otherwise). Models whose call or
response the log lacks on a query are skipped on it: offline there is nothing to score or pay.

The threshold sweep (0, 0.01, …, 1, then "never accept before the last") is the cascade's
cost–quality curve: its points replace the λ sweep in the routing report (AIQ, pareto.png) and
`threshold_sweep.csv` lists them. With `threshold: null` the threshold of each reward setting is
the one with the best val reward (ties: the cheaper), stored in the checkpoint and used on test.
A cascade needs the models' answers to route, so `Router.route` (query text only) cannot run it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import CatMetric

from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.query.base import MAIN_SETTING, TARGETS, RouterModule, mlp_body, split_arrays
from fusion_lightning.query.metrics import RoutingArrays, gap_closed, routing_metrics
from fusion_lightning.query.peer_metrics import arena_metrics, strong_weak_metrics

GRID = np.concatenate([np.linspace(0.0, 1.0, 101), [np.inf]])  # inf: escalate to the end of the chain


def nearest(threshold: float) -> int:
    """Index of the grid point nearest a threshold (above 1: the last, never accept before the end)."""
    return len(GRID) - 1 if threshold > 1 else int(np.abs(GRID[:-1] - threshold).argmin())


def run_cascade(quality: np.ndarray, scored: np.ndarray, logged: np.ndarray, chain: list[int],
                threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(accepted model [N], called [N, M] bool) of the chain under one threshold.

    `scored`: the pairs the scorer can read (a logged call with its response); only those are called.
    The last scored chain model of a query is accepted whatever its score. A query with no scored
    chain model falls back to its first logged chain model (else its first logged model), unscored.
    """
    n, m = quality.shape
    accepted = np.full(n, -1, np.int64)
    called = np.zeros((n, m), bool)
    waiting = np.ones(n, bool)
    in_chain = scored[:, chain]
    for j, c in enumerate(chain):
        here = waiting & in_chain[:, j]
        called[here, c] = True
        last = ~in_chain[:, j + 1:].any(axis=1)
        accept = here & ((quality[:, c] >= threshold) | last)
        accepted[accept] = c
        waiting &= ~accept
    for i in np.flatnonzero(accepted < 0):
        options = [c for c in chain if logged[i, c]] or np.flatnonzero(logged[i]).tolist() or [chain[0]]
        accepted[i] = options[0]
        called[i, options[0]] = True
    return accepted, called


def cascade_outcome(accepted: np.ndarray, called: np.ndarray, ev: RoutingArrays, setting: str) -> dict[str, float]:
    """Mean perf of the accepted answers, mean cost of all calls, and the reward w_p·perf_n − w_c·Σ cost_n."""
    rows = np.arange(len(accepted))
    wp, wc = REWARD_SETTINGS[setting]
    cost_n = np.where(called, np.nan_to_num(ev.cost_n), 0.0).sum(1)
    return {"perf": float(ev.perf[rows, accepted].mean()), "cost": float(np.where(called, ev.cost, 0.0).sum(1).mean()),
            "reward": float((wp * ev.perf_n[rows, accepted] - wc * cost_n).mean()),
            "calls": float(called.sum(1).mean())}


def cost_order(train: RoutingArrays, sizes: list[float | None]) -> list[int]:
    """Models cheapest first by train mean cost per logged call; ties (e.g. no costs) by size, then order."""
    mean = np.where(train.mask, train.cost, 0.0).sum(0) / np.maximum(train.mask.sum(0), 1)
    size = [s if s is not None else np.inf for s in sizes]
    return sorted(range(len(mean)), key=lambda i: (float(mean[i]), size[i], i))


class CascadeRouter(RouterModule):
    """Cheapest-first chain with a learned accept/escalate scorer (see the module docstring)."""

    calibrates = False  # its acceptance threshold reads its own predictions; Platt scaling stays off

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], chain: list[str] | None = None,
                 threshold: float | None = None, hidden_dims: tuple[int, ...] = (128,),
                 model_embedding_dim: int = 16, dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()  # models, tasks, encoder and normaliser: all a checkpoint needs to route
        if chain is not None:
            unknown = [c for c in chain if c not in models]
            if unknown or len(set(chain)) != len(chain) or not chain:
                raise ValueError(f"model.chain={list(chain)}: give distinct names among the log's models "
                                 f"({', '.join(models)}); unknown: {unknown}")
        self.model_emb = nn.Embedding(len(models), model_embedding_dim)
        self.body, d = mlp_body(3 * embed_dim + model_embedding_dim, hidden_dims, dropout)
        self.head = nn.Linear(d, 1)
        # the chain (model indices, cheapest first) and the val-chosen threshold per reward setting
        self.register_buffer("chain_idx", torch.tensor([models.index(c) for c in chain] if chain else [], dtype=torch.long))
        self.register_buffer("chosen", torch.full((len(REWARD_SETTINGS),), float("nan")))
        self._eval_store["resp_mask"] = CatMetric()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.hparams.chain:
            train = split_arrays(self.trainer.datamodule.splits["train"].tensors)
            self.chain_idx = torch.tensor(cost_order(train, self.hparams.model_sizes), device=self.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if prefix + "chain_idx" in state_dict:  # set at fit start: take the checkpoint's shape
            self._buffers["chain_idx"] = torch.empty_like(state_dict[prefix + "chain_idx"],
                                                          device=self._buffers["chain_idx"].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # the scorer ------------------------------------------------------------------------------
    def quality_logits(self, x: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """Logits [B, M] of each model's logged response being good, from x [B, D] and resp [B, M, D]."""
        resp = resp.float()
        q = x.float()[:, None, :].expand_as(resp)
        e = self.model_emb.weight[None].expand(len(x), -1, -1)
        return self.head(self.body(torch.cat([q, resp, q * resp, e], dim=-1))).squeeze(-1)

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("the cascade routes by scoring each model's answer, so it needs the responses: it is "
                           "evaluated offline on logged responses (fit / evaluate), not routed from a query alone")

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.quality_logits(batch["x"], batch["resp"])
        m = batch["resp_mask"].float()
        perf = batch["perf"].float()
        if self.hparams.binary:
            err = F.binary_cross_entropy_with_logits(logits, perf, reduction="none")
        else:
            err = (torch.sigmoid(logits) - perf) ** 2
        return (err * m).sum() / m.sum().clamp_min(1.0)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # offline evaluation ------------------------------------------------------------------------
    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        q = torch.sigmoid(self.quality_logits(batch["x"], batch["resp"])).detach().float()
        self._eval_store["perf_hat"].update(q)
        self._eval_store["cost_hat"].update(torch.zeros_like(q))
        self._eval_store["resp_mask"].update(batch["resp_mask"].float())
        for k in TARGETS:
            self._eval_store[k].update(batch[k].float())

    def _routing_epoch_end(self, stage: str) -> None:
        gathered = self._gathered_eval()
        if gathered is None:
            return
        store, train, ev = gathered
        quality, scored = store["perf_hat"], store["resp_mask"].astype(bool) & ev.mask
        chain = self.chain_idx.tolist()
        runs = [run_cascade(quality, scored, ev.mask, chain, t) for t in GRID]
        outcomes = [{s: cascade_outcome(a, c, ev, s) for s in REWARD_SETTINGS} for a, c in runs]
        settings = list(REWARD_SETTINGS)
        if self.hparams.threshold is not None:
            pick = [nearest(float(self.hparams.threshold))] * len(settings)
        elif stage == "val":  # the best val reward per setting, the cheaper on ties; kept for test
            pick = [max(range(len(GRID)), key=lambda i: (outcomes[i][s]["reward"], -outcomes[i][s]["cost"]))
                    for s in settings]
            with torch.inference_mode(False):  # a plain tensor: the checkpoint loads into it later
                self.chosen = torch.tensor([float(GRID[i]) for i in pick], device=self.chosen.device)
        elif bool(torch.isnan(self.chosen).any()):
            raise RuntimeError("the cascade has no threshold yet: it is chosen on val (validate before test) "
                               "or set model.threshold")
        else:
            pick = [nearest(t) for t in self.chosen.tolist()]
        onehot = {s: np.eye(ev.perf.shape[1])[runs[i][0]] for s, i in zip(settings, pick, strict=True)}
        metrics = routing_metrics(onehot, train, ev, self.hparams.model_sizes)  # baselines; router keys replaced
        for s, i in zip(settings, pick, strict=True):
            for k in ("perf", "cost", "reward"):
                metrics[f"{s}/{k}"] = outcomes[i][s][k]
        main = pick[settings.index(MAIN_SETTING)]
        accepted, called = runs[main]
        for k in ("perf", "cost", "reward"):
            metrics[k] = metrics[f"{MAIN_SETTING}/{k}"]
        metrics["gap_closed"] = gap_closed(metrics["perf"], metrics["best_single/perf"], metrics["oracle/perf"])
        metrics["cascade/threshold"] = float(min(GRID[main], 1.01))  # 1.01: never accept before the last
        metrics["cascade/calls"] = outcomes[main][MAIN_SETTING]["calls"]
        metrics["cascade/first_accepted"] = float((accepted == chain[0]).mean()) if chain else 0.0
        # RouteLLM's strong/weak view: a query "goes to strong" when the weak model's answer is rejected
        metrics.update(strong_weak_metrics(quality, train, ev, win_score=lambda s, w: -quality[:, w]))
        metrics.update(arena_metrics(metrics, train, ev))
        rows = [{"threshold": float(min(t, 1.01)), "perf": o[MAIN_SETTING]["perf"], "cost": o[MAIN_SETTING]["cost"],
                 "calls": o[MAIN_SETTING]["calls"], **{f"{s}/reward": o[s]["reward"] for s in settings}}
                for t, o in zip(GRID, outcomes, strict=True)]
        self.eval_outputs[stage] = {
            "train": train, "eval": ev, "scores": onehot, "metrics": metrics, "perf_hat": quality,
            "cost_hat": store["cost_hat"], "points": np.array([[r["cost"], r["perf"]] for r in rows]),
            "choice_costs": {"router": np.where(called, ev.cost, 0.0).sum(1)}, "sweep_rows": rows,
            "sweep_label": "cascade (threshold sweep)"}
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)
