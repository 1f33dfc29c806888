"""Progress of the embed job that shows in a log file: Lightning's bar only draws on a terminal.

When stdout is not a terminal (a SLURM .out file, `nohup ... > log`, CI) one plain line every
`interval` seconds, and one at the end:
    [embed] 1,024/6,108 texts (16.8%), 35.2 texts/s, ETA 2m24s
(with `rank R:` under DDP, each rank counting its own shards). On a terminal the same line is redrawn
in place about once a second.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(done: int, total: int, seconds: float, rank: int | None = None) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    eta = format_duration((total - done) / rate) if rate > 0 else "?"
    pct = 100.0 * done / total if total else 100.0
    who = f"rank {rank}: " if rank is not None else ""
    return f"[embed] {who}{done:,}/{total:,} texts ({pct:.1f}%), {rate:.1f} texts/s, ETA {eta}"


class EmbedProgress(L.Callback):
    """Texts done / total, texts/s and ETA of `trainer.predict` over an EmbedDataModule."""

    def __init__(self, interval: float = 30.0, stream: TextIO | None = None):
        if interval <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval}")
        self.interval = float(interval)
        self.stream = stream
        self.done = self.total = 0
        self.lines = 0

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ds = getattr(trainer.datamodule, "dataset", None)
        self.total, self.done = (ds.texts if ds is not None else 0), 0
        self.rank = trainer.global_rank if trainer.world_size > 1 else None
        self.t0 = self.last = time.perf_counter()
        self.tty = bool(getattr(self._out(), "isatty", lambda: False)())

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.done += len(batch["texts"])
        now = time.perf_counter()
        if now - self.last >= (1.0 if self.tty else self.interval):
            self._emit(now)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(time.perf_counter(), final=True)

    def _emit(self, now: float, final: bool = False) -> None:
        self.last = now
        line = progress_line(self.done, self.total, now - self.t0, self.rank)
        out = self._out()
        if self.tty:
            out.write("\r" + line + ("\n" if final else ""))
        else:
            out.write(line + "\n")
        out.flush()
        self.lines += 1
