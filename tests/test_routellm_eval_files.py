"""RouteLLM's own evaluation files: correctness-only (`prompt,<model>,<model>`, no response columns), such as
its per-subject MMLU CSVs (`mmlu_abstract_algebra.csv`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fusion_lightning.data.errors import LogFormatError
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.pricing import count_tokens
from fusion_lightning.data.readers import read_source
from fusion_lightning.data.schema import domain_of

MIXTRAL, GPT4 = "mixtral-8x7b-instruct-v0.1", "gpt-4-1106-preview"  # as RouteLLM's MMLU files name them
PROMPTS = [
    "Find the degree for the given field extension Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 1\nD. 3\nAnswer:",
    "Find the characteristic of the ring Z x Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer:",
    'The set of integers Z with the binary operation "*" defined as a*b = a+b+1 is a group. Its identity is\n'
    "A. 0\nB. 1\nC. -1\nD. 12\nAnswer:",
]
SCORES = [(True, True), (False, True), (True, False)]  # (mixtral, gpt-4) per prompt


def _write_eval(path: Path, prompts: list[str], scores: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:  # as RouteLLM writes them: pandas to_csv, quoted where needed
        w = csv.writer(fh)
        w.writerow(["prompt", MIXTRAL, GPT4])
        for p, (a, b) in zip(prompts, scores, strict=True):
            w.writerow([p, a, b])
    return path


def test_correctness_only_csv_reads_with_null_responses(tmp_path):
    f = _write_eval(tmp_path / "mmlu" / "mmlu_abstract_algebra.csv", PROMPTS, SCORES)
    src = read_source("routellm", f)
    t = src.table
    assert t.num_rows == 6 and not src.issues
    rows = {(r["query"], r["model"]): r for r in t.to_pylist()}
    for p, (a, b) in zip(PROMPTS, SCORES, strict=True):
        assert (rows[(p, MIXTRAL)]["performance"], rows[(p, GPT4)]["performance"]) == (float(a), float(b))
    assert t["response"].null_count == 6 and t["output_tokens"].null_count == 6
    r = rows[(PROMPTS[1], GPT4)]
    assert (r["task"], r["metric"], r["domain"]) == ("mmlu_abstract_algebra", "em_mc", "popular")
    assert r["_row"] == 8  # header, then 6 lines for prompt 1: prompt 2's record starts on line 8
    (n_in,) = count_tokens([PROMPTS[1]])
    assert r["input_tokens"] == n_in
    assert r["cost"] == pytest.approx(n_in * 10.0 / 1e6)  # input tokens x the catalog's input price only
    m = rows[(PROMPTS[1], MIXTRAL)]
    assert m["cost"] == pytest.approx(n_in * 0.6 / 1e6)  # the shipped catalog knows RouteLLM's MMLU name
    assert src.catalog[MIXTRAL].params_b == 46.7
    assert any("correctness-only" in n and MIXTRAL in n and GPT4 in n and "input tokens only" in n
               for n in src.notes)
    logs = load_logs("routellm", f.parent)  # validates without a user catalog
    s = logs.summary()
    assert (s["queries"], s["models"], s["rows"], s["tasks"]) == (3, 2, 6, 1)
    assert logs.models == [GPT4, MIXTRAL]


def test_mmlu_subject_names_get_mmlu_metric_and_domain():
    assert domain_of("mmlu_high_school_us_history") == domain_of("mmlu") == "popular"
    assert domain_of("mmlu-college-physics") == "popular" and domain_of("mmlux") == "other"
    assert domain_of("human_eval_plus") == "code" and domain_of("gsm8k") == "math"
    from fusion_lightning.data.readers.routellm import task_metric

    assert task_metric("mmlu_abstract_algebra") == task_metric("MMLU") == "em_mc"
    assert task_metric("gsm8k") == "GSM8K" and task_metric("mmluish") is None


def test_mixed_file_and_orphan_response_columns(tmp_path):
    f = tmp_path / "gsm8k.csv"
    f.write_text(f"prompt,{GPT4},{GPT4}_response,{MIXTRAL}\nWhat is 2+2?,True,#### 4,False\n")
    rows = {r["model"]: r for r in read_source("routellm", f).table.to_pylist()}
    assert rows[GPT4]["response"] == "#### 4" and rows[GPT4]["output_tokens"] is not None
    assert rows[MIXTRAL]["response"] is None and rows[MIXTRAL]["output_tokens"] is None
    assert rows[MIXTRAL]["performance"] == 0.0 and rows[GPT4]["metric"] == "GSM8K"
    f.write_text(f"prompt,{GPT4},{MIXTRAL}_response\nWhat is 2+2?,True,#### 4\n")
    with pytest.raises(LogFormatError, match=r"response column\(s\) \['mixtral-8x7b-instruct-v0.1_response'\] "
                                             "without their model column") as e:
        read_source("routellm", f)
    assert str(f) in str(e.value)
    f.write_text("prompt,a_response\nWhat is 2+2?,x\n")
    with pytest.raises(LogFormatError, match="no model columns"):
        read_source("routellm", f)


def test_fit_routes_on_a_correctness_only_file(tmp_path):
    """A router recipe trains and tests on a RouteLLM MMLU-style file; a prompt logged twice with different
    scores (as benchmarks repeat questions) is merged with data.duplicates=mean and counted in summary.json."""
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit

    prompts = [f"Question {i}: which option is right for item {i}?\nA. {i}\nB. {i + 1}\nC. {i + 2}\nD. {i + 3}"
               f"\nAnswer:" for i in range(30)]
    scores = [(i % 3 == 0, i % 2 == 0) for i in range(30)]
    d = tmp_path / "mmlu"
    _write_eval(d / "mmlu_abstract_algebra.csv", [*prompts, prompts[0]], [*scores, (False, True)])
    cfg = compose_recipe("router_mlp", [
        "data=routellm", f"data.path={d}", "data.split=query", "data.duplicates=mean",
        "datamodule.encoder=hashing", f"datamodule.embedding_cache={tmp_path / 'cache'}",
        "trainer.max_epochs=1", "logger=none", f"run_dir={tmp_path / 'run'}"])
    summary = fit(cfg)
    data = summary["data"]
    assert (data["queries"], data["models"], data["rows"], data["tasks"]) == (30, 2, 60, 1)
    assert data["train_queries"] > 0 and data["val_queries"] > 0 and data["test_queries"] > 0
    assert data["train_queries"] + data["val_queries"] + data["test_queries"] == 30
    assert data["duplicate_observations_merged"] == 1  # prompt 0 / mixtral: True then False -> 0.5
    assert data["exact_duplicate_rows_collapsed"] == 1  # prompt 0 / gpt-4: True twice
    assert "test/perf" in summary["metrics"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["data"]["duplicate_observations_merged"] == 1
