"""Platt scaling on val after fit, stored in the checkpoint that validate and test read (and `route`/`serve` load).

When: `fit` validates and then tests the best checkpoint (fusion_lightning/fit.py). At the start of
that validation the weights are the best checkpoint's, so this callback predicts the val queries
with them, fits per-model Platt scaling where cross-fitted log loss says it helps
(fusion_lightning/query/platt.py), sets the router's `score_calibration` buffer and writes it into
that checkpoint file (rank 0, atomically; weights untouched). The val and test reports that follow
are then those of the calibrated router: what `Router.load` gives later.

Not for: a bandit log (one logged model per query, chosen by a policy: its val outcomes are not a
sample of every model's; left raw and said so), scores that are not 0/1, and routers that opt out
(`calibrates = False`): the cascade (its acceptance rule reads its own predictions) and router_auto
(its paired test vouched for the winner's decisions on the raw predictions — "never below the
lookup" — and a per-model rescaling would change them, the lookup's too; after its cross-validated
refit val is in its training data as well). Off: `callbacks.score_calibration.enabled=false`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from fusion_lightning.io import rewrite_checkpoint
from fusion_lightning.query import platt
from fusion_lightning.query.base import RouterModule

STATE_KEY = "score_calibration"


class ScoreCalibration(Callback):
    """Fits and stores per-model Platt scaling on val before the post-fit validation (see the module docstring)."""

    def __init__(self, enabled: bool = True, folds: int = 5, seed: int = 0):
        self.enabled, self.folds, self.seed = bool(enabled), int(folds), int(seed)
        self.fits: list[platt.PlattFit] = []
        self.skipped: str | None = None

    @property
    def summary_fields(self) -> dict:
        """What summary.json says: per model kept or not and the val log losses, or why nothing was fitted."""
        if self.skipped:
            return {STATE_KEY: {"skipped": self.skipped}}
        return {STATE_KEY: {f.model: f.as_dict() for f in self.fits}} if self.fits else {}

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.state.fn != "validate" or not isinstance(pl_module, RouterModule):
            return
        why = self._why_not(trainer, pl_module)
        if why:
            self.skipped = why
            return
        val = trainer.datamodule.splits["val"].tensors
        was_training = pl_module.training
        pl_module.eval()
        perf_hat, _ = pl_module.predict_split(val["x"], val["task"])
        pl_module.train(was_training)
        mask, perf = val["mask"].bool().numpy(), val["perf"].float().numpy()
        self.fits = platt.fit_all(perf_hat, perf, mask, list(pl_module.hparams.models), self.folds, self.seed)
        table = torch.from_numpy(platt.as_table(self.fits)).to(pl_module.device)
        pl_module.score_calibration = table
        pl_module.platt_fits = self.fits  # the routing report names the calibrated models
        kept = [f.model for f in self.fits if f.kept]
        rank_zero_info(f"score calibration (Platt, on {len(perf_hat)} val queries): "
                       f"{', '.join(kept) if kept else 'no model'} calibrated")
        self._store(trainer, table.cpu())

    def _why_not(self, trainer: L.Trainer, module: RouterModule) -> str | None:
        if not module.calibrates:
            return (f"{type(module).__name__} keeps its predictions as selected or trained (calibrates = False): "
                    "a per-model rescaling would change decisions nothing tested")
        dm = trainer.datamodule
        val = getattr(dm, "splits", {}).get("val")
        if val is None or "x" not in val.tensors:
            return "no val split"
        if "prop" in val.tensors:
            return "a bandit log: val outcomes exist for the logged model only, not a sample of every model's"
        if not module.hparams.get("binary", False):
            return "scores are not 0/1: a success probability has nothing to be calibrated against"
        return None

    def _store(self, trainer: L.Trainer, table: torch.Tensor) -> None:
        """The buffer into the checkpoint validate loaded, so test and `Router.load` read the same router."""
        path = trainer.ckpt_path
        if trainer.is_global_zero and path and Path(path).is_file():
            rewrite_checkpoint(path, lambda data: data["state_dict"].__setitem__(STATE_KEY, table))
        trainer.strategy.barrier("score_calibration")
