"""Test helper: a callback that stops training after a given epoch, as a preemption would."""

from __future__ import annotations

import lightning as L


class StopAfterEpoch(L.Callback):
    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            trainer.should_stop = True


class SignalAtStep(L.Callback):
    """Sends `sig` to this very process after training step `step` (a real signal, delivered by the OS)."""

    def __init__(self, step: int = 3, sig: str = "SIGTERM"):
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.sig))


class SlowAfterStep(L.Callback):
    """From training step `step` on, touches `marker` and sleeps per batch, so a test can signal mid-run."""

    def __init__(self, marker: str, step: int = 3, sleep: float = 0.5):
        self.marker, self.step, self.sleep = marker, step, sleep

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        import time
        from pathlib import Path

        if trainer.global_step >= self.step:
            Path(self.marker).touch()
            time.sleep(self.sleep)
