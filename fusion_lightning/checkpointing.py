"""Fault tolerance: atomic checkpoint files, checks before a resume, and save-and-exit on SIGTERM/SIGUSR1.

Lightning 2.6 already turns SIGTERM into `trainer.received_sigterm` and raises `SIGTERMException`
from its loops at the next safe point (end of a training batch, end of an epoch), calling every
callback's `on_exception` first; it checkpoints the position of `StatefulDataLoader` train loaders
and restores it on resume. `FaultTolerance` builds on that: it writes `last.ckpt` there, also
treats SIGUSR1 as SIGTERM when nothing else handles it (SLURM auto-requeue does), and records the
module class and recipe in every checkpoint so that a resume from the wrong one fails clearly.
"""

from __future__ import annotations

import pickle
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from fusion_lightning.io import atomic_open

EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later" - the run saved last.ckpt and can resume


class RunInterrupted(Exception):
    """fit stopped on a signal after saving a checkpoint; `main` prints this and exits with EXIT_INTERRUPTED."""

    def __init__(self, signal_name: str, ckpt_path: str | None, epoch: int, step: int, resume: str):
        self.signal_name, self.ckpt_path, self.epoch, self.step = signal_name, ckpt_path, epoch, step
        saved = f"saved {ckpt_path}" if ckpt_path else "no checkpoint saved (no training step had run)"
        then = ("SLURM requeued the job, which resumes from it" if ckpt_path and Path(ckpt_path).name.startswith("hpc_")
                else f"resume with: {resume}")
        super().__init__(f"interrupted by {signal_name} at epoch {epoch}, step {step}: {saved}; {then}")


class Requeued(SIGTERMException):
    """Raised at a safe point by `SLURMRequeue` once Lightning saved `ckpt_path` (hpc_ckpt_N.ckpt) and
    requeued the job: the run stops like on SIGTERM, and FaultTolerance writes no last.ckpt of its own."""

    def __init__(self, ckpt_path: str | None, signal_name: str = "SIGUSR1"):
        super().__init__(f"requeued by SLURM after saving {ckpt_path}")
        self.ckpt_path, self.signal_name = ckpt_path, signal_name


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save streamed into a temp file beside the target, fsynced, renamed (fusion_lightning.io).

    Lightning's own TorchCheckpointIO serialises into memory, writes a temp file in the *system* temp
    dir and moves it into place: a rename only where that dir is on the checkpoint's filesystem, else
    (node-local /tmp, shared run dir: the usual cluster layout) a copy straight into `last.ckpt`, which
    a kill mid-copy leaves truncated; nothing is fsynced. Loads weights-only where the checkpoint allows it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options: {storage_options!r}")
        with atomic_open(path, "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:  # holds objects beyond tensors/containers: trusted (our run dir)
            rank_zero_warn(f"{path}: not loadable with weights_only=True ({str(e).splitlines()[0]}); "
                           "loading it as a trusted full pickle")
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)


def checkpoint_plugins(strategy: Any) -> list[Any]:
    """The atomic CheckpointIO for the standard strategies; DeepSpeed writes checkpoint directories itself."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return [] if isinstance(strategy, DeepSpeedStrategy) else [AtomicCheckpointIO()]


def module_class(module: Any) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _read(path: Path) -> dict[str, Any]:
    # mmap: the check reads metadata and shapes only, so a large checkpoint is not materialised a
    # second time before Lightning loads it for the resume
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for truncated/corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupted?): {type(e).__name__}: {first}")\
            from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def check_checkpoint(path: str | Path, module: L.LightningModule, recipe: str | None = None) -> None:
    """Before resuming: `path` is readable and was saved by this recipe's module with the same models,
    tasks and parameter shapes; else a one-line ValueError naming what differs."""
    path = Path(path)
    if path.is_dir():  # a DeepSpeed checkpoint directory: DeepSpeed checks its own shards
        return
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {path}: no such checkpoint")
    ckpt = _read(path)
    meta = ckpt.get("fusion_lightning") or {}
    saved_cls = meta.get("module_class") or ckpt.get("router_class")
    if saved_cls:  # a class that moved since (e.g. the routers into query/routers/) maps to where it is now
        saved_cls = getattr(module, "class_path_now", lambda c: c)(saved_cls)
    if saved_cls and saved_cls != module_class(module):
        raise ValueError(f"checkpoint {path} was saved by {saved_cls}, this run trains {module_class(module)}")
    if recipe and meta.get("recipe") and meta["recipe"] != recipe:
        raise ValueError(f"checkpoint {path} comes from recipe {meta['recipe']!r}, this run is recipe {recipe!r}")
    saved_hp, hp = ckpt.get("hyper_parameters") or {}, dict(module.hparams)
    for key in ("models", "tasks", "name_or_path"):
        if key not in saved_hp or key not in hp:
            continue
        a, b = _aslist(saved_hp[key]), _aslist(hp[key])
        if a != b:
            only_ckpt, only_run = [x for x in a if x not in b], [x for x in b if x not in a]
            detail = (f"only in the checkpoint: {only_ckpt[:5]}, only in this run: {only_run[:5]}"
                      if only_ckpt or only_run else "same entries in a different order")
            raise ValueError(f"checkpoint {path} has different {key} ({len(a)} vs {len(b)} in this run; {detail})")
    own = module.state_dict()
    for name, tensor in ckpt["state_dict"].items():
        if name not in own:
            raise ValueError(f"checkpoint {path} has parameter {name!r}, which this run's "
                             f"{type(module).__name__} does not have")
        # an empty buffer is a placeholder sized from the data on fit (kNN index, task prior, task classifier)
        if hasattr(tensor, "shape") and tuple(tensor.shape) != tuple(own[name].shape) and own[name].numel():
            raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {tuple(tensor.shape)}, "
                             f"this run's is {tuple(own[name].shape)}")
    partial = bool((ckpt.get("student") or {}).get("lora"))  # LoRA checkpoints hold only the adapter
    # state a newer version added with a default (e.g. a router's score_calibration): an older checkpoint lacks it
    optional = set(getattr(module, "optional_state", ()))
    missing = [] if partial else [n for n in own if n not in ckpt["state_dict"] and n.rsplit(".", 1)[-1] not in optional]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} parameter(s) of this run's "
                         f"{type(module).__name__}, e.g. {missing[:3]}")


def _aslist(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def find_last(dirpath: str | Path) -> Path | None:
    """The newest last*.ckpt in a checkpoint folder (what Lightning's ckpt_path="last" picks)."""
    found = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class FaultTolerance(L.Callback):
    """Save `last.ckpt` when Lightning stops on SIGTERM (or SIGUSR1); record class and recipe in checkpoints."""

    def __init__(self, dirpath: str | Path, recipe: str | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.recipe = recipe
        self.signal_name = "SIGTERM"
        self.saved: str | None = None
        self.interrupted = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["fusion_lightning"] = {"module_class": module_class(pl_module), "recipe": self.recipe}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its handlers (it restores the originals in teardown): with
        # SLURMEnvironment(auto_requeue=True) SIGUSR1 is Lightning's requeue signal, else it has none
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) \
                and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._stop_like_sigterm)

    def _stop_like_sigterm(self, signum: int, frame: Any) -> None:
        self.signal_name = "SIGUSR1"
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's: sets trainer.received_sigterm
        if callable(handler):
            handler(signal.SIGTERM, frame)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.interrupted = True
        if isinstance(exception, Requeued):  # the hpc checkpoint is the one the requeued job resumes from
            self.signal_name, self.saved = f"{exception.signal_name} (SLURM requeue)", exception.ckpt_path
            return
        path = self.dirpath / "last.ckpt"
        if trainer.state.fn != TrainerFn.FITTING:  # during the final validate/test: training's last.ckpt stands
            self.saved = str(path) if path.is_file() else None
            return
        if trainer.global_step == 0 or trainer.sanity_checking:
            return
        trainer.save_checkpoint(path)
        self.saved = str(path)
