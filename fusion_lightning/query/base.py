"""The router interface: a LightningModule mapping (query embedding, task) to per-model predictions.

Every router predicts, per candidate model, the probability/score of a good answer and the
normalised cost; the routing decision is the argmax of predicted reward under the chosen setting,
so one checkpoint serves any cost weight. Evaluation on val/test is shared here.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torchmetrics.aggregation import CatMetric

from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.query.metrics import RoutingArrays, routing_metrics, task_blind_metrics
from fusion_lightning.query.objectives import score_cost_loss
from fusion_lightning.query.ope import ope_routing_metrics, truth_metrics
from fusion_lightning.query.peer_metrics import peer_metrics
from fusion_lightning.query.routers import current_path
from fusion_lightning.query.task_classifier import task_posterior

TARGETS = ("perf", "perf_n", "cost", "cost_n", "mask", "task")
# batches carry them when the DataModule has judge scores / a bandit log (propensities, reward model)
# (and `index`, each row's place in its split: what lines a simulated bandit log's truth up with the rows evaluated)
BANDIT_KEYS = ("prop", "perf_dm", "cost_dm", "perf_n_dm", "cost_n_dm")  # what a bandit log's val/test batches carry
OPTIONAL_TARGETS = ("judge", "judge_mask", *BANDIT_KEYS, "index")
BLIND = ("perf_hat_blind", "cost_hat_blind", "task_hat", "task_hat_p")  # predictions given the inferred tasks
MAIN_SETTING = "performance_first"


class RouterModule(L.LightningModule):
    """Subclasses implement `predict(x, task) -> (perf_hat [B,M] in [0,1], cost_n_hat [B,M])`."""

    def __init__(self) -> None:
        super().__init__()
        self._eval_store = torch.nn.ModuleDict(
            {k: CatMetric() for k in ("perf_hat", "cost_hat", *TARGETS, *OPTIONAL_TARGETS, *BLIND)})
        # per stage: the eval arrays, the router's predicted rewards and the metrics; callbacks read these
        # in on_validation_end / on_test_end (they run after this module's epoch-end hook)
        self.eval_outputs: dict[str, dict] = {}
        # the task classifier fitted on train (fusion_lightning.query.task_classifier): routing without a
        # task label infers it from the text, in the route API and in the task-blind metrics alike
        self.register_buffer("task_clf_weight", torch.zeros(0, 0))
        self.register_buffer("task_clf_bias", torch.zeros(0))
        # Platt scaling fitted on val after fit (fusion_lightning/callbacks/score_calibration.py): [M, 2] (a, b)
        # per model, NaN where it did not help; empty: the predictions as trained
        self.register_buffer("score_calibration", torch.zeros(0, 2))

    def on_fit_start(self) -> None:
        self.score_calibration = torch.zeros(0, 2, device=self.device)  # fitted on val after fit, for these weights
        clf = getattr(self.trainer.datamodule, "task_classifier", None)
        if clf is not None:
            self.task_clf_weight, self.task_clf_bias = (t.to(self.device) for t in clf)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "score_calibration", torch.zeros(0, 2))  # a checkpoint from before Platt scaling
        for name in ("task_clf_weight", "task_clf_bias", "score_calibration"):  # sized by the data: the checkpoint's shape
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def task_posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([N, k] probable task indices, [N, k] their weights) from embedding features; None when this
        router has no task classifier (or the features are not what it read)."""
        if self.task_clf_weight.numel() == 0 or features.shape[-1] != self.task_clf_weight.shape[1]:
            return None
        return task_posterior(features, self.task_clf_weight, self.task_clf_bias)

    # a router whose predicted performance is not a success probability (the cascade's acceptance rule reads
    # its own) opts out of Platt scaling
    calibrates = True
    # state a checkpoint from before it existed lacks (its default is used): resume checks skip it
    optional_state = ("score_calibration",)

    @staticmethod
    def class_path_now(saved: str) -> str:
        """Where a checkpoint's recorded router class lives now (the routers moved into query/routers/)."""
        return current_path(saved)

    def calibrated(self, perf: torch.Tensor) -> torch.Tensor:
        """`perf` through the stored Platt scaling, sigmoid(a · logit(p) + b), for the models that have one."""
        if self.score_calibration.numel() == 0:
            return perf
        a, b = self.score_calibration.to(perf.device, perf.dtype).unbind(1)
        z = torch.logit(perf.clamp(1e-6, 1 - 1e-6))
        return torch.where(torch.isnan(a), perf, torch.sigmoid(torch.nan_to_num(a) * z + torch.nan_to_num(b)))

    def predict_mixture(self, x: torch.Tensor, tasks: torch.Tensor,
                        weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions averaged over several candidate tasks per query ([B, k] indices and weights): how a
        router routes a query whose task it only infers. Columns with no weight are not predicted."""
        perf = cost = None
        for j in range(tasks.shape[1]):
            w = weights[:, j:j + 1].to(x.device)
            if j and not bool((w > 0).any()):
                continue
            p, c = self.predict(x, tasks[:, j].to(x.device))
            p = self.calibrated(p)
            perf, cost = (w * p, w * c) if perf is None else (perf + w * p, cost + w * c)
        return perf, cost

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict_split(self, x: torch.Tensor, task: torch.Tensor,
                      batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """([N, M] perf, [N, M] cost) as numpy: `predict` over a whole split in batches, on this module's
        device (raw: no Platt scaling). The module's train/eval mode is left as it was."""
        x, task = x.to(self.device), task.to(self.device)
        out = [self.predict(x[i:i + batch_size], task[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        if not out:
            empty = np.zeros((0, len(self.hparams.models)), np.float32)
            return empty, empty.copy()
        return tuple(torch.cat(t).float().cpu().numpy() for t in zip(*out, strict=True))  # type: ignore[return-value]

    def featurize(self, texts: list[str]) -> torch.Tensor | None:
        """Features for new query texts when the router reads more than the embedding (e.g. token ids);
        None means: embed them with the checkpoint's encoder."""
        return None

    def predicted_reward(self, perf_hat: torch.Tensor, cost_hat: torch.Tensor, setting: str) -> torch.Tensor:
        """Predicted reward under a setting; `judge` routes by predicted performance (override to predict judge)."""
        if setting == "judge":
            return perf_hat
        wp, wc = REWARD_SETTINGS[setting]
        return wp * perf_hat - wc * cost_hat

    # evaluation shared by every router -------------------------------------------------------
    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        perf_hat, cost_hat = self.predict(batch["x"], batch["task"])
        perf_hat = self.calibrated(perf_hat)
        self._eval_store["perf_hat"].update(perf_hat.detach().float())
        self._eval_store["cost_hat"].update(cost_hat.detach().float())
        for k in (*TARGETS, *OPTIONAL_TARGETS):
            if k in batch:
                self._eval_store[k].update(batch[k].float())
        if "task_hat" in batch:
            blind_perf, blind_cost = self.predict_mixture(batch["x"], batch["task_hat"], batch["task_hat_p"])
            self._eval_store["perf_hat_blind"].update(blind_perf.detach().float())
            self._eval_store["cost_hat_blind"].update(blind_cost.detach().float())
            self._eval_store["task_hat"].update(batch["task_hat"].float())
            self._eval_store["task_hat_p"].update(batch["task_hat_p"].float())

    def _gathered_eval(self) -> tuple[dict[str, np.ndarray], RoutingArrays, RoutingArrays] | None:
        """The epoch's gathered predictions and targets (the store reset for the next epoch), with the
        train and evaluated splits as arrays; None when nothing was evaluated."""
        store = {k: m.compute().cpu().numpy() for k, m in self._eval_store.items() if m.update_called}
        for m in self._eval_store.values():
            m.reset()
        if "perf" not in store or store["perf"].ndim != 2:
            return None
        return store, split_arrays(self.trainer.datamodule.splits["train"].tensors), split_arrays(store)

    def _routing_epoch_end(self, stage: str) -> None:
        gathered = self._gathered_eval()
        if gathered is None:
            return
        store, train, ev = gathered
        settings = [*REWARD_SETTINGS, *(["judge"] if ev.judge is not None and train.judge is not None else [])]
        scores = {s: self.predicted_reward(torch.from_numpy(store["perf_hat"]),
                                           torch.from_numpy(store["cost_hat"]), s).numpy()
                  for s in settings}
        if ev.bandit:  # full-information metrics are undefined here: off-policy estimates instead
            self._bandit_epoch_end(stage, store, train, ev, scores)
            return
        metrics = routing_metrics(scores, train, ev, self.hparams.model_sizes)
        metrics.update(peer_metrics(store["perf_hat"], train, ev, metrics))  # RouteLLM's and RouterArena's
        self.eval_outputs[stage] = {"train": train, "eval": ev, "scores": scores, "metrics": metrics,
                                    "perf_hat": store["perf_hat"], "cost_hat": store["cost_hat"]}
        if "task_hat" in store:
            blind = self.predicted_reward(torch.from_numpy(store["perf_hat_blind"]),
                                          torch.from_numpy(store["cost_hat_blind"]), MAIN_SETTING).numpy()
            metrics.update({f"task_blind/{k}": v for k, v in task_blind_metrics(
                blind, store["task_hat"].astype(np.int64), store["task_hat_p"], train, ev,
                self.hparams.model_sizes, MAIN_SETTING).items()})
            self.eval_outputs[stage]["blind_scores"] = blind
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)

    def _bandit_epoch_end(self, stage: str, store: dict, train: RoutingArrays, ev: RoutingArrays,
                          scores: dict[str, np.ndarray]) -> None:
        dm = self.trainer.datamodule
        bandit = getattr(dm, "bandit", None)
        metrics, report = ope_routing_metrics(
            scores, train, ev, self.hparams.model_sizes, task_names=list(self.hparams.tasks),
            logged_share=bandit.logged_share if bandit is not None else None,
            estimated=bool(bandit and bandit.estimated))
        truth = getattr(dm, "truth_arrays", lambda s: None)(stage)
        if truth is not None and "index" in store:  # a simulated bandit log: what the full log says, beside the
            # estimates, for the rows evaluated (a sanity check sees a few batches; DDP gathers ranks in its order)
            truth = truth.rows(store["index"].astype(np.int64))
            metrics.update(truth_metrics(scores, train, truth, self.hparams.model_sizes))
        self.eval_outputs[stage] = {"train": train, "eval": ev, "scores": scores, "metrics": metrics, "ope": report,
                                    "perf_hat": store["perf_hat"], "cost_hat": store["cost_hat"]}
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), prog_bar=True, batch_size=len(batch["x"]))
        self._accumulate(batch)

    def on_validation_epoch_end(self) -> None:
        self._routing_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.loss(batch), batch_size=len(batch["x"]))
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self._routing_epoch_end("test")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the class, so `Router.load` rebuilds any router from its checkpoint alone."""
        checkpoint["router_class"] = f"{type(self).__module__}.{type(self).__qualname__}"


class LogitRouter(RouterModule):
    """A router whose forward(x, task) returns (performance logits [B,M], normalised cost [B,M]),
    trained with the shared score+cost objective and AdamW (hparams `lr`, `weight_decay`).

    With hparam `task_prior: true` forward's outputs are a residual on the *task prior*: each model's
    train mean score (as a logit) and mean normalised cost on the query's task (overall means for an
    unknown task), so the router starts from the per-task lookup and learns only what the query adds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prior_perf", torch.zeros(0, 0))  # [tasks, models], built on fit start
        self.register_buffer("prior_cost", torch.zeros(0, 0))

    @property
    def uses_task_prior(self) -> bool:
        return bool(self.hparams.get("task_prior", False))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.uses_task_prior:
            t = self.trainer.datamodule.splits["train"].tensors
            perf, cost = task_prior(t["task"], t["perf"], t["cost_n"], t["mask"], len(self.hparams.tasks))
            self.prior_perf, self.prior_cost = perf.to(self.device), cost.to(self.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("prior_perf", "prior_cost"):  # built from the data: take the checkpoint's shape
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def outputs(self, x: torch.Tensor, task: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, normalised cost): forward's, or the task prior plus `scale` × forward's residual."""
        logits, cost = self(x, task)
        if not self.uses_task_prior:
            return logits, cost
        if len(self.prior_perf) == 0:
            raise RuntimeError("the task prior is empty: fit the router or load a checkpoint first")
        p = self.prior_perf[task]
        return torch.logit(p.clamp(1e-6, 1 - 1e-6)) + scale * logits, self.prior_cost[task] + scale * cost

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cost = self.outputs(x, task)
        return torch.sigmoid(logits), cost

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, cost = self.outputs(batch["x"], batch["task"])
        return score_cost_loss(logits, cost, batch, self.hparams.binary, self.hparams.cost_loss_weight)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def mlp_body(in_dim: int, hidden_dims: Sequence[int], dropout: float) -> tuple[torch.nn.Sequential, int]:
    """Linear → GELU → Dropout per hidden width (the routers' shared trunk) and its output width."""
    layers: list[torch.nn.Module] = []
    for h in hidden_dims:
        layers += [torch.nn.Linear(in_dim, h), torch.nn.GELU(), torch.nn.Dropout(dropout)]
        in_dim = h
    return torch.nn.Sequential(*layers), in_dim


def task_prior(task: torch.Tensor, perf: torch.Tensor, cost_n: torch.Tensor, mask: torch.Tensor,
               n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (task, model) train means of score and normalised cost, [n_tasks, M] each: the per-task lookup.

    Row 0 (the unknown task), tasks absent from train and (task, model) pairs never observed get the
    model's overall mean; masked pairs never count (as in the task-best baseline).
    """
    m = mask.float()
    onehot = torch.nn.functional.one_hot(task.long(), n_tasks).float().T  # [T, N]
    n = onehot @ m  # observations per (task, model)
    overall_n = m.sum(0).clamp_min(1)
    out = []
    for v in (perf.float() * m, cost_n.float() * m):
        overall = v.sum(0) / overall_n
        per_task = (onehot @ v) / n.clamp_min(1)
        table = torch.where(n > 0, per_task, overall)
        table[0] = overall
        out.append(table)
    return out[0], out[1]


def split_arrays(t: dict) -> RoutingArrays:
    """A split's targets (tensors or numpy arrays) as the metrics' arrays."""
    f = {k: np.asarray(t[k]).astype(np.float64) for k in ("perf", "cost", "perf_n", "cost_n")}
    prop, predicted = None, None
    if "prop" in t:  # a bandit log's split: evaluated off-policy
        prop = np.asarray(t["prop"]).astype(np.float64)
        predicted = {k: np.asarray(t[f"{k}_dm"]).astype(np.float64) for k in ("perf", "cost", "perf_n", "cost_n")}
    return RoutingArrays(f["perf"], f["cost"], f["perf_n"], f["cost_n"], np.asarray(t["mask"]).astype(bool),
                         np.asarray(t["task"]).astype(np.int64), _judge(t), prop, predicted)


def _judge(arrays: dict) -> np.ndarray | None:
    """Judge scores with NaN where unjudged, or None when no call in these arrays has one."""
    if "judge" not in arrays or "judge_mask" not in arrays:
        return None
    j, m = (np.asarray(arrays[k]) for k in ("judge", "judge_mask"))
    m = m.astype(bool)
    return np.where(m, j, np.nan).astype(np.float64) if m.any() else None
