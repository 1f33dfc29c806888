"""Fault tolerance: SIGTERM/SIGUSR1 save last.ckpt and exit cleanly, exact resume, atomic and checked checkpoints."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fusion_lightning.checkpointing import (
    EXIT_INTERRUPTED,
    AtomicCheckpointIO,
    RunInterrupted,
    check_checkpoint,
)
from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit, main
from fusion_lightning.io import atomic_open, atomic_write, file_lock

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# ~10 training batches per epoch, so a signal lands mid-epoch
ROUTER = ["data.synthetic.n_queries=240", "data.synthetic.models=6", "trainer.max_epochs=3", "logger=none",
          "datamodule.encoder=hashing", "datamodule.batch_size=16", "callbacks.progress_bar=null"]
DISTILL = ["data.synthetic.n_queries=60", "data.synthetic.models=3", "model.lr=5e-3", "datamodule.max_length=96",
           "logger=none", "callbacks.early_stopping=null", "trainer.max_epochs=3", "callbacks.student_eval=null",
           "callbacks.progress_bar=null", "datamodule.batch_size=4"]


def _router(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [*ROUTER, f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / name}", *extra]


@pytest.fixture(scope="module")
def router_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("router")
    return tmp, fit(compose_recipe("router_mlp", _router(tmp, "full")))


@pytest.mark.integration
def test_sigterm_to_a_fit_subprocess_saves_last_and_resume_matches_an_uninterrupted_run(router_runs) -> None:
    tmp, full = router_runs
    marker = tmp / "training"
    cmd = [sys.executable, "-m", "fusion_lightning.fit", "recipe=router_mlp", *_router(tmp, "part"),
           "+callbacks.slow._target_=interrupt.SlowAfterStep", f"+callbacks.slow.marker={marker}",
           "+callbacks.slow.step=4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "interrupted by SIGTERM" in err and "ckpt_path=last" in err
    last = tmp / "part" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert 4 <= ckpt["global_step"] < 20  # saved where it stopped, mid-run (about 11 steps per epoch, 3 epochs)
    assert not (tmp / "part" / "summary.json").exists()

    resumed = fit(compose_recipe("router_mlp", _router(tmp, "part", "ckpt_path=last")))
    for key in ("test/perf", "test/cost", "test/loss", "val/loss", "train/loss", "test/aiq"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-6, abs=1e-9), key


def test_sigusr1_mid_epoch_on_the_distilled_student_resumes_to_the_same_losses(tmp_path: Path) -> None:
    full = fit(compose_recipe("distill_top_k", [*DISTILL, f"run_dir={tmp_path / 'full'}"]))
    part = [*DISTILL, f"run_dir={tmp_path / 'part'}"]
    with pytest.raises(RunInterrupted, match="interrupted by SIGUSR1") as info:
        fit(compose_recipe("distill_top_k", [*part, "+callbacks.signal._target_=interrupt.SignalAtStep",
                                             "+callbacks.signal.step=5", "+callbacks.signal.sig=SIGUSR1"]))
    assert info.value.step == 5 and Path(info.value.ckpt_path).name == "last.ckpt"
    ckpt = torch.load(info.value.ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_num_yielded"] > 0  # mid-epoch
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after fit
    resumed = fit(compose_recipe("distill_top_k", [*part, "ckpt_path=last"]))
    for key in ("test/loss", "train/loss", "val/loss"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-5), key


def test_slurm_requeue_mid_epoch_saves_hpc_checkpoint_at_step_end_and_resumes_exactly(
        router_runs, tmp_path: Path, monkeypatch, caplog) -> None:
    """Lightning's SLURM auto-requeue without a cluster: SLURM variables, a fake `scontrol` on PATH."""
    tmp, full = router_runs
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "fl-test", "SLURM_JOB_ID": "4242",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    run = [*_router(tmp, "requeue"), "+cluster=slurm"]
    with pytest.raises(RunInterrupted, match=r"SIGUSR1 \(SLURM requeue\) at epoch 0, step 5: saved .*hpc_ckpt_1\.ckpt; "
                                             r"SLURM requeued the job"):
        fit(compose_recipe("router_mlp", [*run, "+callbacks.signal._target_=interrupt.SignalAtStep",
                                          "+callbacks.signal.step=5", "+callbacks.signal.sig=SIGUSR1"]))
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = tmp / "requeue" / "hpc_ckpt_1.ckpt"
    ckpt = torch.load(hpc, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_num_yielded"] == 5
    assert not (tmp / "requeue" / "checkpoints" / "last.ckpt").exists()  # no second, unused checkpoint
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        resumed = fit(compose_recipe("router_mlp", run))  # the requeued job: Lightning picks hpc_ckpt_1 itself
    assert f"Restored all states from the checkpoint at {hpc}" in caplog.text
    for key in ("test/perf", "test/cost", "test/loss", "val/loss", "train/loss", "test/aiq"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-6, abs=1e-9), key


def test_checkpoints_load_weights_only(router_runs) -> None:
    tmp, full = router_runs
    for name in ("best_checkpoint", "last_checkpoint"):
        ckpt = torch.load(tmp / "full" / full["artifacts"][name], map_location="cpu", weights_only=True)
        assert ckpt["fusion_lightning"] == {"module_class": "fusion_lightning.query.routers.mlp.MLPRouter",
                                            "recipe": "router_mlp"}


def test_a_failed_save_leaves_the_previous_last_ckpt_intact(tmp_path: Path, monkeypatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)

    def dies_mid_write(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    old = io.load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_atomic_write_replaces_a_file_whole_or_not_at_all(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "new" / "report.json", '{"v": 1}')  # parents created
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == '{"v": 1}' and path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError, match="killed"), atomic_open(path, "w") as fh:
        fh.write('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{"v": 1}' and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_file_lock_makes_concurrent_one_time_work_run_once(tmp_path: Path) -> None:
    done, calls = tmp_path / "done", []

    def prepare() -> None:  # what prepare_data does: build unless built, under the lock
        with file_lock(tmp_path / ".lock"):
            if not done.exists():
                calls.append(1)
                time.sleep(0.3)
                atomic_write(done, "built")

    threads = [threading.Thread(target=prepare) for _ in range(3)]  # separate opens: flock excludes them too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and done.read_text() == "built"


def test_a_truncated_checkpoint_is_a_one_line_error(router_runs, tmp_path: Path, capsys) -> None:
    tmp, full = router_runs
    data = (tmp / "full" / full["artifacts"]["last_checkpoint"]).read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    assert main(["recipe=router_mlp", *_router(tmp, "trunc"), f"ckpt_path={bad}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint {bad} is unreadable (truncated or corrupted?)" in err


def _module(recipe: str, overrides: list[str]):
    cfg = compose_recipe(recipe, overrides)
    dm = instantiate(cfg.datamodule, _convert_="all")
    dm.setup("fit")
    return instantiate(cfg.model, **dm.model_kwargs(), _convert_="all")


def test_a_mismatched_checkpoint_names_what_differs(router_runs) -> None:
    tmp, full = router_runs
    last = tmp / "full" / full["artifacts"]["last_checkpoint"]
    check_checkpoint(last, _module("router_mlp", _router(tmp, "ok")), "router_mlp")  # the matching one passes
    with pytest.raises(ValueError, match=r"saved by fusion_lightning\.query\.routers\.mlp\.MLPRouter, this run trains "
                                         r"fusion_lightning\.query\.routers\.irt\.IRTRouter"):
        check_checkpoint(last, _module("router_irt", _router(tmp, "irt")), "router_irt")
    with pytest.raises(ValueError, match=r"different models \(6 vs 5 in this run; only in the checkpoint"):
        check_checkpoint(last, _module("router_mlp", _router(tmp, "m5", "data.synthetic.models=5")), "router_mlp")
    with pytest.raises(ValueError, match=r"has shape \(128, \d+\), this run's is \(7, \d+\)"):
        check_checkpoint(last, _module("router_mlp", _router(tmp, "h", "model.hidden_dims=[7]")), "router_mlp")
    with pytest.raises(ValueError, match="comes from recipe 'router_mlp', this run is recipe 'other'"):
        check_checkpoint(last, _module("router_mlp", _router(tmp, "r")), "other")
    # wired into fit: the error comes before any training
    with pytest.raises(ValueError, match="different models"):
        fit(compose_recipe("router_mlp", _router(tmp, "m5fit", "data.synthetic.models=5", f"ckpt_path={last}")))
