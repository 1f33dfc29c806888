"""fit(cfg) and the `python -m fusion_lightning.fit` command: recipes, run dirs, summaries, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusion_lightning.config import ConfigError, compose_recipe, group_options, list_recipes
from fusion_lightning.fit import fit

# Small, fast data for every run in this module; the encoder choice is per test.
SMALL = ["data.synthetic.n_queries=240", "data.synthetic.models=6", "trainer.max_epochs=3"]


def _small(tmp_path: Path, *extra: str, encoder: str = "hashing", recipe: str = "router_mlp") -> list[str]:
    """Overrides for a fast run: the fast encoder and a private cache where the recipe's DataModule has them
    (the encoder router fine-tunes its own encoder; the distillation DataModule has no embeddings)."""
    dm = compose_recipe(recipe).datamodule
    opt = {"encoder": encoder, "embedding_cache": tmp_path / "cache"}
    return [*SMALL, f"run_dir={tmp_path / 'run'}", *(f"datamodule.{k}={v}" for k, v in opt.items() if k in dm),
            *extra]


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_composes_with_every_data_source(recipe: str) -> None:
    for data in group_options("data"):
        cfg = compose_recipe(recipe, [f"data={data}"])
        assert cfg.recipe == recipe and cfg.data.format in (data, "synthetic")
        assert cfg.model._target_ and cfg.trainer._target_ and cfg.datamodule._target_


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_smoke_runs_with_debug_fast(recipe: str, tmp_path: Path) -> None:
    """debug=fast: a tiny synthetic log, the hashing encoder, one epoch, through checkpoints and test."""
    # the layer probe reads a causal LM's layers (the zoo's tiny one); its pick stays out of the user's cache
    probe = ["encoder=hf:tiny-llama", "model.cache_pick=false"] if recipe == "layer_probe" else []
    summary = fit(compose_recipe(recipe, ["debug=fast", f"run_dir={tmp_path / 'run'}", *probe]))
    assert summary["recipe"] == recipe and summary["data"]["queries"] == 240
    if "probe" in summary:  # the train split's queries, every layer of tiny-llama (0..2) in one pass
        train = summary["data"]["train_queries"]
        assert summary["embed"]["unique"] == train and summary["probe"]["layer"] in (0, 1, 2)
    elif "embed" in summary:  # recipe=embed runs trainer.predict: shards, not test metrics
        assert summary["embed"]["unique"] == 240 and summary["embed"]["cached"] + summary["embed"]["embedded"] == 240
    else:
        assert any(k.startswith("test/") for k in summary["metrics"])
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_quickstart_recipe_end_to_end_with_minilm(tmp_path: Path) -> None:
    """The Quickstart path: default recipe, real encoder, checkpoints, test on the best one."""
    cfg = compose_recipe("router_mlp", _small(tmp_path, encoder="minilm"))
    summary = fit(cfg)
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary) == {"recipe", "seed", "data", "metrics", "artifacts", "score_calibration"}
    # Platt scaling on val (callbacks/score_calibration.py) says why it did nothing: the synthetic scores are graded
    assert summary["score_calibration"] == {"skipped": "scores are not 0/1: a success probability has nothing to "
                                                       "be calibrated against"}
    assert summary["seed"] == 42
    data = summary["data"]
    assert data["queries"] == 240 and data["models"] == 6 and data["rows"] == 240 * 6
    assert data["train_queries"] + data["val_queries"] + data["test_queries"] == 240
    m = summary["metrics"]
    for key in ("test/perf", "test/cost", "test/gap_closed", "test/best_single/perf", "test/oracle/perf",
                "test/task_best/perf", "test/random/perf", "val/loss", "train/loss"):
        assert key in m, key
    assert m["test/oracle/perf"] >= m["test/best_single/perf"] >= m["test/random/perf"] - 1e-9
    assert 0.0 <= m["test/perf"] <= m["test/oracle/perf"] + 1e-9
    # artifacts are relative paths that exist in the run dir
    assert summary["artifacts"]["config"] == "config.yaml"
    for rel in summary["artifacts"].values():
        assert (run / rel).exists(), rel
    assert summary["artifacts"]["best_checkpoint"].startswith("checkpoints/")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run_dir"] == str(run.resolve()) and saved["datamodule"]["data"]["format"] == "synthetic"


def test_same_recipe_overrides_and_seed_give_same_metrics(tmp_path: Path) -> None:
    a = fit(compose_recipe("router_mlp", _small(tmp_path / "a")))
    b = fit(compose_recipe("router_mlp", _small(tmp_path / "b")))
    assert a["metrics"] == b["metrics"]
    c = fit(compose_recipe("router_mlp", _small(tmp_path / "c", "seed=7")))
    assert c["metrics"]["train/loss"] != a["metrics"]["train/loss"]


def test_default_run_dir_is_under_runs_root_by_recipe(tmp_path: Path) -> None:
    overrides = [o for o in _small(tmp_path, "+trainer.fast_dev_run=true") if not o.startswith("run_dir=")]
    cfg = compose_recipe("router_mlp", [*overrides, f"runs_root={tmp_path / 'runs'}"])
    fit(cfg)
    run = Path(cfg.run_dir)
    assert run.parent == (tmp_path / "runs" / "router_mlp").resolve()
    assert (run / "summary.json").exists()


def test_unknown_recipe_and_bad_overrides_name_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; choose from: .*router_mlp"):
        compose_recipe("nope")
    with pytest.raises(ConfigError, match="unknown data 'nope'; choose from: llmfusionbench, llmrouter"):
        compose_recipe("router_mlp", ["data=nope"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_epoch'.*max_epochs"):
        compose_recipe("router_mlp", ["trainer.max_epoch=3"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fusion_lightning.fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration  # starts the CLI as a process
def test_cli_help_lists_recipes_with_descriptions(tmp_path: Path) -> None:
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for name, desc in list_recipes().items():
        assert name in r.stdout and desc[:30] in r.stdout


@pytest.mark.integration  # starts the CLI as a process
def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = _cli("recipe=nope", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "choose from" in r.stderr
    r = _cli("recipe=router_mlp", "data=nope", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "llmrouter" in r.stderr
    r = _cli("recipe=router_mlp", "trainer.max_epochs=[", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    r = _cli("recipe=router_mlp", "data=llmfusionbench", f"data.path={tmp_path / 'missing.parquet'}",
             f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 1 and "missing.parquet" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration  # starts the CLI as a process
def test_cli_runs_from_another_directory_and_prints_run_dir_last(tmp_path: Path) -> None:
    r = _cli("recipe=router_mlp", *_small(tmp_path, "+trainer.fast_dev_run=true"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"run dir: {(tmp_path / 'run').resolve()}"
    assert (tmp_path / "run" / "summary.json").exists()
