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
    assert main([f"runs=[{','.join(dirs)}]", "metrics=[test/perf,test/aiq]", f"out={tmp_path}"]) == 0
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
    assert main([f"root={root / 'runs'}", f"out={tmp_path}"]) == 0
    rows = _csv(tmp_path / "comparison.csv")
    assert sorted(Path(r["run"]).name for r in rows) == ["a", "b"]
    assert {"test/perf", "test/cost", "test/aiq"} <= set(rows[0])  # the default metrics present in the runs
    assert f"skipped {other / 'summary.json'}" in capsys.readouterr().err


def test_compare_errors_name_the_problem(runs, tmp_path: Path, capsys) -> None:
    root, _ = runs
    assert main([f"runs=[{root / 'runs' / 'a'}]", "metrics=[test/nope]", f"out={tmp_path}"]) == 1
    assert "metric(s) ['test/nope'] in none of the runs" in capsys.readouterr().err
    assert main([f"runs=[{tmp_path / 'missing'}]", f"out={tmp_path}"]) == 1
    assert "no summary.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text('{"recipe": "x",\n "metrics": }')
    assert main([f"runs=[{bad}]", f"out={tmp_path}"]) == 1
    assert f"{bad / 'summary.json'}: line 2: not valid JSON" in capsys.readouterr().err
    assert main([f"runs=[{bad}]", "metric=test/perf"]) == 1  # a misspelt key: one line naming the keys
    err = capsys.readouterr().err
    assert err == ("error: unknown config key 'metric' (use +metric=... to add a new key); valid keys at the top "
                   "level: metrics, out, root, runs, wandb_project\n")
    assert main([]) == 2 and main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("`python -m fusion_lightning.compare runs=[RUN_DIR,...]") and "\nruns: []" in out


def test_compare_old_spelling_gives_the_same_table_and_the_new_spelling(runs, tmp_path: Path, capsys) -> None:
    """Run dirs as words, `--metric` repeated and `--out DIR` (the previous release) still work, with one note."""
    root, _ = runs
    dirs = [str(root / "runs" / n) for n in ("a", "b")]
    assert main([f"runs=[{','.join(dirs)}]", "metrics=[test/perf,test/aiq]", f"out={tmp_path / 'new'}"]) == 0
    assert main([*dirs, "--metric", "test/perf", "--metric=test/aiq", "--out", str(tmp_path / "old")]) == 0
    err = capsys.readouterr().err
    assert err == (f"note: {dirs[0]} {dirs[1]} --metric test/perf --metric=test/aiq --out {tmp_path / 'old'} is now "
                   f"'runs=[{dirs[0]},{dirs[1]}]' 'metrics=[test/perf,test/aiq]' out={tmp_path / 'old'} "
                   "(the --flag spelling goes in the next release)\n")
    assert _csv(tmp_path / "old" / "comparison.csv") == _csv(tmp_path / "new" / "comparison.csv")
    assert main(["--root", str(root / "runs"), "--out", str(tmp_path / "root_old")]) == 0
    assert main([f"root={root / 'runs'}", f"out={tmp_path / 'root_new'}"]) == 0
    assert _csv(tmp_path / "root_old" / "comparison.csv") == _csv(tmp_path / "root_new" / "comparison.csv")


def test_an_old_positional_run_dir_with_an_equals_sign_is_a_run_dir() -> None:
    """`compare runs/lr=0.1 ...`: a word whose part before '=' holds a '/' is a path, not a key."""
    from fusion_lightning.config import compose_command, legacy_flags

    out = legacy_flags(["runs/lr=0.1", "runs/lr=0.01", "out=cmp"], {"--out": "out"}, positional="runs")
    cfg = compose_command("compare", out)
    assert cfg["runs"] == ["runs/lr=0.1", "runs/lr=0.01"] and cfg["out"] == "cmp"
