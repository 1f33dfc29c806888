"""`python -m fusion_lightning.compare`: runs side by side from their run dirs (a W&B offline run among them)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fusion_lightning.compare import main
from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit

SMALL = ["data.synthetic.n_queries=240", "data.synthetic.models=6", "trainer.max_epochs=2",
         "datamodule.encoder=hashing", "callbacks.progress_bar=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "WANDB_RUN_ID"):
        mp.delenv(var, raising=False)
    (root / "netrc").write_text("")
    mp.setenv("NETRC", str(root / "netrc"))
    mp.setenv("WANDB_DIR", str(root))
    mp.setenv("WANDB_CONFIG_DIR", str(root / ".wandb_config"))
    mp.setenv("WANDB_CACHE_DIR", str(root / ".wandb_cache"))
    cache = f"datamodule.embedding_cache={root / '.cache'}"
    out = {
        "a": fit(compose_recipe("router_mlp", [*SMALL, cache, "logger=wandb", f"run_dir={root / 'runs' / 'a'}"])),
        "b": fit(compose_recipe("router_mlp", [*SMALL, cache, "model.lr=0.01", "seed=7",
                                               f"run_dir={root / 'runs' / 'b'}"])),
    }
    mp.undo()
    return root, out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_run_dirs_shows_differing_overrides_seed_and_metrics(runs, tmp_path: Path, capsys) -> None:
    root, summaries = runs
    dirs = [str(root / "runs" / n) for n in ("a", "b")]
    assert main([*dirs, "--metric", "test/perf", "--metric", "test/aiq", "--out", str(tmp_path)]) == 0
    rows = _csv(tmp_path / "comparison.csv")
    assert [r["run"] for r in rows] == dirs
    assert [r["recipe"] for r in rows] == ["router_mlp", "router_mlp"]
    assert [r["seed"] for r in rows] == ["42", "7"]
    assert [float(r["model.lr"]) for r in rows] == [0.001, 0.01]
    # the W&B offline run of `a`, found through its run dir
    wandb_id = (root / "runs" / "a" / "wandb" / "latest-run").resolve().name.rsplit("-", 1)[-1]
    assert [r["wandb"] for r in rows] == [wandb_id, ""]
    for r, n in zip(rows, ("a", "b"), strict=True):
        assert float(r["test/perf"]) == pytest.approx(summaries[n]["metrics"]["test/perf"], rel=1e-9)
        assert float(r["test/aiq"]) == pytest.approx(summaries[n]["metrics"]["test/aiq"], rel=1e-9)
    cols = set(rows[0])
    assert "data.synthetic.models" not in cols  # the same in both runs
    assert not [c for c in cols if "run_dir" in c or c.startswith("callbacks.model_checkpoint.dirpath")]
    assert [r["logger"] for r in rows] == ["wandb", "csv"]  # a config group the runs chose differently
    assert not [c for c in cols if c.startswith("logger.")]
    md = (tmp_path / "comparison.md").read_text()
    assert "| run | recipe |" in md and f"{summaries['b']['metrics']['test/perf']:.4g}" in md
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "Comparison of 2 runs" in capsys.readouterr().out


def test_compare_root_finds_fit_runs_and_says_what_it_skipped(runs, tmp_path: Path, capsys) -> None:
    root, _ = runs
    other = root / "runs" / "eval"
    other.mkdir(exist_ok=True)
    (other / "summary.json").write_text(json.dumps({"split": "test", "overall": {}}))  # an evaluate summary
    assert main(["--root", str(root / "runs"), "--out", str(tmp_path)]) == 0
    rows = _csv(tmp_path / "comparison.csv")
    assert sorted(Path(r["run"]).name for r in rows) == ["a", "b"]
    assert {"test/perf", "test/cost", "test/aiq"} <= set(rows[0])  # the default metrics present in the runs
    assert f"skipped {other / 'summary.json'}" in capsys.readouterr().err


def test_compare_errors_name_the_problem(runs, tmp_path: Path, capsys) -> None:
    root, _ = runs
    assert main([str(root / "runs" / "a"), "--metric", "test/nope", "--out", str(tmp_path)]) == 1
    assert "metric(s) ['test/nope'] in none of the runs" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text('{"recipe": "x",\n "metrics": }')
    assert main([str(bad), "--out", str(tmp_path)]) == 1
    assert f"{bad / 'summary.json'}: line 2: not valid JSON" in capsys.readouterr().err
