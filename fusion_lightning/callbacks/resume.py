"""Exact resumption: random-number-generator state saved in checkpoints and restored when training resumes.

Lightning restores model, optimizer, scheduler, loop counters and the position of `StatefulDataLoader`
train loaders; it saves no torch/numpy/python RNG state in checkpoints, so that is ours to carry.
It is applied at the start of the first training epoch (or batch, for a mid-epoch restore) after a
restore, so Lightning's own set-up work (sanity validation, data-loader creation) cannot shift it.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def capture_rng() -> dict[str, Any]:
    """Plain tensors/ints only, so checkpoints still load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Carries the RNG state, and warns if Lightning did not restore the train loaders' position.

    Lightning drops the saved loader positions when the train loader was built before the checkpoint
    was restored, as `trainer.estimated_stepping_batches` in `configure_optimizers` does (Lightning
    issue #20550; Student reads it lazily for that reason): then the resumed epoch would silently
    start from its first batch again.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] = []

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._loader_states = list((fit_loop.get("state_dict") or {}).get("combined_loader") or [])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self._loader_states = self._loader_states, []
        if not saved or not trainer.fit_loop.restarting:  # an epoch-boundary resume starts a fresh pass
            return
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else (
            list(loaders) if isinstance(loaders, list | tuple) else [loaders])
        if [dl.state_dict() for dl in loaders if hasattr(dl, "state_dict")] != saved:
            rank_zero_warn("the checkpoint's train-loader position was not restored (was the train loader built "
                           "before the restore, e.g. by trainer.estimated_stepping_batches in configure_optimizers?"
                           "): this resumed epoch starts from its first batch, not exactly where the run stopped")

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply()  # a mid-epoch restore (e.g. after SIGTERM) skips on_train_epoch_start

    def _apply(self) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None
