"""SLURM auto-requeue at a consistent point, so a requeued run resumes exactly.

Lightning's `SLURMEnvironment(auto_requeue=True)` handles the requeue signal (SIGUSR1) by saving
`<default_root_dir>/hpc_ckpt_N.ckpt` and calling `scontrol requeue`; the restarted job resumes from that
checkpoint. The handler runs wherever Python happens to be when the signal lands (mid optimizer step,
mid validation), and such a checkpoint does not resume to the same numbers. This callback keeps
Lightning's handler and its checkpoint/requeue logic but defers the call to the next safe point: the end of
the training epoch (after validation and ModelCheckpoint, the same point as `last.ckpt`, so resume is
exact), or the end of a training batch with `at="batch"` (for epochs longer than the signal's lead time;
then exactness also needs a data loader that checkpoints its position). Under DDP the ranks agree on
the decision, so they all save at the same step.

It is a `Checkpoint` subclass only so that Lightning orders it with the checkpoint callbacks (last) and
calls it after ModelCheckpoint/EarlyStopping in the epoch-end hook: the hpc checkpoint then holds their
state for this epoch, as `last.ckpt` does.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Literal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)


class SLURMRequeue(Checkpoint):
    def __init__(self, at: Literal["epoch", "batch"] = "epoch") -> None:
        if at not in ("epoch", "batch"):
            raise ValueError(f"SLURMRequeue: at must be 'epoch' or 'batch', got {at!r}")
        self.at = at
        self.pending = False
        self._lightning_handler: Any = None
        self._signum: int | None = None

    def _defer(self, signum: int, frame: Any) -> None:
        log.info("SLURM requeue signal %s received: checkpoint and requeue at the end of this %s", signum, self.at)
        self.pending = True

    def _install(self, trainer: L.Trainer) -> None:
        """Swap Lightning's registered requeue handler for the deferring one (after Lightning registered it)."""
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        current = signal.getsignal(env.requeue_signal)
        if current == self._defer or current in (None, signal.SIG_DFL, signal.SIG_IGN):
            return
        self._signum, self._lightning_handler = int(env.requeue_signal), current
        signal.signal(env.requeue_signal, self._defer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)  # a separate trainer.validate/test run: finish it rather than requeue mid-way

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def _maybe_requeue(self, trainer: L.Trainer) -> None:
        if self._lightning_handler is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.pending, all=False):
            return
        if trainer.should_stop:  # training ends here anyway; only the short val/test of fit() remain
            log.info("SLURM requeue signal received as training stops: finishing instead of requeueing")
            self.pending = False
            return
        self.pending = False
        self._lightning_handler(self._signum, None)  # Lightning: save hpc checkpoint, `scontrol requeue`

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.at == "batch":
            self._maybe_requeue(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "epoch":
            self._maybe_requeue(trainer)
