"""Strong/weak threshold calibration (`route calibrate.strong_fraction=`), its use by `route`, the peers' metrics in a run's
summary and routing table, and the RouterArena / RouteLLM export formats read back."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import write_planted_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.calibrate import (
    heldout_from_run,
    parse_target,
    threshold_for_budget,
    threshold_for_fraction,
)
from fusion_lightning.query.router import CALIBRATION_KEY, Router
from fusion_lightning.route import main as route_main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("strong_weak")
    folder = write_planted_logs(tmp / "planted", n_per_task=300)  # 900 train queries: a val split of ~90
    summary = fit(compose_recipe("router_mlp", [
        "data=llmrouter", f"data.path={folder}", "datamodule.encoder=hashing",
        f"datamodule.embedding_cache={tmp / 'cache'}", f"run_dir={tmp / 'run'}", "trainer.max_epochs=8",
        "logger=none"]))
    return {"summary": summary, "dir": tmp / "run", "ckpt": tmp / "run" / summary["artifacts"]["best_checkpoint"]}


@pytest.fixture
def ckpt(run: dict, tmp_path: Path) -> Path:
    """A copy of the run's checkpoint inside its run dir (calibration finds config.yaml two levels up)."""
    dst = run["ckpt"].with_name(f"copy-{tmp_path.name}.ckpt")
    shutil.copy(run["ckpt"], dst)
    return dst


def val_queries(ckpt: Path, tmp_path: Path) -> Path:
    """The val split's queries (and tasks) as a route input file."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    dm = instantiate(OmegaConf.load(ckpt.parents[1] / "config.yaml").datamodule, _convert_="all")
    dm.setup("fit")
    m = dm.matrices["val"]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"query": q, "task": t}) + "\n" for q, t in zip(m.queries, m.tasks, strict=True)))
    return path


def test_summary_and_routing_table_have_the_peer_metrics(run: dict) -> None:
    m = run["summary"]["metrics"]
    for k in ("test/apgr", "test/cpt@50", "test/cpt@80", "test/arena_score", "test/best_single/arena_score",
              "val/apgr", "test/strong_weak/strong_perf", "test/strong_weak/weak_perf"):
        assert k in m, k
    assert 0.0 <= m["test/cpt@50"] <= 1.0 and 0.0 <= m["test/arena_score"] <= 1.0
    assert m["test/strong_weak/strong_perf"] > m["test/strong_weak/weak_perf"]  # gamma beats delta
    # gamma's lead over delta is nearly the same on every planted task, so there is little to recover here
    # beyond a random router's 0.5 (the signal case is tested in test_peer_metrics.py)
    assert 0.3 < m["test/apgr"] < 1.0
    table = (run["dir"] / "routing_table.md").read_text()
    assert "strong = gamma" in table and "weak = delta" in table and "APGR" in table and "CPT(50%)" in table
    assert "RouterArena score" in table


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_calibration_hits_the_strong_fraction_on_held_out_data(ckpt: Path, tmp_path: Path, fraction: float,
                                                               capsys) -> None:
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert route_main([f"ckpt={ckpt}", f"calibrate.strong_fraction={fraction}"]) == 0
    assert "strong=gamma weak=delta" in capsys.readouterr().out
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    rec = after[CALIBRATION_KEY]
    assert (rec["strong"], rec["weak"], rec["target"]) == ("gamma", "delta", f"strong_fraction={fraction:g}")
    assert abs(rec["strong_fraction"] - fraction) <= 0.02 and rec["queries"] >= 60
    for k in before["state_dict"]:  # weights and buffers untouched (the Platt table has NaN for raw models)
        torch.testing.assert_close(before["state_dict"][k], after["state_dict"][k], rtol=0, atol=0, equal_nan=True)
    router = Router.load(ckpt)
    assert router.calibration == rec
    held = heldout_from_run(router, ckpt)  # recomputed independently of the stored share
    share = float((held.perf[:, held.strong] - held.perf[:, held.weak] >= rec["threshold"]).mean())
    assert abs(share - fraction) <= 0.02
    # later `route` runs use the stored threshold: the val queries routed from text hit the fraction too
    out = tmp_path / "routed.jsonl"
    assert route_main([f"ckpt={ckpt}", f"input={val_queries(ckpt, tmp_path)}", f"output={out}"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["model"] for r in rows} <= {"gamma", "delta"}
    assert abs(np.mean([r["model"] == "gamma" for r in rows]) - fraction) <= 0.02
    assert all((r["model"] == "gamma") == (r["strong_score"] >= r["threshold"]) for r in rows)
    # an explicit cost weight (or mode=argmax) routes by argmax over all models as before
    assert route_main([f"ckpt={ckpt}", f"input={val_queries(ckpt, tmp_path)}", f"output={out}", "lam=0"]) == 0
    assert "strong_score" not in json.loads(out.read_text().splitlines()[0])


def test_budget_calibration_stays_within_budget(ckpt: Path, capsys) -> None:
    assert route_main([f"ckpt={ckpt}", "calibrate.budget=1e9"]) == 0  # everything strong
    rec = torch.load(ckpt, map_location="cpu", weights_only=True)[CALIBRATION_KEY]
    assert rec["strong_fraction"] == 1.0
    all_strong = rec["usd_per_1k"]
    assert route_main([f"ckpt={ckpt}", "calibrate.budget=0"]) == 1  # below all-weak: a clear error
    assert "below the cost of sending every held-out query to the weak model" in capsys.readouterr().err
    assert route_main([f"ckpt={ckpt}", "calibrate.strong_fraction=0"]) == 0
    all_weak = torch.load(ckpt, map_location="cpu", weights_only=True)[CALIBRATION_KEY]["usd_per_1k"]
    budget = (all_weak + all_strong) / 2
    assert route_main([f"ckpt={ckpt}", f"calibrate.budget={budget}"]) == 0
    rec = torch.load(ckpt, map_location="cpu", weights_only=True)[CALIBRATION_KEY]
    assert rec["usd_per_1k"] <= budget and 0.2 < rec["strong_fraction"] < 0.8


def test_calibrate_on_input_into_a_new_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    new = tmp_path / "calibrated.ckpt"
    queries = val_queries(ckpt, tmp_path)
    assert route_main([f"ckpt={ckpt}", f"input={queries}", "calibrate.strong_fraction=0.4", "pair=[alpha,delta]",
                       f"save_ckpt={new}"]) == 0
    assert CALIBRATION_KEY not in torch.load(ckpt, map_location="cpu", weights_only=True)  # left untouched
    rec = Router.load(new).calibration
    assert (rec["strong"], rec["weak"]) == ("alpha", "delta") and abs(rec["strong_fraction"] - 0.4) <= 0.02
    result = Router.load(new).route_strong_weak([json.loads(x)["query"] for x in queries.read_text().splitlines()])
    assert set(result.models) <= {"alpha", "delta"}
    with pytest.raises(ValueError, match="no strong/weak threshold"):
        Router.load(ckpt).route_strong_weak(["sum the numbers"])
    assert route_main([f"ckpt={ckpt}", "calibrate.strong_fraction=0.4", "pair=[alpha,nope]"]) == 1
    # the previous release's spelling calibrates the same
    old = tmp_path / "old.ckpt"
    assert route_main(["--ckpt", str(ckpt), "--input", str(queries), "--calibrate", "strong_fraction=0.4",
                       "--pair", "alpha,delta", "--save-ckpt", str(old)]) == 0
    assert Router.load(old).calibration == rec


def test_threshold_quantile_generalises_within_two_points() -> None:
    rng = np.random.default_rng(0)
    calib, fresh = rng.beta(2, 5, 3000), rng.beta(2, 5, 30000)  # held-out scores from the same distribution
    for f in (0.1, 0.3, 0.5, 0.8):
        t = threshold_for_fraction(calib, f)
        assert abs((calib >= t).mean() - f) <= 0.001 and abs((fresh >= t).mean() - f) <= 0.02
    assert (calib >= threshold_for_fraction(calib, 0.0)).sum() == 0
    # budget: 10 queries, weak costs 1, strong 3 (USD per call): 1.4 USD per query allows 2 strong calls
    scores = np.arange(10.0)
    t = threshold_for_budget(scores, np.full(10, 3.0), np.full(10, 1.0), 1400.0)
    assert t == 8.0 and (scores >= t).sum() == 2
    for bad in ("strong_fraction=1.5", "budget=-1", "fraction=0.3", "strong_fraction=x"):
        with pytest.raises(ValueError, match="--calibrate takes"):
            parse_target(bad)


def test_routerarena_prediction_file(ckpt: Path, tmp_path: Path) -> None:
    dataset = [{"global index": f"ArcMMLU_{i}", "prompt_formatted": q, "prompt": "raw " + q}
               for i, q in enumerate(["add the sum of these numbers", "which river crosses the capital"])]
    src = tmp_path / "router_data.json"
    src.write_text(json.dumps(dataset))
    out = tmp_path / "predictions.json"
    assert route_main([f"ckpt={ckpt}", f"input={src}", f"output={out}", "format=routerarena"]) == 0
    preds = json.loads(out.read_text())
    assert [p["global index"] for p in preds] == ["ArcMMLU_0", "ArcMMLU_1"]
    assert [p["prompt"] for p in preds] == [d["prompt_formatted"] for d in dataset]  # as RouterArena checks it
    assert all(p["prediction"] in {"alpha", "beta", "gamma", "delta"} for p in preds)
    assert all(p["generated_result"] is None and p["cost"] is None and p["accuracy"] is None for p in preds)
    assert preds[0]["prediction"] == "alpha" and preds[1]["prediction"] == "beta"  # the planted rule, argmax
    nameless = tmp_path / "no_index.jsonl"
    nameless.write_text('{"query": "a"}\n{"query": "b", "global_index": "X_1"}\n')
    out2 = tmp_path / "p2.json"
    assert route_main([f"ckpt={ckpt}", f"input={nameless}", f"output={out2}", "format=routerarena"]) == 1
    assert not out2.exists()


def test_routellm_decision_csv(ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"query": q}) + "\n" for q in
                           ["add the sum of these numbers", "which river crosses the capital", "a sonnet, please"]))
    out = tmp_path / "decisions.csv"
    assert route_main([f"ckpt={ckpt}", f"input={src}", f"output={out}", "format=routellm"]) == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["prompt"] for r in rows][0] == "add the sum of these numbers" and list(rows[0]) == ["prompt", "model", "score"]
    router = Router.load(ckpt)
    result = router.route([r["prompt"] for r in rows])
    assert [r["model"] for r in rows] == result.models
    np.testing.assert_allclose([float(r["score"]) for r in rows], result.scores.max(1), rtol=1e-6)
    assert route_main([f"ckpt={ckpt}", "calibrate.strong_fraction=0.5"]) == 0
    assert route_main([f"ckpt={ckpt}", f"input={src}", f"output={out}", "format=routellm"]) == 0
    rows = list(csv.DictReader(out.open(newline="")))
    threshold = Router.load(ckpt).calibration["threshold"]
    assert all(r["model"] == ("gamma" if float(r["score"]) >= threshold else "delta") for r in rows)
