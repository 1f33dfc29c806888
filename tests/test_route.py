"""Route API and CLI: a saved router routes new queries exactly as the trained module did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import planted_overrides

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.metrics import check_decision, tolerance_decision
from fusion_lightning.query.router import Router
from fusion_lightning.route import main as route_main

QUERIES = [
    ("add the sum of these numbers plus digits", "arithmetic"),
    ("which river crosses the capital city of this country", "geography"),
    ("multiply the product total numbers", None),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("route")
    summary = fit(compose_recipe("router_mlp", planted_overrides(tmp, "trainer.max_epochs=25", "logger=none")))
    return tmp / "run" / summary["artifacts"]["best_checkpoint"]


def test_load_restores_models_tasks_and_encoder(trained: Path) -> None:
    router = Router.load(trained)
    assert router.models == ["alpha", "beta", "gamma", "delta"]
    assert router.module.hparams.tasks[0] == "<unk>" and "geography" in router.module.hparams.tasks
    assert router.encoder.name == "hashing-256"


def test_route_follows_the_planted_rule(trained: Path) -> None:
    result = Router.load(trained).route([q for q, _ in QUERIES], tasks=[t for _, t in QUERIES])
    assert result.models[:2] == ["alpha", "beta"]
    assert result.scores.shape == (3, 4) and np.isfinite(result.scores).all()
    assert result.perf.min() >= 0 and result.perf.max() <= 1


def test_cost_weight_moves_choices_to_cheaper_models(trained: Path) -> None:
    router = Router.load(trained)
    queries = [q for q, _ in QUERIES]
    tasks = [t for _, t in QUERIES]
    free = router.route(queries, tasks, lam=0.0)
    pricey = router.route(queries, tasks, lam=100.0)
    cheapest = int(np.argmin(pricey.cost.mean(axis=0)))
    assert pricey.models == [router.models[cheapest]] * 3
    assert (free.scores != pricey.scores).any()


def test_tolerance_rule_by_hand() -> None:
    """The cheapest model predicted within τ of the best (ties in cost: the better prediction); an
    unavailable model neither wins nor sets the best."""
    perf = np.array([[0.90, 0.88, 0.70], [0.50, 0.60, 0.59], [0.80, 0.80, 0.80]])
    cost = np.array([[1.0, 0.2, 0.01], [0.3, 0.9, 0.1], [0.5, 0.5, 0.9]])
    assert tolerance_decision(perf, cost, 0.0).tolist() == [0, 1, 0]
    assert tolerance_decision(perf, cost, 0.05).tolist() == [1, 2, 0]
    assert tolerance_decision(perf, cost, 0.25).tolist() == [2, 2, 0]
    assert tolerance_decision(perf, cost, 0.0, available=np.array([False, True, True])).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="not both"):
        check_decision(0.5, 0.02)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        check_decision(0.0, float("nan"))


def test_tolerance_routes_to_cheaper_models_within_the_margin(trained: Path, tmp_path: Path) -> None:
    router = Router.load(trained)
    queries, tasks = [q for q, _ in QUERIES], [t for _, t in QUERIES]
    best = router.route(queries, tasks)
    exact = router.route(queries, tasks, tolerance=0.0)
    assert exact.models == best.models  # τ = 0 is the argmax (no exact ties here)
    wide = router.route(queries, tasks, tolerance=1.0)
    assert wide.models == [router.models[int(np.argmin(c))] for c in wide.cost]
    mid = router.route(queries, tasks, tolerance=0.1)
    for i, m in enumerate(mid.models):
        j = router.models.index(m)
        assert mid.perf[i, j] >= mid.perf[i].max() - 0.1
        assert mid.cost[i, j] <= mid.cost[i, router.models.index(best.models[i])] + 1e-9
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"query": q, "task": t}) + "\n" for q, t in QUERIES))
    out = tmp_path / "out.jsonl"
    assert route_main([f"ckpt={trained}", f"input={src}", f"output={out}", "tolerance=1"]) == 0
    assert [json.loads(x)["model"] for x in out.read_text().splitlines()] == wide.models
    assert route_main([f"ckpt={trained}", f"input={src}", f"output={out}", "tolerance=0.1", "lam=1"]) == 1


def test_loaded_router_matches_the_module_it_was_saved_from(trained: Path) -> None:
    router = Router.load(trained)
    emb = router.encoder.encode([q for q, _ in QUERIES])
    tasks = router.task_ids([t for _, t in QUERIES], 3)
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    again = type(router.module)(**ckpt["hyper_parameters"])
    again.load_state_dict(ckpt["state_dict"])
    again.eval()
    with torch.inference_mode():
        p, c = again.predict(torch.from_numpy(emb), tasks)
        p = again.calibrated(p)  # the Platt scaling fitted on val after fit, stored in the checkpoint
    direct = router.route_embeddings(emb, tasks)
    np.testing.assert_allclose(direct.perf, p.numpy(), rtol=1e-6)
    assert direct.models == [router.models[i] for i in p.argmax(1).tolist()]
    np.testing.assert_allclose(direct.cost, c.numpy(), rtol=1e-6)


def test_checkpoints_from_before_the_routers_moved_still_load(trained: Path, tmp_path: Path) -> None:
    """Routers moved into query/routers/: a checkpoint naming the old module path loads and routes the same."""
    from fusion_lightning.query.routers import current_path

    assert current_path("fusion_lightning.query.encoder.EncoderRouter") == \
        "fusion_lightning.query.routers.finetuned_encoder.EncoderRouter"
    assert current_path("fusion_lightning.query.router.Router") == "fusion_lightning.query.router.Router"
    data = torch.load(trained, map_location="cpu", weights_only=True)
    assert data["router_class"] == "fusion_lightning.query.routers.mlp.MLPRouter"
    data["router_class"] = "fusion_lightning.query.mlp.MLPRouter"
    old = tmp_path / "old.ckpt"
    torch.save(data, old)
    queries, tasks = [q for q, _ in QUERIES], [t for _, t in QUERIES]
    assert Router.load(old).route(queries, tasks).models == Router.load(trained).route(queries, tasks).models
    # resuming from it (fit ckpt_path=...): the old class path and the buffer it predates pass the checks
    from fusion_lightning.checkpointing import check_checkpoint

    meta = data.get("fusion_lightning") or {}
    if meta.get("module_class"):
        meta["module_class"] = "fusion_lightning.query.mlp.MLPRouter"
    del data["state_dict"]["score_calibration"]
    torch.save(data, old)
    check_checkpoint(old, Router.load(trained).module)
    data["router_class"] = "fusion_lightning.query.knn.KNNRouter"
    data.pop("fusion_lightning", None)
    torch.save(data, old)
    with pytest.raises(ValueError, match="saved by fusion_lightning.query.routers.knn.KNNRouter, this run trains "
                                         "fusion_lightning.query.routers.mlp.MLPRouter"):
        check_checkpoint(old, Router.load(trained).module)


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Router.load(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt: cannot read checkpoint"):
        Router.load(bad)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a fusion_lightning router checkpoint"):
        Router.load(other)


def test_cli_routes_jsonl_and_reports_bad_lines(trained: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps({"id": i, "query": q, "task": t}) + "\n" for i, (q, t) in enumerate(QUERIES)))
    out = tmp_path / "out.jsonl"
    assert route_main([f"ckpt={trained}", f"input={good}", f"output={out}", "lam=0"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and rows[0]["model"] == "alpha" and rows[1]["model"] == "beta"
    assert set(rows[0]["scores"]) == {"alpha", "beta", "gamma", "delta"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok"}\n{"query": ""}\nnot json\n{"text": "x"}\n')
    out2 = tmp_path / "out2.jsonl"
    assert route_main([f"ckpt={trained}", f"input={bad}", f"output={out2}"]) == 1
    err = capsys.readouterr().err
    assert "3 bad input line(s)" in err and "line 2" in err and "line 3" in err and "line 4" in err
    assert not out2.exists()


def test_cli_old_flags_route_the_same_and_print_the_new_spelling(trained: Path, tmp_path: Path, capsys) -> None:
    """`--flag value` and `--flag=value` (the previous release's argparse) still work: the same output, and one
    note line with the key=value spelling."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"query": q, "task": t}) + "\n" for q, t in QUERIES))
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert route_main([f"ckpt={trained}", f"input={src}", f"output={new}", "tolerance=0.1", "batch_size=2"]) == 0
    assert capsys.readouterr().err == ""
    assert route_main(["--ckpt", str(trained), f"--input={src}", "--output", str(old), "--tolerance", "0.1",
                       "--batch-size", "2"]) == 0
    assert capsys.readouterr().err == (
        f"note: --ckpt {trained} --input={src} --output {old} --tolerance 0.1 --batch-size 2 is now "
        f"ckpt={trained} input={src} output={old} tolerance=0.1 batch_size=2 (the --flag spelling goes in the next "
        "release)\n")
    assert old.read_text() == new.read_text() and len(new.read_text().splitlines()) == len(QUERIES)


@pytest.mark.parametrize(("argv", "message"), [
    (["input=q.jsonl", "tolerence=0.1"], "unknown config key 'tolerence' (use +tolerence=... to add a new key); "
                                          "valid keys at the top level: batch_size, calibrate, ckpt, format, input,"),
    (["--tolerence", "0.1"], "unknown option '--tolerence': arguments are key=value; valid keys: ckpt, input,"),
    (["format=csv"], "format=csv: choose from: jsonl, routerarena, routellm"),
    (["calibrate.fraction=0.3"], "unknown config key 'calibrate.fraction' (use +calibrate.fraction=... to add a new "
                                 "key); valid keys under 'calibrate': budget, strong_fraction"),
    (["input=q.jsonl"], "input= and output= are required to route"),
    (["calibrate=null"], "calibrate=None: give calibrate.strong_fraction=F or calibrate.budget=USD_PER_1K"),
    (["lam=true"], "lam=True: a number"),
    (["input=runs/epoch=3.jsonl"], "'input=runs/epoch=3.jsonl': mismatched input '=' expecting <EOF>; a value "
                                   "holding '=', ',' or spaces needs quotes, e.g. input='runs/epoch=3.jsonl'"),
    (["ope=log.jsonl", "tolerance=0.1"], "ope= estimates the lam= argmax policy; tolerance= is not supported"),
    (["lam=0.5", "tolerance=0.1"], "give lam (a price per unit of score) or tolerance (a margin of score), not both"),
])
def test_cli_errors_are_one_line_naming_the_keys(trained: Path, capsys, argv: list[str], message: str) -> None:
    assert route_main([f"ckpt={trained}", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_cli_help_prints_the_keys_with_their_defaults(capsys) -> None:
    assert route_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("`python -m fusion_lightning.route ckpt=PATH input=queries.jsonl output=routed.jsonl")
    for line in ("ckpt: null", "tolerance: null", "mode: auto", "  strong_fraction: null", "batch_size: 256",
                 "propensity: logged"):
        assert f"\n{line} " in out, line


def test_repeated_prompts_are_embedded_once(trained: Path) -> None:
    """Served traffic repeats prompts: the router remembers the last `memo_size` texts' vectors, so a repeat
    costs no encoder call and routes exactly as the first time."""
    router = Router.load(trained, memo_size=3)
    calls: list[list[str]] = []
    encode = router.encoder.encode
    router.encoder.encode = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)
    qs = ["add the sum of these numbers", "which river crosses the capital", "add the sum of these numbers"]
    first = router.route(qs)
    assert calls == [qs[:2]]  # each distinct text once
    again = router.route(qs)
    assert calls == [qs[:2]] and router.memo_hits == 3
    np.testing.assert_array_equal(first.scores, again.scores)
    router.route(["a poem with rhyme", "a sonnet with verse"])  # past memo_size: the oldest is forgotten
    router.route([qs[0]])
    assert calls[-1] == [qs[0]]
