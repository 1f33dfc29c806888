"""LogTable: splits by query text (stratified, seeded), query × model matrices, normalisation, rewards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.matrix import REWARD_SETTINGS, QueryMatrix, TaskNormaliser, reward
from fusion_lightning.data.readers.common import SourceData, canonical_table
from fusion_lightning.data.schema import ModelCatalog, ModelInfo

MODELS = ("m_small", "m_mid", "m_big")


def catalog() -> ModelCatalog:
    return ModelCatalog({m: ModelInfo(m, params_b=p, input_price=0.1, output_price=0.2)
                         for m, p in zip(MODELS, (7.0, 13.0, 70.0), strict=True)})


def source(records: list[dict]) -> SourceData:
    """A canonical source from dict rows (missing fields are null); file/row provenance filled in."""
    n = len(records)
    cols = {k: [r.get(k) for r in records] for k in {k for r in records for k in r}}
    cols.update({"_file": ["hand.jsonl"] * n, "_row": list(range(1, n + 1))})
    return SourceData(canonical_table(cols), catalog())


def rows_for(query: str, task: str, split: str | None = None, query_id: str | None = None,
             models=MODELS[:2]) -> list[dict]:
    return [{"query": query, "task": task, "split": split, "query_id": query_id, "model": m,
             "performance": float(i % 2), "cost": 0.001 * (i + 1)} for i, m in enumerate(models)]


def split_log(n_gsm: int = 60, n_mmlu: int = 40, n_boolq: int = 3) -> list[dict]:
    recs = []
    for task, n in (("gsm8k", n_gsm), ("mmlu", n_mmlu), ("boolq", n_boolq)):
        for i in range(n):
            recs += rows_for(f"{task} question {i}", task)
    # the same text under two tasks (two derived query_ids) and under two explicit query_ids
    recs += rows_for("shared text asked twice", "gsm8k") + rows_for("shared text asked twice", "mmlu")
    recs += rows_for("same text, two ids", "mmlu", query_id="id-a") + rows_for("same text, two ids", "mmlu",
                                                                             query_id="id-b")
    return recs


def text_splits(logs) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for q, s in zip(logs.table["query"].to_pylist(), logs.table["split"].to_pylist(), strict=True):
        out.setdefault(q, set()).add(s)
    return out


def single(splits: dict[str, set[str]]) -> dict[str, str]:
    assert all(len(s) == 1 for s in splits.values()), {q: s for q, s in splits.items() if len(s) > 1}
    return {q: next(iter(s)) for q, s in splits.items()}


# splits ---------------------------------------------------------------------------------------------
def test_query_split_never_puts_a_text_in_two_splits_and_keeps_every_task_in_train():
    logs = load_logs("hand", source=source(split_log()), split="query", split_seed=0,
                     val_fraction=0.1, test_fraction=0.2)
    by_text = single(text_splits(logs))
    assert set(by_text.values()) == {"train", "val", "test"}
    train_tasks = {t for t, s in zip(logs.table["task"].to_pylist(), logs.table["split"].to_pylist(),
                                     strict=True) if s == "train"}
    assert train_tasks == {"gsm8k", "mmlu", "boolq"}
    n = len(by_text)
    frac = {s: sum(v == s for v in by_text.values()) / n for s in ("train", "val", "test")}
    assert frac["test"] == pytest.approx(0.2, abs=0.05)
    assert frac["val"] == pytest.approx(0.1, abs=0.05)
    assert "splits by query (seed 0)" in logs.report.notes


def test_query_split_is_stratified_by_task():
    logs = load_logs("hand", source=source(split_log(n_gsm=50, n_mmlu=30, n_boolq=0)), split="query")
    qt = logs.query_table().to_pylist()
    for task, n in (("gsm8k", 50), ("mmlu", 30)):
        texts = {r["query"]: r["split"] for r in qt if r["task"] == task and "question" in r["query"]}
        assert sum(s == "test" for s in texts.values()) == pytest.approx(0.2 * n, abs=1)
        assert sum(s == "val" for s in texts.values()) == pytest.approx(0.1 * n, abs=1)


def test_query_split_is_seeded_and_independent_of_row_order():
    src = source(split_log())
    a = single(text_splits(load_logs("hand", source=src, split="query", split_seed=7)))
    b = single(text_splits(load_logs("hand", source=src, split="query", split_seed=7)))
    c = single(text_splits(load_logs("hand", source=src, split="query", split_seed=8)))
    assert a == b
    assert a != c
    perm = np.random.default_rng(0).permutation(src.table.num_rows)
    shuffled = SourceData(src.table.take(pa.array(perm)), src.catalog)
    d = single(text_splits(load_logs("hand", source=shuffled, split="query", split_seed=7)))
    assert d == a


def test_files_split_without_val_carves_val_out_of_train_by_query():
    recs = []
    for task, n in (("gsm8k", 40), ("mmlu", 30)):
        for i in range(n):
            recs += rows_for(f"{task} train {i}", task, split="train")
        for i in range(5):
            recs += rows_for(f"{task} test {i}", task, split="test")
    logs = load_logs("hand", source=source(recs), split="files", val_fraction=0.25)
    by_text = single(text_splits(logs))
    assert {q for q, s in by_text.items() if s == "test"} == {q for q in by_text if " test " in q}
    val = {q for q, s in by_text.items() if s == "val"}
    assert val and all(" train " in q for q in val)
    assert sum(q.startswith("gsm8k") for q in val) == 10 and sum(q.startswith("mmlu") for q in val) == 8
    assert "splits from file names (seed 0)" in logs.report.notes


def test_files_split_keeps_a_val_file_and_fills_unsplit_rows_as_train():
    recs = rows_for("a", "gsm8k", split="val") + rows_for("b", "gsm8k", split="test") + rows_for("c", "gsm8k")
    logs = load_logs("hand", source=source(recs), split="files")
    assert single(text_splits(logs)) == {"a": "val", "b": "test", "c": "train"}


def test_files_split_holds_out_a_text_found_in_train_and_test_rows_whatever_the_row_order():
    train = rows_for("leaky", "gsm8k", split="train", query_id="t1") + rows_for("ok", "gsm8k", split="train")
    test = rows_for("leaky", "gsm8k", split="test", query_id="t2")
    for recs in (train + test, test + train):
        logs = load_logs("hand", source=source(recs), split="files", val_fraction=0.0)
        assert single(text_splits(logs)) == {"leaky": "test", "ok": "train"}


def test_files_split_without_file_splits_is_an_error():
    with pytest.raises(ValueError, match="data.split=files"):
        load_logs("hand", source=source(split_log()), split="files")


def test_auto_split_uses_file_names_when_they_carry_splits_else_query():
    filed = rows_for("x0", "gsm8k", split="test")
    for i in range(1, 21):
        filed += rows_for(f"x{i}", "gsm8k", split="train")
    logs = load_logs("hand", source=source(filed), split="auto", val_fraction=0.0)
    assert single(text_splits(logs)) == {f"x{i}": "test" if i == 0 else "train" for i in range(21)}
    plain = load_logs("hand", source=source(split_log()), split="auto")
    assert "splits by query (seed 0)" in plain.report.notes
    assert set(single(text_splits(plain)).values()) == {"train", "val", "test"}


def test_invalid_split_mode_names_the_choices():
    with pytest.raises(ValueError, match="auto, files, query"):
        load_logs("hand", source=source(split_log()), split="random")


# matrix ---------------------------------------------------------------------------------------------
def matrix_log():
    recs = [  # rows deliberately not in catalog order; q2 has no m_mid call; m_big has no judge on q1
        {"query": "q1", "task": "gsm8k", "model": "m_big", "performance": 1.0, "cost": 0.03},
        {"query": "q1", "task": "gsm8k", "model": "m_small", "performance": 0.0, "cost": 0.01, "judge": 0.2},
        {"query": "q1", "task": "gsm8k", "model": "m_mid", "performance": 1.0, "cost": 0.02, "judge": 0.9},
        {"query": "q2", "task": "mmlu", "model": "m_small", "performance": 1.0, "cost": 0.5, "judge": 0.6},
        {"query": "q2", "task": "mmlu", "model": "m_big", "performance": 0.0, "cost": 0.7, "judge": 0.1},
        {"query": "q3", "task": "mmlu", "model": "m_small", "performance": 0.0, "cost": 0.4, "judge": 0.3},
    ]
    return load_logs("hand", source=source(recs), split="query", val_fraction=0.0, test_fraction=0.0)


def test_matrix_has_models_in_catalog_order_nan_and_mask_for_missing_pairs():
    logs = matrix_log()
    qm = logs.matrix()
    assert qm.models == list(MODELS) and qm.performance.shape == qm.mask.shape == (3, 3)
    r = {q: i for i, q in enumerate(qm.queries)}
    c = {m: j for j, m in enumerate(qm.models)}
    assert qm.mask.sum() == 6 and not qm.mask[r["q2"], c["m_mid"]]
    assert not qm.mask[r["q3"], c["m_mid"]] and not qm.mask[r["q3"], c["m_big"]]
    assert np.isnan(qm.performance[r["q2"], c["m_mid"]]) and np.isnan(qm.cost[r["q2"], c["m_mid"]])
    assert qm.performance[r["q1"], c["m_big"]] == 1.0 and qm.performance[r["q2"], c["m_big"]] == 0.0
    assert qm.cost[r["q2"], c["m_small"]] == pytest.approx(0.5)
    assert qm.cost[r["q1"], c["m_mid"]] == pytest.approx(0.02)
    assert np.isnan(qm.judge[r["q1"], c["m_big"]]) and qm.judge[r["q1"], c["m_mid"]] == pytest.approx(0.9)
    assert list(qm.tasks[[r["q1"], r["q2"], r["q3"]]]) == ["gsm8k", "mmlu", "mmlu"]
    assert list(qm.domains[[r["q1"], r["q2"]]]) == ["math", "popular"]
    assert logs.summary()["missing_pairs_masked"] == 3


def test_matrix_keeps_only_models_present_in_the_log():
    recs = rows_for("a", "gsm8k", models=("m_big", "m_small"))
    qm = load_logs("hand", source=source(recs), split="query").matrix()
    assert qm.models == ["m_small", "m_big"]


def test_query_matrix_take_split_and_binary_flag():
    qm = matrix_log().matrix()
    qm.splits[:] = np.array(["train", "test", "train"], dtype=object)
    sub = qm.take(np.array([2, 0]))
    assert sub.queries == [qm.queries[2], qm.queries[0]] and list(sub.query_ids) == [qm.query_ids[2],
                                                                                     qm.query_ids[0]]
    np.testing.assert_array_equal(sub.mask, qm.mask[[2, 0]])
    np.testing.assert_array_equal(sub.performance, qm.performance[[2, 0]])
    train = qm.split("train")
    assert len(train) == 2 and train.queries == [qm.queries[0], qm.queries[2]] and train.models == qm.models
    assert len(qm.split("val")) == 0
    assert qm.binary  # NaN in masked cells does not count
    qm.performance[0, 0] = 0.5
    assert not qm.binary


# normalisation ----------------------------------------------------------------------------------------
def hand_matrix() -> QueryMatrix:
    nan = np.nan
    perf = np.array([[0.2, 1.0], [0.6, nan], [0.0, 0.5], [0.5, 0.0], [0.5, 0.5]], np.float32)
    cost = np.array([[1.0, 3.0], [2.0, nan], [10.0, 30.0], [20.0, 10.0], [4.0, 4.0]], np.float32)
    tasks = np.array(["a", "a", "b", "b", "c"], dtype=object)
    n = len(tasks)
    return QueryMatrix(np.array([f"q{i}" for i in range(n)], dtype=object), [f"q{i}" for i in range(n)],
                       tasks, tasks.copy(), np.array(["train"] * n, dtype=object), ["x", "y"],
                       perf, cost, np.full_like(perf, nan), ~np.isnan(perf))


def test_task_normaliser_is_per_task_min_max():
    qm = hand_matrix()
    norm = TaskNormaliser.fit(qm)
    assert norm.perf_range["a"] == pytest.approx((0.2, 1.0)) and norm.perf_range["b"] == (0.0, 0.5)
    assert norm.cost_range["a"] == (1.0, 3.0) and norm.cost_range["b"] == (10.0, 30.0)
    p = norm.performance(qm.performance, qm.tasks)
    c = norm.cost(qm.cost, qm.tasks)
    np.testing.assert_allclose(p[:4], [[0.0, 1.0], [0.5, np.nan], [0.0, 1.0], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(c[:4], [[0.0, 1.0], [0.5, np.nan], [0.0, 1.0], [0.5, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(p[4], [0.0, 0.0])  # constant task -> 0
    np.testing.assert_array_equal(c[4], [0.0, 0.0])


def test_task_normaliser_uses_the_global_range_for_unseen_tasks_and_round_trips():
    norm = TaskNormaliser.fit(hand_matrix())
    assert norm.perf_range[TaskNormaliser.GLOBAL] == (0.0, 1.0)
    assert norm.cost_range[TaskNormaliser.GLOBAL] == (1.0, 30.0)
    vals = np.array([[0.25, 15.5]], np.float32)
    unseen = np.array(["never seen"], dtype=object)
    assert norm.performance(vals[:, :1], unseen)[0, 0] == pytest.approx(0.25)
    assert norm.cost(vals[:, 1:], unseen)[0, 0] == pytest.approx(0.5)
    again = TaskNormaliser.from_state_dict(json.loads(json.dumps(norm.state_dict())))
    assert again.perf_range == norm.perf_range and again.cost_range == norm.cost_range
    qm = hand_matrix()
    np.testing.assert_array_equal(again.cost(qm.cost, qm.tasks), norm.cost(qm.cost, qm.tasks))


# rewards --------------------------------------------------------------------------------------------
PERF_N = np.array([[1.0, 0.0], [0.5, 1.0]])
COST_N = np.array([[1.0, 0.0], [0.0, 0.5]])


def test_reward_settings_are_the_papers_weights():
    papers = {"performance_first": (1.0, 0.0), "balance": (0.5, 0.5), "cost_first": (0.2, 0.8)}
    assert dict(REWARD_SETTINGS) == papers


@pytest.mark.parametrize("setting, expected", [
    ("performance_first", [[1.0, 0.0], [0.5, 1.0]]),
    ("balance", [[0.0, 0.0], [0.25, 0.25]]),
    ("cost_first", [[-0.6, 0.0], [0.1, -0.2]]),
])
def test_reward_by_hand(setting, expected):
    np.testing.assert_allclose(reward(PERF_N, COST_N, setting), expected, atol=1e-12)


def test_judge_reward_and_errors():
    judge = np.array([[0.3, 0.8], [1.0, 0.0]])
    np.testing.assert_array_equal(reward(PERF_N, COST_N, "judge", judge=judge), judge)
    with pytest.raises(ValueError, match="judge"):
        reward(PERF_N, COST_N, "judge")
    with pytest.raises(ValueError, match="judge"):  # a log without judge scores gives an all-NaN matrix
        reward(PERF_N, COST_N, "judge", judge=np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="performance_first, balance, cost_first, judge"):
        reward(PERF_N, COST_N, "quality_first")


# --------------------------------------------------------------------------------------------- grouping codes

def test_codes_are_dense_in_dictionary_order_with_or_without_duplicate_entries():
    from fusion_lightning.data.arrow import codes

    distinct = pa.DictionaryArray.from_arrays(pa.array([2, None, 0, 2, 0], pa.int32()), pa.array(["a", "unused", "c"]))
    idx, values = codes(pa.chunked_array([distinct[:2], distinct[2:]]))
    assert values == ["a", "c", None] and idx.tolist() == [1, 2, 0, 1, 0]  # unused entry dropped, null last
    # a dictionary holding "a" twice (as parquet fallback pages can): equal strings get one code
    dup = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, 1], pa.int32()), pa.array(["a", "b", "a"]))
    idx, values = codes(dup)
    assert values == ["a", "b"] and idx.tolist() == [0, 1, 0, 1]
    idx, values = codes(pa.array(["x", "y", "x"]))  # plain strings are dictionary-encoded first
    assert values == ["x", "y"] and idx.tolist() == [0, 1, 0]


def test_from_codes_merges_equal_values_and_query_ids_match_one_by_one():
    from fusion_lightning.data.arrow import from_codes
    from fusion_lightning.data.schema import make_query_id, make_query_ids

    col = from_codes(np.array([0, 1, 2, 1]), ["a", "b", "a"])
    assert col.to_pylist() == ["a", "b", "a", "b"] and col.dictionary.to_pylist() == ["a", "b"]
    assert from_codes(np.array([1, 0]), ["a", None]).to_pylist() == [None, "a"]
    assert from_codes(np.array([1, 0]), ["p", "q"]).dictionary.to_pylist() == ["p", "q"]
    tasks, queries = ["gsm8k", None, "mmlu"], ["What is 2+2?", "Ünïcode ✓", None]
    expected = [make_query_id(t, q or "") for t, q in zip(tasks, queries, strict=True)]
    assert make_query_ids(pa.array(tasks, pa.string()), pa.array(queries, pa.string())).to_pylist() == expected
    sliced = pa.array(["x", *tasks], pa.string())[1:]  # a non-zero array offset reads the right bytes
    assert make_query_ids(sliced, pa.array(queries, pa.string())).to_pylist() == expected
    assert from_codes(np.array([1, 0]), pa.array(["p", None])).to_pylist() == [None, "p"]


def test_query_id_collision_raises_instead_of_merging_two_queries(monkeypatch):
    import hashlib

    from fusion_lightning.data.schema import make_query_ids

    class Same:  # every input hashes alike: the 64-bit collision the check exists for
        def __init__(self, data):
            pass

        def digest(self):
            return bytes(20)

    monkeypatch.setattr(hashlib, "sha1", Same)
    with pytest.raises(ValueError, match="collides: 'gsm8k\\\\x1fa' and 'gsm8k\\\\x1fb'"):
        make_query_ids(pa.array(["gsm8k", "gsm8k"]), pa.array(["a", "b"]))


def test_blank_is_exactly_python_strip_over_every_code_point():
    from fusion_lightning.data.validate import blank

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]  # every code point but surrogates
    texts = chars + ["".join(c for c in chars if c.isspace()), " a ", "", None]
    expected = [t is None or not t.strip() for t in texts]
    assert blank(pa.array(texts, pa.string())).tolist() == expected
    assert sum(expected) == 29 + 3  # Python's 29 whitespace characters, all of them together, "" and None
