"""Preference logs (data=preferences): Chatbot Arena battle files in every container, prompts as text or chat
turns, validation errors that name file, row and field, splits by query, and `router_bt` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.datamodule import load_from_config
from fusion_lightning.data.errors import LogFormatError, LogValidationError
from fusion_lightning.data.preference_reader import prompt_text
from fusion_lightning.data.preferences import load_preferences
from fusion_lightning.data.readers import ReaderOptions
from fusion_lightning.fit import fit
from fusion_lightning.query.router import Router

MATH = ["sum", "add", "multiply", "numbers", "total", "plus", "product", "digits"]
POEM = ["poem", "rhyme", "verse", "stanza", "sonnet", "metaphor", "haiku", "lyric"]
MODELS = ("gpt-4-0613", "claude-2.1", "vicuna-13b")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _battle(prompt, a="gpt-4-0613", b="vicuna-13b", winner="model_a", **extra) -> dict:
    return {"question_id": "x", "prompt": prompt, "model_a": a, "model_b": b, "winner": winner, **extra}


def arena_file(path: Path, n_prompts: int = 100, seed: int = 0) -> Path:
    """~200 battles in Chatbot Arena's shape (chat-turn prompts, judge, language, turn): on arithmetic prompts
    gpt-4 beats claude, on poetry prompts claude beats gpt-4 (85% of the time), and both beat vicuna."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_prompts):
        topic = MATH if i % 2 == 0 else POEM
        text = f"prompt {i}: " + " ".join(rng.choice(topic, 5))
        turns = [{"role": "user", "content": text}, {"role": "assistant", "content": "..."}]
        best, other = ("gpt-4-0613", "claude-2.1") if i % 2 == 0 else ("claude-2.1", "gpt-4-0613")
        won = rng.random() < 0.85
        swap = rng.random() < 0.5  # either side may be model_a
        a, b = (best, other) if not swap else (other, best)
        winner = ("model_a" if won != swap else "model_b") if rng.random() > 0.1 else "tie"
        rows.append(_battle(turns, a, b, winner, judge=f"arena_user_{i % 7}", language="English", turn=1))
        rows.append(_battle(turns, rng.choice(["gpt-4-0613", "claude-2.1"]), "vicuna-13b",
                            "model_a" if rng.random() < 0.8 else "tie (bothbad)", language="English", turn=1))
    return _jsonl(path, rows)


def test_prompt_text_takes_the_user_turns() -> None:
    assert prompt_text("plain text") == "plain text"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "2+2?"}]
    assert prompt_text(turns) == "hi\n2+2?"
    assert prompt_text(["first", "second"]) == "first\nsecond"  # the arena 55k release: user prompts only
    assert prompt_text(json.dumps(["first", "second"])) == "first\nsecond"  # ... JSON-encoded in its CSV
    assert prompt_text("[not json]") == "[not json]"
    with pytest.raises(ValueError, match="expected text or a list of chat turns, got int"):
        prompt_text(3)


def test_jsonl_csv_and_parquet_read_to_the_same_battles(tmp_path: Path) -> None:
    src = arena_file(tmp_path / "arena.jsonl", n_prompts=20)
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    flat = [{**r, "prompt": json.dumps([t["content"] for t in r["prompt"] if t["role"] == "user"])} for r in recs]
    with (tmp_path / "arena.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "arena.parquet")
    conv = [{k: v for k, v in r.items() if k != "prompt"} | {"conversation_a": r["prompt"]} for r in recs]
    _jsonl(tmp_path / "conv.jsonl", conv)  # the chatbot_arena_conversations release: no prompt column
    tables = [load_preferences(tmp_path / f, ReaderOptions(task="arena"))
              for f in ("arena.jsonl", "arena.csv", "arena.parquet", "conv.jsonl")]
    t = tables[0]
    assert len(t) == 40 and len(t.queries) == 20 and set(t.models) == set(MODELS)
    assert set(t.extra) == {"judge", "language", "turn"} and t.extra["turn"][0] == 1
    for other in tables[1:]:
        assert other.queries == t.queries and list(other.query_ids) == list(t.query_ids)
        np.testing.assert_array_equal(other.outcome, t.outcome)
        assert [other.models[i] for i in other.a] == [t.models[i] for i in t.a]
        assert list(other.splits) == list(t.splits)
    assert any("conversation_a" in n for n in tables[3].report.notes)


def test_validation_errors_name_file_row_and_field(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "battles.jsonl", [
        _battle("fine"),
        _battle("bad winner", winner="A"),
        {"prompt": "no model_b", "model_a": "gpt-4-0613", "winner": "tie"},
        _battle("   "),
        _battle([{"role": "assistant", "content": "only the assistant"}]),
        _battle("same", a="vicuna-13b", b="vicuna-13b"),
        _battle("turn", turn="first"),
        _battle("fine too", winner="tie (bothbad)"),
    ])
    with pytest.raises(LogValidationError) as e:
        load_preferences(f)
    issues = {(i.row, i.field): i.message for i in e.value.issues}
    assert all(i.file == str(f) for i in e.value.issues)
    assert issues[(2, "winner")].startswith("unknown value 'A'; expected one of 'model_a', 'model_b', 'tie'")
    assert issues[(3, "model_b")] == "missing model"
    assert issues[(4, "prompt")] == issues[(5, "prompt")] == "empty prompt (no user text)"
    assert issues[(6, "model_b")].startswith("the same model as model_a")
    assert issues[(7, "turn")] == "not a turn number (1, 2, ...): 'first'"
    assert f"{f}: row 2: field 'winner'" in str(e.value)
    t = load_preferences(f, on_error="quarantine", split="query", val_fraction=0.0, test_fraction=0.0)
    assert len(t) == 2 and t.report.counts["quarantined_rows"] == 6 and t.report.counts["battles_read"] == 8
    assert t.report.quarantine[0]["_row"] == 2 and t.report.quarantine[0]["_reasons"][0].startswith("winner:")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"gpt-4-0613": {}}))
    with pytest.raises(LogValidationError, match=r"row 1: field 'model_b': unknown model 'vicuna-13b'"):
        load_preferences(f, ReaderOptions(catalog=str(catalog)))
    (tmp_path / "nob.csv").write_text("prompt,model_a,winner\nhi,gpt-4-0613,model_a\n")
    with pytest.raises(LogFormatError, match=r"nob.csv: missing required column\(s\) \['model_b'\]"):
        load_preferences(tmp_path / "nob.csv")


def test_splits_are_by_query_and_follow_file_names(tmp_path: Path) -> None:
    t = load_preferences(arena_file(tmp_path / "arena.jsonl"), split_seed=3)
    split_of = dict(zip(t.queries, t.splits, strict=True))
    assert len(split_of) == 100 and {s for s in split_of.values()} == {"train", "val", "test"}
    assert sum(s == "test" for s in split_of.values()) == 20  # test_fraction 0.2 of the prompts
    # every battle of a prompt is in its prompt's split (two battles per prompt here)
    for s in ("train", "val", "test"):
        part = t.select(s)
        assert set(part.queries) == {q for q, v in split_of.items() if v == s} and len(part) == 2 * len(part.queries)
    d = tmp_path / "files"
    d.mkdir()
    rows = [json.loads(x) for x in (tmp_path / "arena.jsonl").read_text().splitlines()]
    _jsonl(d / "battles_train.jsonl", rows[:160])
    _jsonl(d / "battles_test.jsonl", rows[160:])
    by_file = load_preferences(d, val_fraction=0.0)
    assert len(by_file.select("test")) == 40 and len(by_file.select("train")) == 160


def test_score_recipes_refuse_a_preference_log(tmp_path: Path) -> None:
    cfg = compose_recipe("router_mlp", ["data=preferences", f"data.path={tmp_path}"])
    with pytest.raises(ValueError, match="pairwise battles, not task scores: train on them with recipe=router_bt"):
        load_from_config(cfg.data)


def test_router_bt_fits_a_chatbot_arena_file_end_to_end(tmp_path: Path) -> None:
    """recipe=router_bt data=preferences: the battles go through reading, validation, splits, the similarity-
    weighted fit, the held-out battle metrics and a checkpoint that routes by topic."""
    path = arena_file(tmp_path / "chatbot_arena.jsonl")
    with path.open("a") as fh:  # one bad battle, set aside by data.on_error=quarantine
        fh.write(json.dumps(_battle("who won?", winner="both")) + "\n")
    cfg = compose_recipe("router_bt", ["data=preferences", f"data.path={path}", "data.on_error=quarantine",
                                       "datamodule.encoder=hashing",
                                       f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
                                       "logger=none"])
    summary = fit(cfg)
    assert summary["pairs_from"] == "preferences" and summary["data"]["battles"] == 200
    assert summary["data"]["test_queries"] == 20 and summary["data"]["test_battles"] == 40
    assert set(summary["bt"]["elo"]) == set(MODELS) and min(summary["bt"]["elo"], key=summary["bt"]["elo"].get) == \
        "vicuna-13b"
    m = summary["metrics"]
    assert "test/perf" not in m  # no per-model scores exist: no score-based routing metric is reported
    assert m["test/pairwise_acc"] > m["test/global/pairwise_acc"] and m["test/pairwise_acc"] > 0.8
    assert m["test/chosen_win_rate"] > m["test/best_single/chosen_win_rate"]
    assert m["val/loss"] > 0 and m["test/loss"] > 0
    run = tmp_path / "run"
    assert not (run / "routing_table.md").exists()
    assert summary["data"]["quarantined_rows"] == 1
    bad = json.loads((run / summary["artifacts"]["quarantine"]).read_text())
    assert bad["_row"] == 201 and bad["_reasons"][0].startswith("winner: unknown value 'both'")
    report = json.loads((run / "data_report.json").read_text())
    assert report["counts"]["battles"] == 200 and any("no per-model score" in n for n in report["notes"])
    router = Router.load(run / summary["artifacts"]["best_checkpoint"])
    routed = router.route(["prompt x: add the numbers, total plus product", "prompt y: a sonnet with rhyme and verse"])
    assert routed.models == ["gpt-4-0613", "claude-2.1"]
