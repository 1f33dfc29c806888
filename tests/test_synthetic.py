"""The synthetic LLMFusionBench-shaped log: shape, determinism, and the structure routers rely on."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from fusion_lightning.data.schema import TASK_DOMAINS
from fusion_lightning.data.synthetic import (
    _TASKS,
    COLUMNS,
    SYNTHETIC_MODELS,
    SYNTHETIC_TASKS,
    generate_llmfusionbench,
    synthetic_catalog,
)

M = len(SYNTHETIC_MODELS)


@pytest.fixture(scope="module")
def log() -> pa.Table:
    return generate_llmfusionbench(n_queries=700, seed=3)


@pytest.fixture(scope="module")
def big() -> pa.Table:
    return generate_llmfusionbench(n_queries=2000, seed=0, with_responses=False)


def _rows(t: pa.Table, task: str) -> list[dict]:
    return [r for r in t.select(["task_name", "ground_truth", "performance", "response"]).to_pylist()
            if r["task_name"] == task]


def _perf_matrix(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    perf = t["performance"].to_numpy().reshape(-1, M)
    return perf, np.array(t["task_name"].to_pylist()[::M])


def test_columns_order_and_types(log: pa.Table) -> None:
    assert tuple(log.column_names) == COLUMNS
    types = {"task_id": pa.int64(), "input_tokens_num": pa.int64(), "output_tokens_num": pa.int64(),
             **dict.fromkeys(["input_price", "output_price", "performance", "cost", "llm_judge"], pa.float64())}
    for name in COLUMNS:
        assert log.schema.field(name).type == types.get(name, pa.string()), name
    assert log.num_rows == 700 * M
    assert log["query_embedding"].null_count == log.num_rows
    assert log["task_description_embedding"].null_count == log.num_rows


def test_same_arguments_give_identical_table() -> None:
    a = generate_llmfusionbench(n_queries=150, seed=5, models=6, embed_strings=True)
    assert a.equals(generate_llmfusionbench(n_queries=150, seed=5, models=6, embed_strings=True))
    assert not a.equals(generate_llmfusionbench(n_queries=150, seed=6, models=6, embed_strings=True))


def test_fourteen_tasks_with_domains_and_metrics(log: pa.Table) -> None:
    assert len(SYNTHETIC_TASKS) == 14
    assert {t: d for t, (d, _) in SYNTHETIC_TASKS.items()} == {t: TASK_DOMAINS[t] for t in SYNTHETIC_TASKS}
    seen = set(zip(log["task_name"].to_pylist(), log["metric"].to_pylist(), log["task_id"].to_pylist(), strict=True))
    assert {(t, m) for t, m, _ in seen} == {(t, m) for t, (_, m) in SYNTHETIC_TASKS.items()}
    assert len({t for t, _, _ in seen}) == len({i for _, _, i in seen}) == 14
    counts = np.unique(log["task_id"].to_numpy()[::M], return_counts=True)[1]
    assert counts.min() >= 700 // 14 - 1


def test_blocks_grouped_by_query_each_model_once(log: pa.Table) -> None:
    names = [m.name for m in SYNTHETIC_MODELS]
    llm = log["llm"].to_pylist()
    query = log["query"].to_pylist()
    for b in range(0, log.num_rows, M):
        assert llm[b: b + M] == names
        assert len(set(query[b: b + M])) == 1
    tasks = log["task_name"].to_pylist()[::M]
    assert len(set(zip(tasks, query[::M], strict=True))) == 700  # no duplicate query text within a task


def test_models_argument_takes_first_profiles() -> None:
    t = generate_llmfusionbench(n_queries=20, models=4)
    assert t["llm"].to_pylist()[:4] == [m.name for m in SYNTHETIC_MODELS[:4]]
    assert t.num_rows == 80
    with pytest.raises(ValueError):
        generate_llmfusionbench(n_queries=5, models=M + 1)


def test_catalog_prices_grow_with_size() -> None:
    cat = synthetic_catalog()
    assert len(cat) == M and 15 <= M <= 25
    by_size = sorted(cat.models.values(), key=lambda m: m.params_b)
    assert by_size[0].params_b < 8 and by_size[-1].params_b >= 600
    assert by_size[0].output_price < by_size[-1].output_price
    assert all(0.05 <= m.input_price <= m.output_price <= 2.0 for m in by_size)
    assert all(f"{m.params_b:g}B" in m.description and "$" in m.description for m in by_size)


def test_scores_tokens_and_cost_in_micro_dollars(log: pa.Table) -> None:
    perf, judge = log["performance"].to_numpy(), log["llm_judge"].to_numpy()
    assert ((perf >= 0) & (perf <= 1)).all() and set(np.unique(perf)) <= {0.0, 0.5, 0.67, 1.0}
    assert set(np.unique(judge)) <= {0.0, 0.3, 0.6, 0.8, 1.0}
    assert (judge[perf == 0] == 0).all() and (judge[perf > 0] > 0).all()
    tin, tout = log["input_tokens_num"].to_numpy(), log["output_tokens_num"].to_numpy()
    cost = log["cost"].to_numpy()
    assert (cost >= 0).all() and (tin > 0).all() and (tout > 0).all()
    expected = tin * log["input_price"].to_numpy() + tout * log["output_price"].to_numpy()
    np.testing.assert_allclose(cost, expected)  # micro-dollars: USD = cost / 1e6
    cat = synthetic_catalog()
    r = log.slice(7, 1).to_pylist()[0]
    assert cat[r["llm"]].call_cost(r["input_tokens_num"], r["output_tokens_num"]) == pytest.approx(r["cost"] / 1e6)
    words = np.array([len(s.split()) for s in log["response"].to_pylist()])
    np.testing.assert_array_equal(tout, (13 * words + 5) // 10)
    assert generate_llmfusionbench(n_queries=700, seed=3, with_responses=False)["output_tokens_num"].equals(
        log["output_tokens_num"])


def test_gsm8k_and_math_final_numbers_agree_with_scores(log: pa.Table) -> None:
    for r in _rows(log, "gsm8k"):
        gold = r["ground_truth"].rsplit("####", 1)[1].strip()
        assert (r["response"].rsplit("####", 1)[1].strip() == gold) == (r["performance"] == 1)
    for r in _rows(log, "math"):
        gold = re.findall(r"\\boxed\{([^}]*)\}", r["ground_truth"])[-1]
        assert (re.findall(r"\\boxed\{([^}]*)\}", r["response"])[-1] == gold) == (r["performance"] == 1)


def test_multiple_choice_letter_agrees_with_score(log: pa.Table) -> None:
    for task, (_, metric) in SYNTHETIC_TASKS.items():
        if metric != "em_mc":
            continue
        for r in _rows(log, task):
            assert re.fullmatch("[A-E]", r["ground_truth"])
            assert (re.findall(r"\(([A-E])\)", r["response"])[-1] == r["ground_truth"]) == (r["performance"] == 1)


def test_span_and_yes_no_answers_agree_with_scores(log: pa.Table) -> None:
    for task in ("natural_qa", "trivia_qa", "squad"):
        for r in _rows(log, task):
            assert (r["ground_truth"] in r["response"]) == (r["performance"] == 1)
    for r in _rows(log, "boolq"):
        assert r["response"].endswith(f"Answer: {r['ground_truth']}.") == (r["performance"] == 1)


def test_correct_code_passes_its_asserts(log: pa.Table) -> None:
    for task in ("mbpp", "human_eval"):
        rows = _rows(log, task)
        for r in rows[:60]:
            code = re.search(r"```python\n(.*?)```", r["response"], re.S).group(1)
            ns: dict = {}
            exec(code, ns)
            passed = True
            for test in eval(r["ground_truth"]):  # a list of assert strings
                try:
                    exec(test, ns)
                except AssertionError:
                    passed = False
            assert passed == (r["performance"] == 1)


def test_no_single_model_is_best_on_every_task(big: pa.Table) -> None:
    perf, tasks = _perf_matrix(big)
    best = {t: int(perf[tasks == t].mean(0).argmax()) for t in SYNTHETIC_TASKS}
    assert len(set(best.values())) >= 3


def test_oracle_beats_best_single_model(big: pa.Table) -> None:
    perf, _ = _perf_matrix(big)
    assert perf.max(1).mean() > perf.mean(0).max() + 0.1


def test_each_query_names_one_sub_topic_of_its_task(log: pa.Table) -> None:
    subs = {t[0]: t[3] for t in _TASKS}
    for task, q in zip(log["task_name"].to_pylist()[::M], log["query"].to_pylist()[::M], strict=True):
        assert sum(s in q.lower() for s in subs[task]) == 1, q


def test_sub_topic_choice_beats_task_choice_on_new_queries(big: pa.Table) -> None:
    """Picking the best model per (task, sub-topic) on one seed generalises to another seed."""
    subs = {t[0]: t[3] for t in _TASKS}

    def keyed(t: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        perf, tasks = _perf_matrix(t)
        sub = [next(s for s in subs[k] if s in q.lower()) for k, q in zip(tasks, t["query"].to_pylist()[::M], strict=True)]
        return perf, tasks, np.char.add(tasks.astype(str), np.array(sub))

    p0, t0, s0 = keyed(big)
    p1, t1, s1 = keyed(generate_llmfusionbench(n_queries=2000, seed=1, with_responses=False))
    by_task = {k: p0[t0 == k].mean(0).argmax() for k in set(t0)}
    by_sub = {k: p0[s0 == k].mean(0).argmax() for k in set(s0)}
    rows = np.arange(len(p1))
    assert p1[rows, [by_sub[k] for k in s1]].mean() > p1[rows, [by_task[k] for k in t1]].mean() + 0.01


def test_embed_strings_only_on_first_row_of_each_block() -> None:
    t = generate_llmfusionbench(n_queries=30, models=5, embed_strings=True)
    for col in ("query_embedding", "task_description_embedding"):
        vals = t[col].to_pylist()
        assert all(v.startswith("tensor([") and len(v.split(",")) == 8 for v in vals[::5])
        assert all(v is None for i, v in enumerate(vals) if i % 5)
    plain = generate_llmfusionbench(n_queries=30, models=5)
    assert plain.drop_columns(["query_embedding", "task_description_embedding"]).equals(
        t.drop_columns(["query_embedding", "task_description_embedding"]))
