"""Readers: each public log format becomes the canonical record, with exact rows, fields and ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.pricing import count_tokens
from fusion_lightning.data.readers import ReaderOptions, read_source
from fusion_lightning.data.readers.files import split_from_name, task_from_name
from fusion_lightning.data.readers.llmfusionbench import (
    parse_performance,
    parse_tensor_string,
    source_query_embeddings,
)
from fusion_lightning.data.schema import make_query_id

# --------------------------------------------------------------------------------------------- LLMFusionBench

FB_QUERIES = [("gsm8k", "What is 2+2?"), ("mbpp", "Write add(a, b)."), ("mmlu", "Capital of France?")]
FB_MODELS = ["qwen-7b", "qwen-7b_think", "llama-70b"]


def _fusion_rows(queries=FB_QUERIES) -> list[dict]:
    """3 queries × 3 models; pass@1 string on mbpp/qwen-7b; cost in micro-dollars; embedding on block-first rows."""
    rows = []
    for qi, (task, q) in enumerate(queries):
        for mi, m in enumerate(FB_MODELS):
            perf = "{'pass@1': np.float64(1.0)}" if task == "mbpp" and mi == 0 else str(float(mi % 2))
            rows.append(dict(
                task_name=task, task_description=f"about {task}", query=q, ground_truth=f"gt{qi}", metric="em",
                llm=m, response=f"{m} says {qi}", performance=perf, cost=1500.0 * (mi + 1),
                input_price=0.1 * (mi + 1), output_price=0.2 * (mi + 1), input_tokens_num=10 + mi,
                output_tokens_num=20 + mi, llm_judge=0.25 * mi, llm_description=f"the {m} model",
                query_embedding=f"tensor([{qi}.0, 0.5, -1.0])" if mi == 0 else None))
    return rows


def _write_fusion(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix or "/"
    if suffix == "/":
        import datasets

        datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}).save_to_disk(str(path))
    elif suffix == ".parquet":
        pa.Table.from_pylist(rows).to_pandas().to_parquet(path)
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["log.parquet", "log.jsonl", "log.csv", "log_ds"])
def test_llmfusionbench_every_container_gives_the_same_canonical_rows(tmp_path, name):
    src = read_source("llmfusionbench", _write_fusion(tmp_path / name, _fusion_rows()))
    t = src.table
    assert t.num_rows == 9
    rows = {(r["query"], r["model"]): r for r in t.to_pylist()}
    r = rows[("Write add(a, b).", "qwen-7b")]
    assert r["performance"] == 1.0  # from "{'pass@1': np.float64(1.0)}"
    assert (r["task"], r["domain"], r["ground_truth"], r["metric"]) == ("mbpp", "code", "gt1", "em")
    r = rows[("What is 2+2?", "llama-70b")]
    assert r["cost"] == pytest.approx(0.0045)  # 4500 micro-dollars -> USD
    assert (r["input_tokens"], r["output_tokens"], r["judge"], r["performance"]) == (12, 22, 0.5, 0.0)
    assert (r["response"], r["domain"], r["split"]) == ("llama-70b says 0", "math", None)
    assert r["query_id"] == make_query_id("gsm8k", "What is 2+2?")
    assert sorted({x["task"] for x in rows.values()}) == ["gsm8k", "mbpp", "mmlu"]
    assert rows[("Capital of France?", "qwen-7b_think")]["domain"] == "popular"
    assert not src.issues
    assert any("micro-dollars" in n for n in src.notes)
    # `_think` variants are their own model; the catalog records their base model and source prices
    assert sorted(src.catalog.names) == sorted(FB_MODELS)
    think = src.catalog["qwen-7b_think"]
    assert (think.base_model, think.params_b) == ("qwen-7b", 7.0)
    assert (think.input_price, think.output_price) == pytest.approx((0.2, 0.4))
    assert think.description == "the qwen-7b_think model"
    assert src.catalog["qwen-7b"].base_model is None
    assert src.task_descriptions == {"gsm8k": "about gsm8k", "mbpp": "about mbpp", "mmlu": "about mmlu"}


@pytest.mark.parametrize("name", ["log.parquet", "log.jsonl", "log_ds"])
def test_responses_false_leaves_only_the_response_texts_unread(tmp_path, name):
    path = _write_fusion(tmp_path / name, _fusion_rows())
    full = read_source("llmfusionbench", path).table
    lean = read_source("llmfusionbench", path, ReaderOptions(responses=False)).table
    assert full["response"].null_count == 0 and lean["response"].null_count == lean.num_rows == 9
    others = [c for c in full.column_names if c != "response"]
    assert lean.select(others).to_pylist() == full.select(others).to_pylist()


def test_responses_flag_in_configs_readers_and_recipes(tmp_path):
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.data.datamodule import load_from_config

    src = read_source("routellm", _routellm_dir(tmp_path / "r", gold=True), ReaderOptions(responses=False))
    assert src.table["response"].null_count == 4  # readers that parse responses anyway: nulled after reading
    cfg = {"synthetic": {"n_queries": 30, "models": 3, "seed": 0}}
    assert load_from_config({**cfg, "responses": False}).table["response"].null_count == 90
    assert load_from_config(cfg).table["response"].null_count < 90  # default: responses read
    # re-scoring needs the responses, so it reads them whatever `responses` says
    rescored = load_from_config({**cfg, "responses": False, "rescore": True})
    assert rescored.table["response"].null_count < 90
    assert compose_recipe("router_mlp", ["data=llmfusionbench"]).data.responses is False
    assert compose_recipe("distill_top_k").data.responses is True


def test_llmfusionbench_reads_a_json_array_and_mixed_type_scores(tmp_path):
    f = tmp_path / "log.json"
    f.write_text(json.dumps(_fusion_rows()))
    assert read_source("llmfusionbench", f).table.num_rows == 9
    rows = _fusion_rows()
    for r in rows:  # numbers for most rows, the pass@1 string on one: pyarrow's JSON reader refuses this
        r["performance"] = r["performance"] if r["performance"].startswith("{") else float(r["performance"])
    f = _write_fusion(tmp_path / "mixed.jsonl", rows)
    assert read_source("llmfusionbench", f).table["performance"].to_pylist() == [
        0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_parse_performance_handles_numbers_pass_at_1_strings_and_garbage():
    values, bad = parse_performance(pa.array(["1.0", "{'pass@1': np.float64(0.5)}", "0", "oops", None]))
    assert values.to_pylist() == [1.0, 0.5, 0.0, None, None]
    assert bad.tolist() == [False, False, False, True, False]  # a null is missing, not unparseable
    values, bad = parse_performance(pa.array([1, 0], pa.int64()))
    assert values.type == pa.float64() and values.to_pylist() == [1.0, 0.0] and not bad.any()


def test_parse_tensor_string():
    np.testing.assert_array_equal(parse_tensor_string("tensor([0.1, -0.2, 3e-2])"),
                                  np.array([0.1, -0.2, 0.03], np.float32))
    multi = parse_tensor_string("tensor([1.0,\n        2.0], dtype=torch.float32)")
    assert multi.dtype == np.float32 and multi.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="not a tensor string"):
        parse_tensor_string("[1.0, 2.0]")


def test_source_query_embeddings_forward_fill_the_block_first_row(tmp_path):
    raw = pq.read_table(_write_fusion(tmp_path / "log.parquet", _fusion_rows()))
    assert raw["query_embedding"].null_count == 6  # only the first row of each block carries it
    emb = source_query_embeddings(raw)
    assert set(emb) == {q for _, q in FB_QUERIES}
    for qi, (_, q) in enumerate(FB_QUERIES):
        np.testing.assert_array_equal(emb[q], np.array([qi, 0.5, -1.0], np.float32))
    # every row, embedded or not, finds its query's vector
    assert all(q in emb for q in raw["query"].to_pylist())


def test_llmfusionbench_directory_is_the_union_with_splits_from_file_names(tmp_path):
    d = tmp_path / "logs"
    _write_fusion(d / "bench_train.parquet", _fusion_rows(FB_QUERIES[:2]))
    _write_fusion(d / "bench-test.jsonl", _fusion_rows([("gsm8k", "What is 3+3?")]))
    _write_fusion(d / "bench_val.csv", _fusion_rows([("mmlu", "Largest planet?")]))
    t = read_source("llmfusionbench", d).table
    assert t.num_rows == 12
    split_of = {r["query"]: r["split"] for r in t.select(["query", "split"]).to_pylist()}
    assert split_of == {"What is 2+2?": "train", "Write add(a, b).": "train", "What is 3+3?": "test",
                        "Largest planet?": "val"}


@pytest.mark.parametrize(("name", "split", "task"), [
    ("gsm8k_test.json", "test", "gsm8k"), ("gsm8k-train.jsonl", "train", "gsm8k"),
    ("mmlu_val.csv", "val", "mmlu"), ("math_responses.csv", None, "math"), ("boolq.json", None, "boolq"),
    ("arc_challenge_validation.json", "val", "arc_challenge"),
])
def test_split_and_task_from_file_names(name, split, task):
    assert split_from_name(Path(name)) == split
    assert task_from_name(Path(name)) == task


# --------------------------------------------------------------------------------------------- LLMRouter

def _router_dir(d: Path, with_queries: bool, with_catalog: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    train = [{"question": "What is 2+2?", "scores": {"m-7b": 1, "m-70b": 1}},
             {"question": "def add(a, b):", "scores": {"m-7b": 0, "m-70b": 1.0}}]
    test = [{"question": "Capital of France?", "scores": {"m-7b": 0.5, "m-70b": 1}}]
    (d / "gsm8k_train.json").write_text(json.dumps(train))
    (d / "mmlu_test.json").write_text(json.dumps(test))
    if with_queries:
        (d / "queries_train.jsonl").write_text(
            json.dumps({"task_name": "gsm8k", "query": "What is 2+2?", "ground_truth": 4, "metric": "GSM8K"}) + "\n"
            + json.dumps({"task_name": "mbpp", "query": "def add(a, b):", "ground_truth": "a+b", "metric": "code"})
            + "\n")
        (d / "queries_test.jsonl").write_text(
            json.dumps({"task_name": "mmlu", "query": "Capital of France?", "ground_truth": "B", "metric": "em_mc"}))
    if with_catalog:
        (d / "llm_candidates.json").write_text(json.dumps({
            "m-7b": {"size": "7B", "feature": "small", "input_price": 0.2, "output_price": 0.4},
            "m-70b": {"size": "70B", "feature": "big", "input_price": 0.9, "output_price": 0.9}}))
    return d


def test_llmrouter_joins_query_files_and_prices_input_tokens(tmp_path):
    src = read_source("llmrouter", _router_dir(tmp_path / "r", with_queries=True, with_catalog=True))
    t = src.table
    assert t.num_rows == 6
    rows = {(r["query"], r["model"]): r for r in t.to_pylist()}
    r = rows[("def add(a, b):", "m-70b")]
    assert (r["task"], r["domain"], r["ground_truth"], r["metric"], r["split"]) == ("mbpp", "code", "a+b", "code", "train")
    assert r["performance"] == 1.0 and r["response"] is None and r["output_tokens"] is None
    r = rows[("What is 2+2?", "m-7b")]
    assert r["ground_truth"] == "4" and r["query_id"] == make_query_id("gsm8k", "What is 2+2?")
    assert rows[("Capital of France?", "m-7b")]["performance"] == 0.5
    n_in = count_tokens(["Capital of France?"])[0]
    assert rows[("Capital of France?", "m-70b")]["input_tokens"] == n_in > 0
    assert rows[("Capital of France?", "m-70b")]["cost"] == pytest.approx(n_in * 0.9 / 1e6)
    assert rows[("Capital of France?", "m-7b")]["cost"] == pytest.approx(n_in * 0.2 / 1e6)
    assert src.catalog["m-70b"].params_b == 70.0 and src.catalog["m-70b"].description == "big"
    assert any("cost estimated" in n for n in src.notes)
    assert src.counts["queries_without_query_file_row"] == 0


def test_llmrouter_score_files_alone_take_task_and_split_from_file_names(tmp_path):
    logs = load_logs("llmrouter", _router_dir(tmp_path / "r", with_queries=False, with_catalog=False),
                     val_fraction=0.0)
    t = logs.table
    assert t.num_rows == 6 and logs.models == ["m-7b", "m-70b"]
    task_split = {r["query"]: (r["task"], r["split"]) for r in t.select(["query", "task", "split"]).to_pylist()}
    assert task_split == {"What is 2+2?": ("gsm8k", "train"), "def add(a, b):": ("gsm8k", "train"),
                          "Capital of France?": ("mmlu", "test")}
    assert t["cost"].null_count == 6 and t["ground_truth"].null_count == 6
    assert any("no query files" in n for n in logs.report.notes)
    assert any("no model catalog" in n for n in logs.report.notes)


def test_llmrouter_task_precedence_record_then_query_file_then_file_name(tmp_path):
    d = _router_dir(tmp_path / "r", with_queries=True, with_catalog=False)
    recs = json.loads((d / "gsm8k_train.json").read_text())
    recs[0]["task_name"] = "math"  # the record's own task wins over the query file's 'gsm8k'
    recs.append({"question": "Not in any query file", "scores": {"m-7b": 1, "m-70b": 0}})
    (d / "gsm8k_train.json").write_text(json.dumps(recs))
    src = read_source("llmrouter", d)
    task = dict(zip(src.table["query"].to_pylist(), src.table["task"].to_pylist(), strict=True))
    assert task == {"What is 2+2?": "math", "def add(a, b):": "mbpp", "Not in any query file": "gsm8k",
                    "Capital of France?": "mmlu"}
    assert src.counts["queries_without_query_file_row"] == 1
    forced = read_source("llmrouter", d, ReaderOptions(task="custom")).table["task"]
    assert set(forced.to_pylist()) == {"custom"}  # data.task overrides everything


def test_query_ids_are_stable_content_hashes(tmp_path):
    d = _router_dir(tmp_path / "r", with_queries=False, with_catalog=False)
    a = read_source("llmrouter", d).table["query_id"].to_pylist()
    b = read_source("llmrouter", d).table["query_id"].to_pylist()
    assert a == b and len(set(a)) == 3
    assert make_query_id("gsm8k", "x") == make_query_id("gsm8k", "x") != make_query_id("mmlu", "x")


# --------------------------------------------------------------------------------------------- RouterBench

def _routerbench_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": ["mmlu.1", "gsm8k.7"], "prompt": ["Pick A or B.", "What is 6*7?"], "eval_name": ["mmlu", "gsm8k"],
        "gpt-4": [1.0, 0.0], "gpt-4|model_response": ["A", "41"], "gpt-4|total_cost": [0.003, 0.004],
        "llama-70b": [0.0, 1.0], "llama-70b|model_response": ["B", "42"], "llama-70b|total_cost": [0.0002, 0.0001],
        "oracle_model_to_route_to": ["gpt-4", "llama-70b"]})


@pytest.mark.parametrize("suffix", [".csv", ".pkl"])
def test_routerbench_csv_and_pickle(tmp_path, suffix):
    f = tmp_path / f"routerbench_0shot_test{suffix}"
    df = _routerbench_frame()
    df.to_csv(f, index=False) if suffix == ".csv" else df.to_pickle(f)
    src = read_source("routerbench", f)
    t = src.table
    assert t.num_rows == 4 and src.catalog.names == ["gpt-4", "llama-70b"]
    rows = {(r["query_id"], r["model"]): r for r in t.to_pylist()}
    r = rows[("gsm8k.7", "llama-70b")]
    assert (r["query"], r["task"], r["domain"], r["response"], r["performance"]) == (
        "What is 6*7?", "gsm8k", "math", "42", 1.0)
    assert r["cost"] == pytest.approx(0.0001) and r["split"] == "test"
    assert rows[("mmlu.1", "gpt-4")]["cost"] == pytest.approx(0.003)
    first_row = 2 if suffix == ".csv" else 0  # CSV line numbers; a pickle's 0-based index
    assert rows[("mmlu.1", "gpt-4")]["_row"] == first_row
    assert not src.issues


# --------------------------------------------------------------------------------------------- RouteLLM

GPT4, MIXTRAL = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"


def _routellm_dir(d: Path, gold: bool) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"prompt": ["What is 2+2?", "Tom has 3 apples and eats one. How many left?"],
                  MIXTRAL: [True, False], GPT4: [True, True],
                  f"{MIXTRAL}_response": ["4\n#### 4", "3"], f"{GPT4}_response": ["#### 4", "He has 2.\n#### 2"],
                  }).to_csv(d / "gsm8k_responses.csv", index=False)
    if gold:
        (d / "gsm8k_test.jsonl").write_text(
            json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}) + "\n"
            + json.dumps({"question": "Tom has 3 apples and eats one. How many left?", "answer": "#### 2"}) + "\n")
    return d


@pytest.mark.parametrize("gold", [False, True])
def test_routellm_with_and_without_gold_answers(tmp_path, gold):
    src = read_source("routellm", _routellm_dir(tmp_path / "r", gold))
    t = src.table
    assert t.num_rows == 4
    rows = {(r["query"], r["model"]): r for r in t.to_pylist()}
    q2 = "Tom has 3 apples and eats one. How many left?"
    r = rows[(q2, GPT4)]
    assert (r["task"], r["domain"], r["metric"], r["response"], r["performance"]) == (
        "gsm8k", "math", "GSM8K", "He has 2.\n#### 2", 1.0)
    assert rows[(q2, MIXTRAL)]["performance"] == 0.0
    n_in, n_out = count_tokens([q2, "He has 2.\n#### 2"])
    assert (r["input_tokens"], r["output_tokens"]) == (n_in, n_out)
    assert r["cost"] == pytest.approx((n_in * 10.0 + n_out * 30.0) / 1e6)  # shipped catalog prices
    assert r["ground_truth"] == ("#### 2" if gold else None)
    assert src.counts["queries_with_gold_answer"] == (2 if gold else 0)
    assert any("estimated" in n for n in src.notes)


# --------------------------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def llmrouter_logs(shared_data):
    return load_logs("llmrouter", shared_data("llmrouter"))


@pytest.fixture(scope="module")
def routellm_logs(shared_data):
    return load_logs("routellm", shared_data("routellm_gsm8k"))


def test_real_llmrouter_logs(llmrouter_logs, shared_data):
    logs, d = llmrouter_logs, shared_data("llmrouter")
    n_train_file = len(json.loads((d / "scores_train.json").read_text()))
    n_test_file = len(json.loads((d / "scores_test.json").read_text()))
    assert (n_train_file, n_test_file) == (5608, 500)
    s = logs.summary()
    assert (s["models"], s["tasks"]) == (9, 14)
    assert s["duplicates_across_splits"] == 119
    assert s["test_queries"] == 500  # the duplicates stay in test
    assert s["train_queries"] + s["val_queries"] == 5608 - 119 and s["val_queries"] > 0
    assert s["rows"] == 9 * (5608 - 119 + 500) and s["missing_pairs_masked"] == 0
    assert s["queries_without_query_file_row"] == 0
    t = logs.table
    assert t["ground_truth"].null_count == 0 and t["response"].null_count == len(t)
    cost = t["cost"].to_numpy()
    assert (cost > 0).all() and t["output_tokens"].null_count == len(t)
    assert any("cost estimated" in n for n in logs.report.notes)
    assert set(logs.models) <= set(logs.catalog.names)  # the catalog lists more candidates


def test_real_routellm_logs(routellm_logs):
    logs = routellm_logs
    s = logs.summary()
    assert (s["queries"], s["models"], s["rows"], s["tasks"]) == (1319, 2, 2638, 1)
    assert s["queries_with_gold_answer"] == 1319
    t = logs.table
    assert logs.models == [GPT4, MIXTRAL] and logs.tasks == ["gsm8k"]
    assert t["response"].null_count == 0 and t["ground_truth"].null_count == 0
    assert set(t["performance"].to_pylist()) == {0.0, 1.0}
    assert (t["cost"].to_numpy() > 0).all()
    assert s["train_queries"] + s["val_queries"] + s["test_queries"] == 1319
