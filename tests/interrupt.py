"""Test helper: a callback that stops training after a given epoch, as a preemption would."""

from __future__ import annotations

import lightning as L


class StopAfterEpoch(L.Callback):
    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True
