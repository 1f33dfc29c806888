"""Strong/weak threshold calibration for any router, as RouteLLM's `routellm/calibrate_threshold.py`.

RouteLLM routes a query to the strong model when its strong win rate is ≥ a threshold, and calibrates the
threshold to a wanted share of strong calls as the (1 − share) quantile of the router's scores on
held-out prompts (`thresholds_df[router].quantile(q=1 - strong_model_pct)`). Here the score is the
router's predicted performance of strong minus that of weak (fusion_lightning/query/peer_metrics.py), the
held-out prompts are the val split of the checkpoint's own run (its config.yaml) or the queries of an
`--input` file, and the result is stored in the checkpoint under `CALIBRATION_KEY`, so `route` and
`Router.route_strong_weak` use it later.

Targets: `strong_fraction=F` (the quantile above; F = 0 means no strong call) or `budget=USD_PER_1K`
(the most strong calls, highest scores first, whose mean cost per 1,000 held-out queries stays within
the budget: logged costs on the val split, the router's predicted costs in USD on an `--input` file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion_lightning.data.matrix import TaskNormaliser
from fusion_lightning.io import rewrite_checkpoint
from fusion_lightning.query.base import split_arrays
from fusion_lightning.query.peer_metrics import strong_weak_pair
from fusion_lightning.query.router import CALIBRATION_KEY, Router

TARGETS = ("strong_fraction", "budget")


@dataclass
class HeldOut:
    """The held-out queries calibration reads: the router's predictions and, where known, costs in USD."""

    perf: np.ndarray  # [N, M] predicted performance
    cost_usd: np.ndarray | None  # [N, M] cost per call in USD (logged, or predicted), None when unknown
    strong: int
    weak: int
    source: str


def parse_target(text: str) -> tuple[str, float]:
    """`strong_fraction=0.3` -> ("strong_fraction", 0.3); `budget=2.5` -> ("budget", 2.5) (USD per 1,000 queries)."""
    key, sep, value = text.partition("=")
    usage = f"--calibrate takes strong_fraction=F (F in [0, 1]) or budget=USD_PER_1K, got {text!r}"
    if not sep or key.strip() not in TARGETS:
        raise ValueError(usage)
    try:
        v = float(value)
    except ValueError:
        raise ValueError(usage) from None
    if (key.strip() == "strong_fraction" and not 0.0 <= v <= 1.0) or v < 0 or not np.isfinite(v):
        raise ValueError(usage)
    return key.strip(), v


def threshold_for_fraction(scores: np.ndarray, fraction: float) -> float:
    """RouteLLM's calibration: the (1 − fraction) quantile of the scores (pandas' linear interpolation);
    +inf for fraction 0, where that quantile (the maximum) would still send the top query to strong."""
    if fraction <= 0.0:
        return float("inf")
    return float(np.quantile(np.asarray(scores, float), 1.0 - fraction))


def threshold_for_budget(scores: np.ndarray, strong_cost: np.ndarray, weak_cost: np.ndarray,
                         budget_per_1k: float) -> float:
    """The threshold that sends the most queries to strong, highest scores first, with the mean cost per
    1,000 queries ≤ the budget: the k-th highest score (+inf for k = 0). Raises when even all-weak is dearer."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    extra = np.concatenate([[0.0], np.cumsum((strong_cost - weak_cost)[order])])
    per_1k = 1000.0 * (weak_cost.sum() + extra) / len(scores)  # k = 0..N strong calls
    ok = np.flatnonzero(per_1k <= budget_per_1k * (1 + 1e-9))
    if not len(ok):
        raise ValueError(f"budget={budget_per_1k:g} USD per 1,000 queries is below the cost of sending every "
                         f"held-out query to the weak model ({per_1k[0]:.4g} USD per 1,000)")
    k = int(ok.max())
    return float(scores[order[k - 1]]) if k else float("inf")


def find_run_config(ckpt: Path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (run_dir/checkpoints/x.ckpt -> run_dir/config.yaml)."""
    for folder in list(ckpt.resolve().parents)[:3]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(f"{ckpt}: no config.yaml of its run next to it or above it; calibrate on "
                            "input= queries instead")


def heldout_from_run(router: Router, ckpt: Path, pair: tuple[int, int] | None = None) -> HeldOut:
    """The val split of the checkpoint's run, rebuilt from its config.yaml: predictions under the logged
    task, logged costs, and the pair the metrics use (best single on train, the cheapest other model)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg_path = find_run_config(ckpt)
    dm = instantiate(OmegaConf.load(cfg_path).datamodule, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    train, val = split_arrays(dm.splits["train"].tensors), dm.splits["val"].tensors
    if list(dm.matrices["train"].models) != router.models:
        raise ValueError(f"{cfg_path}: its data's models {list(dm.matrices['train'].models)} are not the "
                         f"checkpoint's {router.models}")
    pair = pair or strong_weak_pair(train)
    if pair is None:
        raise ValueError(f"{ckpt}: strong/weak routing needs at least two models")
    ev = split_arrays(val)
    rows = ev.mask[:, pair[0]] & ev.mask[:, pair[1]]  # the queries the log has both models for
    if not rows.any():
        raise ValueError(f"{cfg_path}: no val query has both {router.models[pair[0]]} and {router.models[pair[1]]}")
    idx = torch.from_numpy(np.flatnonzero(rows))
    result = router.route_embeddings(val["x"][idx], val["task"][idx])
    cost = ev.cost[rows] if (ev.cost[ev.mask] > 0).any() else None
    return HeldOut(result.perf, cost, *pair, source=f"val split of {cfg_path} ({int(rows.sum())} queries)")


def heldout_from_queries(router: Router, queries: list[str], tasks: list[str | None], source: str,
                         pair: tuple[int, int] | None = None, batch_size: int = 256) -> HeldOut:
    """Queries without outcomes: the router's predictions, its predicted costs in USD (de-normalised with
    the checkpoint's per-task ranges), and by default strong = the highest mean predicted performance,
    weak = the lowest mean predicted cost among the others."""
    result = router.route(queries, tasks, batch_size=batch_size)
    cost = None
    norm = router.module.hparams.get("normaliser")
    if norm:
        ranges = TaskNormaliser.from_state_dict(norm).cost_range
        lo_hi = np.array([ranges.get(t or "", ranges[TaskNormaliser.GLOBAL]) for t in result.tasks], float)
        cost = np.clip(lo_hi[:, :1] + result.cost * (lo_hi[:, 1:] - lo_hi[:, :1]), 0.0, None)
        cost = cost if (cost > 0).any() else None
    if pair is None:
        strong = int(result.perf.mean(0).argmax())
        others = np.array([j for j in range(len(router.models)) if j != strong])
        if not len(others):
            raise ValueError("strong/weak routing needs at least two models")
        key = result.cost.mean(0) if cost is not None else result.perf.mean(0)
        pair = (strong, int(others[key[others].argmin()]))
    return HeldOut(result.perf, cost, *pair, source=f"{source} ({len(queries)} queries)")


def calibrate(held: HeldOut, target: str, value: float, models: list[str]) -> dict:
    """The calibration record stored in the checkpoint: pair, threshold, and what it does on the held-out set."""
    scores = held.perf[:, held.strong] - held.perf[:, held.weak]
    if target == "strong_fraction":
        threshold = threshold_for_fraction(scores, value)
    else:
        if held.cost_usd is None:
            raise ValueError(f"calibrate.budget=...: the costs of {held.source} are unknown; use calibrate.strong_fraction=")
        threshold = threshold_for_budget(scores, held.cost_usd[:, held.strong], held.cost_usd[:, held.weak], value)
    strong = scores >= threshold
    record = {"strong": models[held.strong], "weak": models[held.weak], "threshold": threshold,
              "target": f"{target}={value:g}", "source": held.source, "queries": len(scores),
              "strong_fraction": float(strong.mean())}
    if held.cost_usd is not None:
        chosen = np.where(strong, held.cost_usd[:, held.strong], held.cost_usd[:, held.weak])
        record["usd_per_1k"] = float(1000.0 * chosen.mean())
    return record


def save_calibration(ckpt: Path, record: dict, out: Path | None = None) -> Path:
    """Write the record into the checkpoint: a new file at `out`, or `ckpt` replaced atomically in place
    (weights and the rest of the checkpoint unchanged); returns the path written."""
    return rewrite_checkpoint(ckpt, lambda data: data.__setitem__(CALIBRATION_KEY, record), out)
