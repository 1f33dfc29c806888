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

TARGETS = ("perf", "perf_n", "cost", "cost_n", "mask", "task")


class RouterModule(L.LightningModule):
    """Subclasses implement `predict(x, task) -> (perf_hat [B,M] in [0,1], cost_n_hat [B,M])`."""

    def __init__(self) -> None:
        super().__init__()
        self._eval_store = torch.nn.ModuleDict(
            {k: CatMetric() for k in ("perf_hat", "cost_hat", *TARGETS)})
        # per stage: the eval arrays, the router's predicted rewards and the metrics; callbacks read these
        # in on_validation_end / on_test_end (they run after this module's epoch-end hook)
        self.eval_outputs: dict[str, dict] = {}

    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predicted_reward(self, perf_hat: torch.Tensor, cost_hat: torch.Tensor, setting: str) -> torch.Tensor:
        wp, wc = REWARD_SETTINGS[setting]
        return wp * perf_hat - wc * cost_hat

    # evaluation shared by every router -------------------------------------------------------
    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        perf_hat, cost_hat = self.predict(batch["x"], batch["task"])
        self._eval_store["perf_hat"].update(perf_hat.detach().float())
        self._eval_store["cost_hat"].update(cost_hat.detach().float())
        for k in TARGETS:
            self._eval_store[k].update(batch[k].float())

    def _routing_epoch_end(self, stage: str) -> None:
        store = {k: m.compute().cpu().numpy() for k, m in self._eval_store.items()}
        for m in self._eval_store.values():
            m.reset()
        if store["perf"].ndim != 2:
            return
        dm = self.trainer.datamodule
        tr = dm.splits["train"].tensors
        train = RoutingArrays(*(tr[k].numpy().astype(np.float64) for k in ("perf", "cost", "perf_n", "cost_n")),
                              tr["mask"].numpy().astype(bool), tr["task"].numpy())
        ev = RoutingArrays(store["perf"], store["cost"], store["perf_n"], store["cost_n"],
                           store["mask"].astype(bool), store["task"])
        scores = {s: self.predicted_reward(torch.from_numpy(store["perf_hat"]),
                                           torch.from_numpy(store["cost_hat"]), s).numpy()
                  for s in REWARD_SETTINGS}
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
