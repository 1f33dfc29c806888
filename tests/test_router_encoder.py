"""Encoder-classifier router: MiniLM fine-tuned end to end learns the planted rule and routes raw text."""

from __future__ import annotations

from pathlib import Path

import torch
from planted import planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.router import Router


def test_encoder_router_learns_planted_rule_and_routes_text(tmp_path: Path) -> None:
    overrides = [o for o in planted_overrides(tmp_path, "trainer.max_epochs=4", "logger=none",
                                              "datamodule.max_length=32", "datamodule.batch_size=16",
                                              "model.head_lr=3e-3")
                 if not o.startswith("datamodule.encoder=")]  # it fine-tunes its own encoder
    summary = fit(compose_recipe("router_encoder", overrides))
    m = summary["metrics"]
    assert m["test/perf"] >= m["test/best_single/perf"] + 0.1, m
    router = Router.load(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    ids = router.module.featurize(["add the sum of these numbers"])
    assert ids.dtype == torch.long and ids.shape == (1, 32)
    result = router.route(["add the sum of these numbers plus digits",
                           "which river crosses the capital city of this country"],
                          tasks=["arithmetic", "geography"])
    assert result.models == ["alpha", "beta"]
