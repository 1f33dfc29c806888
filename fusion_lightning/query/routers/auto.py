"""router_auto: train a fixed set of candidate routers side by side, select one by val reward, test only it.

Defaults tuned on one log do not carry to the next, so the router picks its own architecture and
hyperparameters for the log in front of it. Every candidate (any `RouterModule`: MLP, kNN, MF, IRT,
the residual router, the pure per-task lookup, ...) trains on the same batches in one Lightning
loop, each with its own optimiser; at every validation epoch each is scored by **val reward** under
the configured setting (what routing is judged by, not val loss), keeps its best state and stops
after `patience` epochs without improvement. Ensembles average the predictions of the val-best
candidate of each named kind. The winner is the best mean val reward among the candidates whose
paired gain over the reference (the per-task lookup) exceeds `se_factor` standard errors; the lookup
when none does. The default `se_factor: bonferroni` is a one-sided 5% test corrected for the number
of comparisons (z = 2.64 for the default 13 choices): with a dozen candidates, one of them beats the
lookup on a few hundred val queries by more than one SE by luck alone (bench/auto_selection.py).
With `selection: cv` (the default) that test runs on out-of-fold rewards over K-fold cross-validation
of train + val, and the fit itself refits the winner (query/auto_selection.py); `selection: holdout`
selects on the val split as above. The test split is never read before the selection is final; only
the winner is tested.

Checkpoints hold every candidate's *best* state and the selection, so `Router.load` routes with the
winner; the live training weights ride along for `ckpt_path=last`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from fusion_lightning.query.auto_selection import (
    SELECTIONS,
    concat_splits,
    cross_validate,
    kind_of,
    selection_rows,
    selection_z,
    write_selection,
)
from fusion_lightning.query.base import RouterModule, split_arrays
from fusion_lightning.query.feature_view import view, view_columns, view_split
from fusion_lightning.query.metrics import (
    per_query_reward,
    select_over_reference,
)
from fusion_lightning.query.off_policy import logged_view
from fusion_lightning.query.routers import current_path

_PREFIX = "candidates."


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def _trains(router: RouterModule) -> bool:
    return bool(getattr(router, "trains", True)) and any(p.requires_grad for p in router.parameters())


class AutoRouter(RouterModule):
    """Selects one of `candidates` (name -> router config with `_target_`) or `ensembles` (name -> kinds or
    candidate names) by val reward; predicts with the selected one."""

    # its paired test vouched for the winner's decisions on its raw predictions (never below the lookup);
    # Platt scaling them afterwards would change those decisions (even the lookup's) without that test
    calibrates = False

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], candidates: dict[str, dict[str, Any]],
                 ensembles: dict[str, list[str]] | None = None, reference: str = "lookup",
                 setting: str = "performance_first", patience: int = 5, se_factor: float | str = "bonferroni",
                 out_dir: str | None = None, selection: str = "cv", folds: int = 5,
                 feature_columns: dict[str, list[int]] | None = None):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"model.selection={selection!r}; choose from: {', '.join(SELECTIONS)}")
        candidates = {n: _plain(s) for n, s in _plain(candidates).items()}  # Hydra passes configs with _recursive_=false
        for spec in candidates.values():  # a checkpoint from before the routers moved to query/routers/
            if "_target_" in spec:
                spec["_target_"] = current_path(spec["_target_"])
        ensembles = {e: list(m) for e, m in _plain(ensembles or {}).items()}
        self.save_hyperparameters(ignore=["candidates", "ensembles"])
        self.hparams.update(candidates=candidates, ensembles=ensembles)
        if reference not in candidates:
            raise ValueError(f"model.reference={reference!r} is not a candidate; candidates: {', '.join(candidates)}")
        shared = dict(embed_dim=embed_dim, models=models, tasks=tasks, binary=binary, encoder=encoder,
                      normaliser=normaliser, model_sizes=model_sizes)
        # `off_policy: direct` in a candidate's spec: on a bandit log it learns from the logged calls alone, not
        # the DR pseudo-rewards the others learn from, so selection (by DR on val) chooses the learner too
        self.learners = {n: spec.get("off_policy", "auto") for n, spec in candidates.items()}
        bad = {n: v for n, v in self.learners.items() if v not in ("auto", "direct")}
        if bad:
            raise ValueError(f"candidate off_policy must be auto or direct, got {bad}")
        # `features: PART` (or a list): the candidate reads only those parts of a concatenated encoder's vectors,
        # so selection chooses among feature sets as among architectures (query/feature_view.py). The columns
        # are resolved once and kept in the hparams: a checkpoint reloads without building the encoders
        if feature_columns is None:
            feature_columns = {n: view_columns(spec["features"], encoder)
                               for n, spec in candidates.items() if spec.get("features") is not None}
        self.hparams.update(feature_columns=feature_columns)
        self._cols = {n: torch.tensor(feature_columns[n]) if n in feature_columns else None for n in candidates}
        self.candidates = nn.ModuleDict({
            n: instantiate({k: v for k, v in spec.items() if k not in ("off_policy", "features")},
                           **{**shared, "embed_dim": len(feature_columns.get(n, [])) or embed_dim}, _convert_="all")
            for n, spec in candidates.items()})
        self.ensembles = dict(ensembles or {})
        kinds = {kind_of(c) for c in self.candidates.values()}
        for e, members in self.ensembles.items():
            bad = [m for m in members if m not in self.candidates and m not in kinds]
            if bad or e in self.candidates:
                raise ValueError(f"ensemble {e!r}: {bad or 'name taken by a candidate'}; members are candidate "
                                 f"names or kinds ({', '.join(sorted(kinds))})")
        self.choices = [*self.candidates, *self.ensembles]
        self.automatic_optimization = False  # one optimiser per candidate, stepped by hand
        self.register_buffer("winner", torch.tensor(-1))  # index into self.choices
        self.register_buffer("members", torch.zeros(len(self.ensembles), len(self.candidates), dtype=torch.bool))
        self._reset_bookkeeping()

    def _reset_bookkeeping(self) -> None:
        names = list(self.candidates)
        self.best: dict[str, dict[str, Any]] = {n: {"reward": float("-inf"), "epoch": -1} for n in names}
        self.bad_epochs = dict.fromkeys(names, 0)
        self.progress = dict.fromkeys(names, float("-inf"))
        self.epochs = dict.fromkeys(names, 0)
        self.train_seconds = dict.fromkeys(names, 0.0)
        self.stopped: set[str] = set()
        self.selection: dict[str, Any] = {}
        self.artifacts: dict[str, str] = {}
        self._live: dict[str, torch.Tensor] | None = None
        self.val_rewards: dict[str, np.ndarray] = {}  # per choice, per val query (cross-validation pools them)
        self.ensemble_members: dict[str, list[str]] = {}
        self.refit_epochs: dict[str, int] | None = None  # after cross-validation: the winner's refit plan

    # cross-validated selection (query/auto_selection.py), before the main fit refits the winner -------------
    def select_before_fit(self, r: Any, resume_from: str | None = None) -> None:
        """`fit` calls this before `trainer.fit`: with `selection: cv`, select by K-fold cross-validation over
        train + val, then make the fit a refit of the winner on train + val. Resuming, the selection and the
        refit plan come from the checkpoint (the folds do not run again)."""
        if self.hparams.selection != "cv":
            return
        if r.trainer.world_size > 1:
            raise ValueError("model.selection=cv fits its folds in one process; run router_auto on one device "
                             "(routers are small) or use model.selection=holdout with several")
        if resume_from:
            saved = torch.load(resume_from, map_location="cpu", weights_only=False).get("auto", {})
            selection = dict(saved.get("selection") or {})
            if selection.get("selection") != "cv":
                raise ValueError(f"{resume_from} was not fitted with model.selection=cv: resume with the setting "
                                 "it was fitted with")
            dm = r.datamodule
            dm.splits["train"] = type(dm.splits["train"])(concat_splits(
                [dm.splits["train"].tensors, dm.splits["val"].tensors]))
        else:
            selection = cross_validate(self, r)
        self._use_cv_selection(selection)

    def _use_cv_selection(self, selection: dict[str, Any]) -> None:
        self.selection, self.refit_epochs = selection, dict(selection["refit_epochs"])
        self.winner.fill_(self.choices.index(selection["winner"]))
        self.members.zero_()
        if selection["members"]:
            e_i = list(self.ensembles).index(selection["winner"])
            for n in selection["members"]:
                self.members[e_i, list(self.candidates).index(n)] = True

    def needed_for(self, winner: str, fold_members: list[list[str]]) -> list[str]:
        """The candidates a refit of `winner` trains: itself, or an ensemble's members (for a kind, the
        candidate of that kind the most folds averaged)."""
        if winner in self.candidates:
            return [winner]
        out = []
        for m in self.ensembles[winner]:
            if m in self.candidates:
                out.append(m)
                continue
            picks = [n for chosen in fold_members for n in chosen if kind_of(self.candidates[n]) == m]
            if picks:
                out.append(max(dict.fromkeys(picks), key=picks.count))
        return list(dict.fromkeys(out))

    # prediction: the selected candidate (or ensemble) ----------------------------------------------
    def predict(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = int(self.winner)
        if w < 0:
            raise RuntimeError("no candidate is selected yet: fit router_auto or load its checkpoint")
        name = self.choices[w]
        if name in self.candidates:
            return self.candidates[name].predict(view(x, self._cols[name]), task)
        names = list(self.candidates)
        preds = [self.candidates[names[i]].predict(view(x, self._cols[names[i]]), task)
                 for i in self.members[w - len(names)].nonzero().flatten().tolist()]
        return torch.stack([p for p, _ in preds]).mean(0), torch.stack([c for _, c in preds]).mean(0)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The selected candidate's loss (val/test loss); before a selection, the reference's."""
        w = int(self.winner)
        name = self.choices[w] if w >= 0 else self.hparams.reference
        if name not in self.candidates:
            return torch.zeros(())
        return self.candidates[name].loss(view_split(batch, self._cols[name]))

    def _input(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch or split as candidate `name` reads it: its feature view, and the logged calls alone for an
        `off_policy: direct` learner."""
        return view_split(logged_view(tensors) if self.learners[name] == "direct" else tensors, self._cols[name])

    # training: every live candidate on every batch -------------------------------------------------
    def configure_optimizers(self):
        self._opt_of: dict[str, int] = {}
        opts = []
        for name, c in self.candidates.items():
            if _trains(c):
                opt = c.configure_optimizers()
                if not isinstance(opt, torch.optim.Optimizer):
                    raise TypeError(f"candidate {name!r}: configure_optimizers must return one optimiser")
                self._opt_of[name] = len(opts)
                opts.append(opt)
        return opts or torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=0.0)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        train = self.trainer.datamodule.splits["train"]
        for name, c in self.candidates.items():  # children of a ModuleDict are not attached by Lightning
            c.trainer = self.trainer
            if self.learners[name] == "direct" and "logged_mask" not in train.tensors:
                self.stopped.add(name)  # a full log (or off_policy=direct): the same learner as its twin
                continue
            full = train.tensors
            train.tensors = self._input(name, full)  # what it reads from the split (kNN's index, the task prior)
            try:
                c.on_fit_start()
            finally:
                train.tensors = full
        if self.refit_epochs is not None:  # refitting the cross-validated winner: nothing else trains
            self.stopped |= {n for n in self.candidates if n not in self.refit_epochs}
        if self._live is not None:  # resuming: continue from the live weights, not the best ones
            self.load_state_dict({**self.state_dict(), **self._live})
            self._live = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        losses = []
        for name, i in self._opt_of.items():
            if name in self.stopped:
                continue
            t0 = time.perf_counter()
            loss = self.candidates[name].loss(self._input(name, batch))
            opts[i].zero_grad()
            self.manual_backward(loss)
            opts[i].step()
            self.train_seconds[name] += time.perf_counter() - t0
            losses.append(loss.detach())
        if not self._opt_of:
            opts[0].step()  # nothing trains: the empty step only advances global_step
        if losses:
            self.log("train/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=len(batch["x"]))

    # selection on val ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """While fitting, candidates are scored on the whole split at epoch start (below); afterwards
        (`trainer.validate` on the checkpoint) the selected router is evaluated like any router."""
        if self.trainer.state.fn != "fit":
            super().validation_step(batch, batch_idx)

    def _val_predictions(self, name: str, val: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        return self.candidates[name].predict_split(view(val["x"], self._cols[name]), val["task"])

    def _rewards(self, perf: np.ndarray, cost: np.ndarray, arrays) -> np.ndarray:
        s = self.hparams.setting
        return per_query_reward(self.predicted_reward(torch.from_numpy(perf), torch.from_numpy(cost), s).numpy(),
                                arrays, s)

    def on_validation_epoch_start(self) -> None:
        """Score every live candidate on the whole val split, keep its best state, stop the stale ones."""
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        if self.refit_epochs is not None:
            self._refit_epoch()
            return
        val = self.trainer.datamodule.splits["val"].tensors
        arrays = split_arrays(val)
        for name, c in self.candidates.items():
            if name in self.stopped:
                continue
            c.eval()
            if hasattr(c, "select_alpha"):
                c.select_alpha(view_split(val, self._cols[name]))
            perf, cost = self._val_predictions(name, val)
            rewards = self._rewards(perf, cost, arrays)
            r = float(rewards.mean())
            self.epochs[name] += 1
            if r > self.best[name]["reward"] + 1e-12:
                state = {k: v.detach().clone().cpu() for k, v in c.state_dict().items()}
                self.best[name] = {"reward": r, "epoch": int(self.current_epoch), "state": state,
                                   "rewards": rewards, "perf": perf, "cost": cost}
            progress = float(c.residual_reward()) if hasattr(c, "residual_reward") else r
            if progress > self.progress[name] + 1e-12:
                self.progress[name], self.bad_epochs[name] = progress, 0
            else:
                self.bad_epochs[name] += 1
            if not _trains(c) or self.bad_epochs[name] >= self.hparams.patience:
                self.stopped.add(name)
            self.log(f"val/auto/{name}/reward", r)
        self._select(arrays)
        if all(n in self.stopped for n in self.candidates):
            self.trainer.should_stop = True

    def _refit_epoch(self) -> None:
        """A refit epoch: the winner's candidates keep their state after the epochs their fold copies needed
        (the val split is in their training data now: it cannot early-stop them)."""
        for name, target in self.refit_epochs.items():
            if name in self.stopped:
                continue
            self.epochs[name] += 1
            c = self.candidates[name]
            for buf, value in self.selection.get("refit_values", {}).get(name, {}).items():
                getattr(c, buf).fill_(value)
            self.best[name] = {"reward": float("nan"), "epoch": int(self.current_epoch),
                               "state": {k: v.detach().clone().cpu() for k, v in c.state_dict().items()}}
            if self.epochs[name] >= target or not _trains(c):
                self.stopped.add(name)
        if all(n in self.stopped for n in self.candidates):
            self.trainer.should_stop = True

    def _ensemble_members(self, members: list[str]) -> list[str]:
        """Candidate names of an ensemble: named candidates, and for each kind its val-best candidate."""
        out = []
        for m in members:
            if m in self.candidates:
                out.append(m)
                continue
            of_kind = [n for n, c in self.candidates.items() if kind_of(c) == m and "rewards" in self.best[n]]
            if of_kind:
                out.append(max(of_kind, key=lambda n: self.best[n]["reward"]))
        return list(dict.fromkeys(out))

    def _select(self, arrays) -> None:
        """The current selection from every candidate's best val state (runs each validation epoch)."""
        rewards = {n: b["rewards"] for n, b in self.best.items() if "rewards" in b}
        perf_cost = {n: (b["perf"], b["cost"]) for n, b in self.best.items() if "rewards" in b}
        names = list(self.candidates)
        self.members.zero_()
        for e_i, (e, members) in enumerate(self.ensembles.items()):
            chosen = self._ensemble_members(members)
            if len(chosen) < 2:
                continue
            for n in chosen:
                self.members[e_i, names.index(n)] = True
            self.ensemble_members[e] = chosen
            perf_cost[e] = (np.mean([perf_cost[n][0] for n in chosen], 0), np.mean([perf_cost[n][1] for n in chosen], 0))
            rewards[e] = self._rewards(*perf_cost[e], arrays)
        self.val_rewards = rewards
        z = selection_z(self.hparams.se_factor, len(rewards))
        winner = select_over_reference(rewards, self.hparams.reference, z)
        self.winner.fill_(self.choices.index(winner))
        self.selection = {"winner": winner, "selection": "holdout", "reference": self.hparams.reference,
                          "setting": self.hparams.setting,
                          "se_factor": z, "rule": str(self.hparams.se_factor),
                          "rows": selection_rows(self, rewards, perf_cost, winner, arrays)}

    # the end of fitting: best states in place, selection written ----------------------------------
    def on_train_end(self) -> None:
        for name, b in self.best.items():
            if "state" in b:
                self.candidates[name].load_state_dict(b["state"])
        if self.selection and self.trainer.is_global_zero:
            self.artifacts = write_selection(self.selection, Path(self.hparams.out_dir or self.trainer.default_root_dir))

    @property
    def summary_fields(self) -> dict[str, Any]:
        """What summary.json says of the selection (fit merges it in)."""
        if not self.selection:
            return {}
        rows = {r["candidate"]: round(r["val_reward"], 6) for r in self.selection["rows"]}
        keys = ("winner", "reference", "setting", "rule", "se_factor", "selection", "folds", "queries", "members",
                "refit_epochs", "cv_seconds")
        return {"selection": {k: self.selection[k] for k in keys if k in self.selection} | {"val_reward": rows}}

    # checkpoints: best states for routing, live states and bookkeeping for resuming ----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint["state_dict"]
        live = {k: v for k, v in sd.items() if k.startswith(_PREFIX)}
        for name, b in self.best.items():
            for k, v in (b.get("state") or {}).items():
                sd[f"{_PREFIX}{name}.{k}"] = v
        best = {n: {k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v)
                    for k, v in b.items() if k != "state"} for n, b in self.best.items()}
        checkpoint["auto"] = {"live": live, "best": best, "best_states": {n: b.get("state") for n, b in self.best.items()},
                              "bad_epochs": self.bad_epochs, "progress": self.progress, "epochs": self.epochs,
                              "train_seconds": self.train_seconds, "stopped": sorted(self.stopped),
                              "selection": self.selection}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        auto = checkpoint.get("auto")
        if not auto:
            return
        self.best = {n: {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                     for n, b in auto["best"].items()}
        for n, state in auto["best_states"].items():
            if state is not None:
                self.best[n]["state"] = state
        self.bad_epochs, self.progress = dict(auto["bad_epochs"]), dict(auto["progress"])
        self.epochs, self.train_seconds = dict(auto["epochs"]), dict(auto["train_seconds"])
        self.stopped, self.selection = set(auto["stopped"]), dict(auto["selection"])
        if self.selection.get("selection") == "cv":
            self.refit_epochs = dict(self.selection["refit_epochs"])
        self._live = auto["live"]
