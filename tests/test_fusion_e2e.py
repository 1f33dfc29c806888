"""bench/fusion_e2e.py --quick: every stage of the end-to-end fusion run on a handful of real shared
questions with the tiny random model (~20 s), then a re-run that resumes instead of redoing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def e2e():
    if not (SHARED / "llmrouter" / "queries_train.jsonl").is_file():
        pytest.skip(f"shared questions not present under {SHARED} (set FUSION_LIGHTNING_SHARED_DATA)")
    import fusion_e2e

    return fusion_e2e


def test_quick_run_builds_every_level_and_resumes(e2e, tmp_path: Path, capsys) -> None:
    out = tmp_path / "e2e"
    assert e2e.main(["--quick", "--out", str(out), "--until", "questions"]) == 0
    assert not (out / "probe" / "stage.json").exists()  # stopped after the questions
    questions = [json.loads(x) for x in (out / "questions" / "test.jsonl").read_text().split("\n") if x]
    assert len(questions) == 8 and {q["task_name"] for q in questions} == {"gsm8k", "mmlu"}
    capsys.readouterr()

    assert e2e.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== questions: done" in printed and "== table\n" in printed
    for stage in e2e.STAGES:
        assert (out / stage / "stage.json").exists(), stage
    collect = json.loads((out / "collect" / "stage.json").read_text())
    assert collect["test"]["per_model"] == {"tiny-llama": 8, "tiny-llama_think": 8, "reference": 8, "reference_think": 8}
    assert collect["train"]["questions"] == 16 and collect["val"]["questions"] == 4  # 2 val per task, not in train

    summary = json.loads((out / "table" / "summary.json").read_text())
    cols = summary["columns"]
    assert {"tiny-llama", "tiny-llama_think", "reference", "best_single", "router:knn", "oracle",
            "thought:tiny-llama:zero_shot", "thought:tiny-llama:few_shot", "thought:tiny-llama:templates",
            "thought:tiny-llama:templates_frozen", "thought:tiny-llama:exemplars", "thought:tiny-llama:both",
            "thought:tiny-llama:selected", "student:lora", "student:full"} <= set(cols)
    ov = summary["overall"]
    assert summary["info"]["best_single_model"].startswith("reference") and ov["oracle"]["perf"] == 1.0
    assert ov["best_single"]["diff_ci"] == [0.0, 0.0] and ov["router:knn"]["n"] == 8
    assert all(ov[c]["ci"][0] <= ov[c]["perf"] <= ov[c]["ci"][1] for c in cols)
    gains = json.loads((out / "table" / "gains.json").read_text())
    assert set(gains) == {"tiny-llama: thought modes vs zero-shot", "tiny-llama: thought modes vs best single",
                          "tiny-llama: retrieved exemplars vs random few-shot", "tiny-llama: trained vs frozen retriever",
                          "students"}
    # the thought mode (zero-shot and 3 modes x k in [1, 2]) chosen on val + train, cross-fitted: each train
    # question through a retriever fitted without its fold; written next to the library
    chosen = json.loads((out / "thought" / "stage.json").read_text())["selected"]["tiny-llama"]
    assert chosen["questions"] == 20 and chosen["mode"] in ("none", "templates", "exemplars", "both")
    assert chosen["questions_by_split"] == {"val": 4, "train": 16} and chosen["cross_fit"].startswith("cross-fitted")
    assert all((out / "retriever" / f"fold{f}" / "summary.json").is_file() for f in range(e2e.FOLDS))
    lib_choice = json.loads((out / "library" / "lib" / "thought_selection.json").read_text())["models"]["tiny-llama"]
    assert (lib_choice["mode"], lib_choice["k"]) == (chosen["mode"], chosen["k"]) and len(lib_choice["rows"]) == 7
    assert "val selected" in (out / "table" / "gains.md").read_text() and "16 train" in (out / "table" / "gains.md").read_text()
    overall = next(r for r in gains["students"] if r["row"] == "overall (task avg)")
    assert overall["queries"] == 8 and "student:lora_diff_lo" in overall
    assert (out / "table" / "fusion_bars.png").read_bytes()[:4] == b"\x89PNG"
    retriever = json.loads((out / "retriever" / "stage.json").read_text())["metrics"]
    assert "test/ndcg@3" in retriever and "test/frozen/ndcg@3" in retriever
    # the judge check grades 4 sampled train calls; a random tiny model's grades do not parse
    judge = json.loads((out / "judge" / "stage.json").read_text())
    assert judge["calls"] == 4 and 0 <= judge["parse_rate"] <= 1 and judge["meets_80pct"] == (judge["parse_rate"] >= 0.8)
    judged = [json.loads(x) for x in (out / "judge" / "judgements.jsonl").read_text().split("\n") if x]
    assert len(judged) == 4 and all(j["judge"] is None or j["judge"] in (0.0, 0.3, 0.6, 0.8, 1.0) for j in judged)
    check = json.loads((out / "library" / "stage.json").read_text())["llm_summariser_check"]
    assert check["questions"] == 1 and check["parsed"] in (0, 1)

    log = (out / "collect" / "log" / "calls_test.jsonl").read_bytes()
    assert e2e.main(["--quick", "--out", str(out), "--redo", "table"]) == 0  # resumes: only the table again
    printed = capsys.readouterr().out
    assert "== model: done" in printed and "== collect: done" in printed and "== table\n" in printed
    assert (out / "collect" / "log" / "calls_test.jsonl").read_bytes() == log

    with pytest.raises(SystemExit, match="another plan"):
        e2e.main(["--quick", "--out", str(out), "--test-per-task", "5"])
