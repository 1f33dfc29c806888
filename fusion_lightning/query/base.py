"""The router interface: a LightningModule mapping (query embedding, task) to per-model predictions.

Every router predicts, per candidate model, the probability/score of a good answer and the
normalised cost; the routing decision is the argmax of predicted reward under the chosen setting,
so one checkpoint serves any cost weight. Evaluation on val/test is shared here.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torchmetrics.aggregation import CatMetric

from fusion_lightning.data.matrix import REWARD_SETTINGS
from fusion_lightning.query.metrics import RoutingArrays, routing_metrics
from fusion_lightning.query.objectives import score_cost_loss

TARGETS = ("perf", "perf_n", "cost", "cost_n", "mask", "task")
OPTIONAL_TARGETS = ("judge", "judge_mask")  # batches carry them when the DataModule has judge scores


class RouterModule(L.LightningModule):
    """Subclasses implement `predict(x, task) -> (perf_hat [B,M] in [0,1], cost_n_hat [B,M])`."""

    def __init__(self) -> None:
        super().__init__()
        self._eval_store = torch.nn.ModuleDict(
            {k: CatMetric() for k in ("perf_hat", "cost_hat", *TARGETS, *OPTIONAL_TARGETS)})
        # per stage: the eval arrays, the router's predicted rewards and the metrics; callbacks read these
        # in on_validation_end / on_test_end (they run after this module's epoch-end hook)
        self.eval_outputs: dict[str, dict] = {}

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

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
        self._eval_store["perf_hat"].update(perf_hat.detach().float())
        self._eval_store["cost_hat"].update(cost_hat.detach().float())
        for k in (*TARGETS, *OPTIONAL_TARGETS):
            if k in batch:
                self._eval_store[k].update(batch[k].float())

    def _routing_epoch_end(self, stage: str) -> None:
        store = {k: m.compute().cpu().numpy() for k, m in self._eval_store.items() if m.update_called}
        for m in self._eval_store.values():
            m.reset()
        if "perf" not in store or store["perf"].ndim != 2:
            return
        dm = self.trainer.datamodule
        tr = dm.splits["train"].tensors
        train = RoutingArrays(*(tr[k].numpy().astype(np.float64) for k in ("perf", "cost", "perf_n", "cost_n")),
                              tr["mask"].numpy().astype(bool), tr["task"].numpy(), _judge(tr))
        ev = RoutingArrays(store["perf"], store["cost"], store["perf_n"], store["cost_n"],
                           store["mask"].astype(bool), store["task"].astype(np.int64), _judge(store))
        settings = [*REWARD_SETTINGS, *(["judge"] if ev.judge is not None and train.judge is not None else [])]
        scores = {s: self.predicted_reward(torch.from_numpy(store["perf_hat"]),
                                           torch.from_numpy(store["cost_hat"]), s).numpy()
                  for s in settings}
        metrics = routing_metrics(scores, train, ev, self.hparams.model_sizes)
        self.eval_outputs[stage] = {"train": train, "eval": ev, "scores": scores, "metrics": metrics,
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
    trained with the shared score+cost objective and AdamW (hparams `lr`, `weight_decay`)."""

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cost = self(x, task)
        return torch.sigmoid(logits), cost

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, cost = self(batch["x"], batch["task"])
        return score_cost_loss(logits, cost, batch, self.hparams.binary, self.hparams.cost_loss_weight)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _judge(arrays: dict) -> np.ndarray | None:
    """Judge scores with NaN where unjudged, or None when no call in these arrays has one."""
    if "judge" not in arrays or "judge_mask" not in arrays:
        return None
    j, m = (np.asarray(arrays[k]) for k in ("judge", "judge_mask"))
    m = m.astype(bool)
    return np.where(m, j, np.nan).astype(np.float64) if m.any() else None
