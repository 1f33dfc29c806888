"""SLURM auto-requeue at a safe point, so the requeued job resumes exactly.

Lightning's `SLURMEnvironment(auto_requeue=True)` handles the requeue signal (SIGUSR1) by saving
`<default_root_dir>/hpc_ckpt_N.ckpt` and calling `scontrol requeue`; the requeued job resumes from
the newest hpc checkpoint by itself. But the handler does that inside the signal handler, wherever
Python is when the signal lands (between two parameter updates of an optimizer step, half-way
through a validation), and such a checkpoint does not resume to the same numbers; checkpointed
loader positions do not change that. This callback keeps Lightning's handler and defers the call to
the end of the current optimizer step (for an epoch's last batch: the end of the epoch, after its
validation and ModelCheckpoint), points from which Lightning resumes exactly, like `last.ckpt` on
SIGTERM. Then it stops the run with `Requeued`, so FaultTolerance writes no last.ckpt of its own.
Under DDP the ranks agree first, so they all save at the same step. A requeue signal during a
separate validate/test run, or as training stops anyway, is logged and the run finishes.

It is a `Checkpoint` subclass so that Lightning orders it after ModelCheckpoint/EarlyStopping in the
epoch-end hook: the hpc checkpoint then holds their state for this epoch, as `last.ckpt` does.
"""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint

from fusion_lightning.checkpointing import FaultTolerance, Requeued

log = logging.getLogger(__name__)


class SLURMRequeue(Checkpoint):
    def __init__(self) -> None:
        self.pending = False
        self._lightning_handler: Any = None
        self._signum: int | None = None

    def _defer(self, signum: int, frame: Any) -> None:
        log.info("SLURM requeue signal %s received: checkpoint and requeue at the end of this step", signum)
        self.pending = True

    def _install(self, trainer: L.Trainer) -> None:
        """Swap Lightning's registered requeue handler for the deferring one (after Lightning registered it)."""
        env = getattr(trainer.strategy, "cluster_environment", None)  # parallel strategies; else the default
        signum = env.requeue_signal if isinstance(env, SLURMEnvironment) and env.requeue_signal else signal.SIGUSR1
        current = signal.getsignal(signum)
        # Lightning installs a handler only with auto_requeue=True; FaultTolerance's is a plain SIGTERM stop
        if not callable(current) or current == self._defer or isinstance(getattr(current, "__self__", None),
                                                                          FaultTolerance):
            return
        self._signum, self._lightning_handler = int(signum), current
        signal.signal(signum, self._defer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)  # a separate trainer.validate/test run: finish it rather than requeue mid-way

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def _requeue_if_signalled(self, trainer: L.Trainer) -> None:
        if self._lightning_handler is None or not trainer.strategy.reduce_boolean_decision(self.pending, all=False):
            return
        self.pending = False
        if trainer.should_stop:  # training ends here anyway; only the short val/test of fit() remain
            log.info("SLURM requeue signal received as training stops: finishing instead of requeueing")
            return
        self._lightning_handler(self._signum, None)  # Lightning: save hpc_ckpt_N.ckpt, `scontrol requeue`
        saved = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"),
                       key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        raise Requeued(str(saved[-1]) if saved else None, signal.Signals(self._signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # not mid gradient accumulation, and an epoch's last batch waits for its validation and epoch end
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and batch_idx + 1 < trainer.num_training_batches:
            self._requeue_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requeue_if_signalled(trainer)
