"""`python -m fusion_lightning.fit` as a Hydra application: one run dir shared by every DDP rank,
`-m` sweeps with one run dir per combination and a sweep summary, `debug=fast`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_lightning.compare import main as compare_main
from fusion_lightning.config import ConfigError, compose_recipe

ROOT = Path(__file__).resolve().parents[1]


def _fit(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion_lightning.fit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _summaries(root: Path) -> list[Path]:
    return sorted(root.rglob("summary.json"))


@pytest.mark.integration
def test_two_process_ddp_run_leaves_one_run_dir(tmp_path: Path) -> None:
    """Lightning's launcher re-runs the command for rank 1; Hydra hands it rank 0's run dir."""
    r = _fit(["recipe=router_mlp", "debug=fast", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
              f"runs_root={tmp_path / 'runs'}", "logger=none"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "error" not in r.stderr.lower(), r.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "runs" / "router_mlp").iterdir()]
    assert len(run_dirs) == 1, run_dirs
    assert _summaries(tmp_path / "runs") == [run_dirs[0] / "summary.json"]
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert (run_dirs[0] / summary["artifacts"]["best_checkpoint"]).is_file()
    assert (run_dirs[0] / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same dir
    assert f"run dir: {run_dirs[0]}" in r.stdout


@pytest.mark.integration  # starts the CLI as a process
def test_multirun_gives_a_run_dir_per_combination_and_a_sweep_summary(tmp_path: Path, capsys) -> None:
    r = _fit(["-m", "recipe=router_mlp", "debug=fast", "seed=1,2", f"runs_root={tmp_path / 'runs'}", "logger=none"],
             cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "runs" / "router_mlp" / "multirun").iterdir()
    assert [p.parent.name for p in _summaries(sweep)] == ["0", "1"]
    seeds = [json.loads(p.read_text())["seed"] for p in _summaries(sweep)]
    assert seeds == [1, 2]
    record = json.loads((sweep / "sweep.json").read_text())
    assert [j["status"] for j in record["jobs"]] == ["completed", "completed"]
    assert any("seed=1" in o for o in record["jobs"][0]["overrides"])
    table = (sweep / "comparison" / "comparison.md").read_text()
    assert "| 1 |" in table and "| 2 |" in table
    assert compare_main([f"root={sweep}", f"out={tmp_path / 'cmp'}"]) == 0
    assert "Comparison of 2 runs" in capsys.readouterr().out


def test_run_dir_is_exact_when_given_and_timestamped_under_runs_root_otherwise(tmp_path: Path) -> None:
    exact = compose_recipe("router_mlp", [f"run_dir={tmp_path / 'here'}"])
    assert exact.run_dir == str(tmp_path / "here")
    default = compose_recipe("router_knn", [f"runs_root={tmp_path}"])
    assert Path(default.run_dir).parent == tmp_path / "router_knn"


def test_debug_fast_is_small_hashing_and_one_epoch() -> None:
    cfg = compose_recipe("router_auto", ["debug=fast"])
    assert cfg.trainer.max_epochs == 1 and cfg.datamodule.encoder == "hashing"
    assert cfg.data.synthetic.n_queries == 240
    assert compose_recipe("distill_top_k", ["debug=fast"]).data.synthetic.n_queries == 240
    # a recipe's own cuts (recipes/debug_recipe/fast_<recipe>.yaml) apply under debug=fast only, to it only
    enc = compose_recipe("router_encoder", ["debug=fast"])
    assert (enc.datamodule.max_length, enc.trainer.max_epochs) == (16, 1)
    assert compose_recipe("router_encoder").datamodule.max_length == 128
    sel = compose_recipe("thought_auto", ["debug=fast"]).callbacks.thought_selection
    assert (sel.max_questions, list(sel.ks), sel.sampling.max_new_tokens, sel.cross_fit) == (48, [1], 8, "auto")
    assert compose_recipe("thought_auto").callbacks.thought_selection.max_questions == 200
    # the cuts follow debug and the recipe: never set by hand (another recipe's, or a typo Hydra would skip)
    for bad in ("debug_recipe=fast_router_encoder", "+debug_recipe=nope"):
        with pytest.raises(ConfigError, match="debug_recipe is not set by hand"):
            compose_recipe("thought_auto", [bad])
    for none in ("~debug", "debug=null"):  # the default, said out loud
        assert compose_recipe("router_encoder", [none]).datamodule.max_length == 128


@pytest.mark.integration  # starts the CLI as a process
@pytest.mark.parametrize("argv, message", [
    (["recipe=nope"], "unknown recipe 'nope'; choose from: "),
    (["recipe=router_mlp", "debug=slow"], "unknown debug 'slow'; choose from: fast"),
    (["recipe=router_mlp", "model.nope=1"], "unknown config key 'model.nope'"),
])
def test_bad_commands_are_one_line_errors(argv: list[str], message: str, tmp_path: Path) -> None:
    r = _fit(argv, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.integration  # starts the CLI as a process
def test_a_bad_model_setting_is_one_line_naming_the_class(tmp_path: Path) -> None:
    """A value the model's constructor refuses (Hydra's instantiate wraps its ValueError) is one line."""
    r = _fit(["recipe=router_knn", "debug=fast", "logger=none", "model.k=0", f"runs_root={tmp_path}"], cwd=tmp_path,
             timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and "fusion_lightning.query.routers.knn.KNNRouter: k must be >= 1, got 0" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.integration
def test_two_process_deepspeed_zero2_run_leaves_one_run_dir(tmp_path: Path) -> None:
    """The same launch path under ZeRO-2, through the test-only CPU DeepSpeed strategy."""
    r = _fit(["recipe=distill_top_k", "debug=fast", "strategy=deepspeed_zero2", "model=student_full",
              "strategy._target_=deepspeed_cpu.CPUDeepSpeedStrategy", "strategy.process_group_backend=gloo",
              "trainer.devices=2", "trainer.accelerator=cpu", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
              "callbacks.student_eval.max_queries=4", "callbacks.student_eval.max_new_tokens=4",
              f"runs_root={tmp_path / 'runs'}", "logger=none"], cwd=ROOT, timeout=900,
             env={"DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(
                 [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert r.returncode == 0, r.stderr[-3000:]
    run_dirs = list((tmp_path / "runs" / "distill_top_k").iterdir())
    assert len(run_dirs) == 1 and _summaries(tmp_path / "runs") == [run_dirs[0] / "summary.json"]
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["metrics"]["train/loss"] == summary["metrics"]["train/loss"]  # trained, not NaN
    assert (run_dirs[0] / "train_ddp_process_1.log").is_file()
