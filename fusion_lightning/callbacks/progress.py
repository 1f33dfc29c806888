"""Training progress a log file can hold: Lightning's bar on a terminal, plain lines anywhere else.

When stdout is not a terminal (a SLURM `.out` file, `nohup ... > log`, CI) a progress bar writes
hundreds of `\\r` frames per epoch into the file. `progress_bar()` (what `callbacks=default` uses)
gives TQDM's bar on a terminal and otherwise `LineProgressBar`: one line every `interval` seconds
while an epoch trains, and one line per epoch with its rate, time and the epoch's metrics:

    [train] epoch 3/30 step 40/92 (43%), 18.2 steps/s, epoch ETA 3s, train/loss 0.412
    [train] epoch 3/30 done: 92 steps in 5.1s (18.0 steps/s), ETA 2m18s; val/loss 0.398 val/reward 0.61
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

from fusion_lightning.data.embed_progress import format_duration


def _metrics(trainer: L.Trainer, prefixes: tuple[str, ...], limit: int = 6) -> str:
    """A few headline scalars: top-level keys only (`val/loss`, not `val/balance/best_single/cost`), losses first."""
    keys = [k for k, v in trainer.callback_metrics.items()
            if k.startswith(prefixes) and k.count("/") == 1 and getattr(v, "numel", lambda: 1)() == 1]
    keys.sort(key=lambda k: (prefixes.index(k.split("/")[0] + "/"), not k.endswith("/loss"), k))
    return " ".join(f"{k} {float(trainer.callback_metrics[k]):.4g}" for k in keys[:limit])


class LineProgressBar(ProgressBar):
    """Plain progress lines, rank 0 only (see the module docstring)."""

    def __init__(self, interval: float = 30.0, stream: TextIO | None = None):
        super().__init__()
        if interval <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval}")
        self.interval, self.stream = float(interval), stream
        self._enabled = True
        self._fit_start = self._epoch_start = self._last = 0.0
        self._steps = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _print(self, line: str) -> None:
        stream = self.stream or sys.stdout
        print(line, file=stream, flush=True)

    def _epochs(self, trainer: L.Trainer) -> str:
        return f"{trainer.current_epoch + 1}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 \
            else str(trainer.current_epoch + 1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps = batch_idx + 1
        now = time.perf_counter()
        if not self.is_enabled or now - self._last < self.interval:
            return
        self._last = now
        done, total = batch_idx + 1, self.total_train_batches
        rate = done / max(now - self._epoch_start, 1e-9)
        known = isinstance(total, int) and total > 0
        where = f"step {done}/{total} ({100 * done / total:.0f}%)" if known else f"step {done}"
        eta = f", epoch ETA {format_duration((total - done) / rate)}" if known else ""
        loss = _metrics(trainer, ("train/",))
        self._print(f"[train] epoch {self._epochs(trainer)} {where}, {rate:.1f} steps/s{eta}" + (f", {loss}" if loss else ""))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        now = time.perf_counter()
        steps = self._steps
        took = now - self._epoch_start
        eta = ""
        if trainer.max_epochs and trainer.max_epochs > 0:
            left = trainer.max_epochs - trainer.current_epoch - 1
            per_epoch = (now - self._fit_start) / (trainer.current_epoch + 1)
            eta = f", ETA {format_duration(left * per_epoch)}" if left > 0 else ""
        metrics = _metrics(trainer, ("val/", "train/"))
        self._print(f"[train] epoch {self._epochs(trainer)} done: {steps} steps in {took:.1f}s "
                    f"({steps / max(took, 1e-9):.1f} steps/s){eta}" + (f"; {metrics}" if metrics else ""))


def progress_bar(refresh_rate: int = 10, interval: float = 30.0) -> ProgressBar:
    """TQDM's bar when stdout is a terminal, else `LineProgressBar(interval)` (`callbacks.progress_bar`)."""
    if sys.stdout.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LineProgressBar(interval=interval)
