"""How router_auto selects: the threshold of its paired test, cross-validated selection
(`model.selection=cv`, the default), and the selection table it writes.

One val split of a few hundred queries gives a paired test too little power: with a dozen candidates
the Bonferroni threshold (z = 2.64) is rarely cleared, and router_auto was the per-task lookup on every
log we hold. K-fold cross-validation over train + val scores every candidate on every one of those
queries (each once, by a copy of it that never trained on it), so the same paired test against the
lookup runs on K times the queries. The winner is then refitted on all of train + val for the number
of epochs its copies needed (the median of their best epochs), with what they chose on val (a
candidate's `val_selected` buffers, e.g. the residual router's α: the median over folds), and only
it is tested.

Folds are by query and stratified by task (each task's queries dealt round-robin after a seeded
shuffle). The test split is never part of a fold: selection reads train and val only. What stays
fitted on the original train split: the per-task normaliser, the task classifier and, on a bandit
log, the reward model behind the DR terms (the datamodule's, built once); the candidates themselves
(kNN's index, the lookup's task means, every trained weight) see only their fold's training rows.
"""

from __future__ import annotations

import copy
import csv
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from fusion_lightning.io import atomic_open, atomic_write
from fusion_lightning.query.base import split_arrays
from fusion_lightning.query.metrics import (
    baseline_choices,
    choose,
    gap_closed,
    outcome,
    select_over_reference,
)

SELECTIONS = ("cv", "holdout")


def selection_z(se_factor: float | str, n_choices: int, level: float = 0.05) -> float:
    """The paired standard errors a winner must beat the reference by: `se_factor` itself, or for
    "bonferroni" the one-sided `level` test corrected for the n_choices − 1 comparisons with the reference."""
    if isinstance(se_factor, str):
        if se_factor != "bonferroni":
            raise ValueError(f"model.se_factor={se_factor!r}: a number or 'bonferroni'")
        return NormalDist().inv_cdf(1 - level / max(n_choices - 1, 1))
    return float(se_factor)


def stratified_folds(tasks: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[n] fold of each row: within each task a seeded shuffle dealt round-robin, so every fold holds each
    task in proportion (a task with fewer than k queries is in fewer folds)."""
    if k < 2:
        raise ValueError(f"model.folds must be at least 2 for cross-validated selection, got {k}")
    rng = np.random.default_rng(seed)
    out = np.empty(len(tasks), np.int64)
    offset = 0
    for t in np.unique(tasks):
        rows = rng.permutation(np.flatnonzero(tasks == t))
        out[rows] = (np.arange(len(rows)) + offset) % k  # the offset spreads small tasks' remainders
        offset += len(rows)
    return out


def concat_splits(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One split's tensors from several (rows appended in order); `index` renumbered for the new split."""
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise ValueError("cannot join splits with different tensors")
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "index"}
    if "index" in keys:
        out["index"] = torch.arange(len(next(iter(out.values()))))
    return out


def take(tensors: dict[str, torch.Tensor], rows: np.ndarray) -> dict[str, torch.Tensor]:
    idx = torch.from_numpy(rows)
    out = {k: v[idx] for k, v in tensors.items() if k != "index"}
    if "index" in tensors:
        out["index"] = torch.arange(len(rows))
    return out


class SealedSplit:
    """A fold's test split: empty, and reading it is an error (selection must never see the test split)."""

    n = 0

    def __len__(self) -> int:
        return 0

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        raise RuntimeError("cross-validated selection read the test split")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raise RuntimeError("cross-validated selection read the test split")


def fold_datamodule(dm: Any, pool: dict[str, torch.Tensor], fold: np.ndarray, k: int) -> Any:
    """A shallow copy of the router datamodule whose train is the pool minus fold k and val is fold k; its
    test split is sealed, so nothing in a fold's fit can read one."""
    from fusion_lightning.query.datamodule import RouterSplit

    out = copy.copy(dm)
    out.splits = {"train": RouterSplit(take(pool, np.flatnonzero(fold != k))),
                  "val": RouterSplit(take(pool, np.flatnonzero(fold == k))), "test": SealedSplit()}
    out.trainer = None
    return out


def cross_validate(model: Any, r: Any) -> dict[str, Any]:
    """Fit a holdout-selecting copy of `model` (the AutoRouter) on each fold of `r` (the `fit` Run: its
    config, run dir and datamodule), pool their out-of-fold rewards, pick the winner by the paired test
    over all of train + val, and return the selection (rows as `write_selection` reads them) and the
    refit plan; the datamodule's train split becomes train + val for the refit. Per-fold selection
    tables are written under <run_dir>/cv/fold<k>/."""
    from fusion_lightning.query.datamodule import RouterSplit

    hp = model.hparams
    dm = r.datamodule
    pool = concat_splits([dm.splits["train"].tensors, dm.splits["val"].tensors])
    k = int(hp.folds)
    fold = stratified_folds(pool["task"].numpy(), k, int(r.cfg.seed))
    oof: dict[str, list[np.ndarray]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    best_epochs: dict[str, list[int]] = {}
    chosen_on_val: dict[str, dict[str, list[float]]] = {}  # per candidate, its `val_selected` buffers per fold
    members: dict[str, list[list[str]]] = {}  # per ensemble, the candidates each fold averaged
    seconds = time.perf_counter()
    for i in range(k):
        fdm = fold_datamodule(dm, pool, fold, i)
        fmodel = type(model)(**{**dict(hp), "selection": "holdout", "out_dir": None})
        out_dir = Path(r.run_dir) / "cv" / f"fold{i}"
        trainer = instantiate(r.cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir),
                              devices=1, num_nodes=1, strategy="auto", _convert_="all")
        torch.manual_seed(int(r.cfg.seed) + i)
        trainer.fit(fmodel, datamodule=fdm)
        for name, rew in fmodel.val_rewards.items():
            oof.setdefault(name, []).append(rew)
        for row in fmodel.selection["rows"]:
            rows.setdefault(row["candidate"], []).append(row)
        for name, b in fmodel.best.items():
            if b["epoch"] >= 0:
                best_epochs.setdefault(name, []).append(int(b["epoch"]))
                for buf in getattr(fmodel.candidates[name], "val_selected", ()):
                    chosen_on_val.setdefault(name, {}).setdefault(buf, []).append(float(b["state"][buf]))
        for e, chosen in fmodel.ensemble_members.items():
            members.setdefault(e, []).append(chosen)
        print(f"router_auto cv: fold {i + 1}/{k} selected {fmodel.selection['winner']} "
              f"({int((fold == i).sum())} queries, {time.perf_counter() - seconds:.0f}s so far)", flush=True)
    # only choices every fold scored (an ensemble whose members a fold lacked is left out, not half-scored)
    oof_all = {n: np.concatenate(v) for n, v in oof.items() if len(v) == k}
    z = selection_z(hp.se_factor, len(oof_all))
    winner = select_over_reference(oof_all, hp.reference, z)
    ref = oof_all[hp.reference]
    sizes = np.array([(fold == i).sum() for i in range(k)], float)
    table = []
    for name in model.choices:
        if name not in oof_all:
            continue
        diff = oof_all[name] - ref
        fr = rows[name]

        def mean_of(key: str, fr: list[dict] = fr) -> float | None:
            vals = [row[key] for row in fr]
            return None if any(v is None for v in vals) else float(np.average(vals, weights=sizes))

        epochs = best_epochs.get(name)
        table.append({
            **{key: fr[0][key] for key in ("candidate", "kind", "settings")},
            "selected": name == winner, "val_reward": float(oof_all[name].mean()), "val_perf": mean_of("val_perf"),
            "val_cost": mean_of("val_cost"), "val_gap_closed": mean_of("val_gap_closed"),
            "gain_over_reference": float(diff.mean()),
            "gain_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
            "fold_gains": " ".join(f"{row['gain_over_reference']:+.4f}" for row in fr),
            "best_epoch": int(np.median(epochs)) if epochs else None,
            "epochs": int(sum(row["epochs"] for row in fr)) if fr[0]["epochs"] is not None else None,
            "train_s": round(sum(row["train_s"] or 0.0 for row in fr), 3) if fr[0]["train_s"] is not None else None,
        })
    needed = model.needed_for(winner, members.get(winner, []))
    refit = {n: int(np.median(best_epochs[n])) + 1 for n in needed if n in best_epochs}
    # what the folds chose on val (e.g. the residual router's α): the refit has no held-out val to choose on
    refit_values = {n: {buf: float(np.median(v)) for buf, v in chosen_on_val[n].items()}
                    for n in needed if n in chosen_on_val}
    dm.splits["train"] = RouterSplit(pool)  # the refit trains on train + val; val stays for the loop (in-sample)
    return {"winner": winner, "reference": hp.reference, "setting": hp.setting, "se_factor": z,
            "rule": str(hp.se_factor), "selection": "cv", "folds": k, "queries": int(len(fold)),
            "members": needed if winner not in model.candidates else [], "refit_epochs": refit,
            "refit_values": refit_values, "rows": table,
            "cv_seconds": round(time.perf_counter() - seconds, 1)}


def kind_of(router: torch.nn.Module) -> str:
    """'MLPRouter' -> 'mlp': the name ensembles use for "the val-best candidate of this kind"."""
    name = type(router).__name__
    return (name[:-len("Router")] if name.endswith("Router") else name).lower()


def selection_rows(model: Any, rewards: dict, perf_cost: dict, winner: str, arrays: Any) -> list[dict[str, Any]]:
    """selection.md's rows: per choice of router_auto `model`, its val reward, perf, cost, gap closed, gain over the
    reference with its SE, epochs and settings (`perf_cost`: its val predictions; `arrays`: the val split)."""
    train = split_arrays(model.trainer.datamodule.splits["train"].tensors)
    bandit, arrays = arrays.bandit, arrays.estimable()  # a bandit log: DR estimates, no oracle
    base = baseline_choices(train, arrays, "performance_first", model.hparams.model_sizes)
    single, oracle = (outcome(base[b], arrays, "performance_first")["perf"] for b in ("best_single", "oracle"))
    ref = rewards[model.hparams.reference]
    rows = []
    for name in model.choices:
        if name not in rewards:
            continue
        o = outcome(choose(model.predicted_reward(*(torch.from_numpy(a) for a in perf_cost[name]),
                                                 model.hparams.setting).numpy(), arrays.mask), arrays,
                    model.hparams.setting)
        diff = rewards[name] - ref
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        is_cand = name in model.candidates
        spec = {k: v for k, v in (model.hparams.candidates.get(name) or {}).items() if k != "_target_"}
        rows.append({
            "candidate": name, "kind": kind_of(model.candidates[name]) if is_cand else "ensemble",
            "selected": name == winner, "val_reward": float(rewards[name].mean()), "val_perf": o["perf"],
            "val_cost": o["cost"], "val_gap_closed": None if bandit else gap_closed(o["perf"], single, oracle),
            "gain_over_reference": float(diff.mean()), "gain_se": se,
            "best_epoch": model.best[name]["epoch"] if is_cand else None,
            "epochs": model.epochs[name] if is_cand else None,
            "train_s": round(model.train_seconds[name], 3) if is_cand else None,
            "settings": ", ".join(f"{k}={v}" for k, v in spec.items()) if is_cand else
            "mean of " + ", ".join(np.array(list(model.candidates))[
                model.members[model.choices.index(name) - len(model.candidates)].numpy()].tolist()),
        })
    return rows


def write_selection(selection: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """selection.csv (every column) and selection.md (a table people read) in the run dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = selection["rows"]
    paths = {"selection_csv": out_dir / "selection.csv", "selection_md": out_dir / "selection.md"}
    with atomic_open(paths["selection_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def num(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    cv = selection.get("selection") == "cv"
    where = (f"out-of-fold over {selection['folds']}-fold cross-validation of train + val "
             f"({selection['queries']:,} queries, each scored by a copy that never trained on it)" if cv else "val")
    lines = [f"# router_auto selection ({selection['setting']} reward, {where})", "",
             f"Selected: **{selection['winner']}**. Rule: the best mean reward among the candidates whose "
             f"paired gain over `{selection['reference']}` exceeds {selection['se_factor']:.2f} standard errors "
             f"(se_factor={selection['rule']}); "
             f"`{selection['reference']}` when none does."]
    if cv:
        plan = ", ".join(f"{n} {e} epoch(s)" for n, e in selection["refit_epochs"].items())
        lines += ["", f"The winner was then refitted on all of train + val ({plan}: the median best epoch of its "
                  "fold copies); val metrics after that are in-sample. Best epoch: the median over folds; epochs "
                  "and train s: summed over folds."]
    lines += ["", "| candidate | kind | reward | perf | gap closed | gain over reference (± SE) "
              + ("| gain by fold " if cv else "") + "| best epoch | epochs | train s | settings |",
              "|---|---|---:|---:|---:|---:|" + ("---|" if cv else "") + "---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: -r["val_reward"]):
        name = f"**{r['candidate']}**" if r["selected"] else r["candidate"]
        lines.append(f"| {name} | {r['kind']} | {r['val_reward']:.4f} | {num(r['val_perf'], '.4f')} | "
                     f"{num(r['val_gap_closed'], '.3f')} | {r['gain_over_reference']:+.4f} ± {r['gain_se']:.4f} | "
                     + (f"{r['fold_gains']} | " if cv else "")
                     + f"{num(r['best_epoch'], 'd')} | {num(r['epochs'], 'd')} | {num(r['train_s'], '.1f')} | "
                     f"{r['settings']} |")
    atomic_write(paths["selection_md"], "\n".join(lines) + "\n")
    return {k: str(v) for k, v in paths.items()}
