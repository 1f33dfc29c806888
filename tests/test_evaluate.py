"""The fusion evaluation table: offline (router over logged scores) and live (few-shot / student) columns."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from openai_server import FakeOpenAIServer, last_user
from planted import planted_overrides
from test_pipeline import write_library
from tiny_lm import build_tiny_lm

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.evaluate import main as evaluate_main
from fusion_lightning.fit import fit
from fusion_lightning.fusion_table import evaluate, table_rows
from fusion_lightning.query.router import Router
from fusion_lightning.serving import OpenAICompatibleBackend
from fusion_lightning.serving.make_log import QueryRecord, collect


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    summary = fit(compose_recipe("router_mlp", planted_overrides(tmp, "trainer.max_epochs=15", "logger=none",
                                                                 "callbacks=none")))
    return tmp / "planted", tmp / "run" / summary["artifacts"]["best_checkpoint"]


def test_offline_table_has_singles_best_single_router_and_oracle(planted) -> None:
    folder, ckpt = planted
    logs = load_logs("llmrouter", folder)
    ev = evaluate(logs, routers={"mlp": ckpt})
    assert list(ev.columns) == ["alpha", "beta", "gamma", "delta", "best_single", "router:mlp", "oracle"]
    assert ev.info["best_single_model"] == "gamma"  # the planted generalist
    np.testing.assert_array_equal(ev.columns["best_single"][0], ev.columns["gamma"][0])
    rows = {r["row"]: r for r in table_rows(ev)}
    assert set(rows) == {"arithmetic", "geography", "poetry", "other (avg)", "overall (task avg)", "all queries"}
    # the router reads the query: alpha on arithmetic, beta on geography beat the generalist there
    assert rows["arithmetic"]["router:mlp_perf"] > rows["arithmetic"]["best_single_perf"] + 0.2
    assert rows["geography"]["router:mlp_perf"] > rows["geography"]["best_single_perf"] + 0.2
    for r in rows.values():
        assert all(r["oracle_perf"] >= r[f"{c}_perf"] - 1e-9 for c in ev.columns)
    tasks = ["arithmetic", "geography", "poetry"]
    assert rows["overall (task avg)"]["alpha_perf"] == pytest.approx(np.mean([rows[t]["alpha_perf"] for t in tasks]))
    # the router column is the logged score of the model the checkpoint picks
    qm = logs.matrix().split("test")
    picked = Router.load(ckpt).route(qm.queries, tasks=list(qm.tasks)).models
    want = np.mean([qm.performance[i, qm.models.index(m)] for i, m in enumerate(picked)])
    assert rows["all queries"]["router:mlp_perf"] == pytest.approx(want)
    assert ev.info["gap_closed"]["router:mlp"] > 0.3


def test_cli_writes_markdown_csv_png_and_summary(planted, tmp_path: Path, capsys) -> None:
    folder, ckpt = planted
    out = tmp_path / "ev"
    assert evaluate_main([f"routers={{mlp:'{ckpt}'}}", f"data.path={folder}", "data=llmrouter", f"out={out}",
                          "max_per_task=10"]) == 0
    assert f"run dir: {out}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"][-1] == "oracle" and summary["rows"][-1]["queries"] == 30
    md = (out / "fusion_table.md").read_text()
    assert "| **overall (task avg)** |" in md and "router:mlp" in md
    csv_rows = (out / "fusion_table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("row,kind,domain,queries,alpha_perf,alpha_cost") and len(csv_rows) == 7
    assert (out / "fusion_bars.png").read_bytes()[:4] == b"\x89PNG"
    assert evaluate_main(["data=llmrouter", f"data.path={folder}", "routrs=[x]"]) == 1
    assert "unknown config key 'routrs'" in capsys.readouterr().err


def _sum_answer(text: str) -> str:
    a, b = re.findall(r"What is (\d+) plus (\d+)", text)[-1]
    return f"#### {int(a) + int(b)}"


def test_live_columns_few_shot_and_student(tmp_path: Path) -> None:
    def few_shot_only(messages):  # right only when given solved examples
        text = last_user(messages)
        return _sum_answer(text) if "Solution:" in text else "#### -1"

    solver = FakeOpenAIServer(api_key=None, answer=lambda m: _sum_answer(last_user(m))).start()
    weak = FakeOpenAIServer(api_key=None, answer=lambda m: "#### 0").start()
    shots = FakeOpenAIServer(api_key=None, answer=few_shot_only).start()
    try:
        backends = [OpenAICompatibleBackend(s.base_url, "m", name=n, cache_dir=None, progress=False)
                    for n, s in (("solver", solver), ("weak", weak))]
        for split, pairs in (("train", [(1, 2), (3, 4), (5, 6)]), ("test", [(7, 8), (9, 10)])):
            qs = [QueryRecord(f"{split}{a}", "gsm8k", f"What is {a} plus {b}?", f"#### {a + b}", "GSM8K", 0) for a, b in pairs]
            collect(qs, backends, tmp_path / "log" / f"calls_{split}.jsonl", progress=False)
        logs = load_logs("llmfusionbench", tmp_path / "log", val_fraction=0)
        student = build_tiny_lm(tmp_path / "student")
        ev = evaluate(logs, thought={"backend": {"type": "openai_compatible", "base_url": shots.base_url, "model": "m",
                                                 "name": "shots", "cache_dir": None, "progress": False}, "shots": 2,
                               "library": str(write_library(tmp_path / "lib")), "k": 1},
                      student={"model": str(student), "name": "student", "progress": False},
                      sampling={"max_new_tokens": 6})
    finally:
        for s in (solver, weak, shots):
            s.stop()
    overall = {r["row"]: r for r in table_rows(ev)}["overall (task avg)"]
    assert overall["solver_perf"] == 1.0 and overall["weak_perf"] == 0.0 and overall["best_single_perf"] == 1.0
    assert overall["thought:zero_shot_perf"] == 0.0 and overall["thought:few_shot_perf"] == 1.0
    assert 0.0 <= overall["student:student_perf"] <= 1.0
    assert math.isnan(overall["student:student_cost"])  # not in the catalog: cost unknown, not 0
    assert overall["thought:templates_perf"] == 0.0  # the test server rewards examples, not templates
    assert ev.kinds["thought:few_shot"] == "thought" and ev.kinds["student:student"] == "model"
    sent = [last_user(b["messages"]) for b in shots.bodies]
    assert sum("Add the two numbers and write the sum after ####." in s for s in sent) == 2  # template prompts
    assert sum("Solution:" in s for s in sent) == 2 and all(s.count("Question:") == 3 for s in sent if "Solution:" in s)
