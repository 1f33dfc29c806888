"""Prefill-activation features (`encoder=hf:NAME[@LAYER][:POOL]`), concatenated encoders (`a&b`), and the
layer probe: the encoder's vectors are the model's own hidden states, the same whatever the batch, its
padding side or the process; the embed job, the cache, a router fit and Router.load accept them; the
probe ranks a planted informative layer first and `hf:NAME` then uses it. All on the zoo's tiny-llama."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import write_subtopic_logs

import fusion_lightning.zoo as zoo
from fusion_lightning.config import compose_recipe
from fusion_lightning.data import prefill_encoder as pe
from fusion_lightning.data.embeddings import ConcatEncoder, EmbeddingCache, build_encoder
from fusion_lightning.data.encoders import HashingEncoder
from fusion_lightning.data.layer_probe import (
    candidate_layers,
    fisher_separability,
    participation_ratio,
    pick_layer,
)
from fusion_lightning.data.prefill_encoder import PrefillEncoder, parse_prefill_spec
from fusion_lightning.fit import fit
from fusion_lightning.query.router import Router

TEXTS = [
    "What is the capital of France?",
    "Solve 12 * 7 and explain the steps.",
    "Write a Python function that reverses a string, then test it on three examples of your choice.",
    "hi",
    "",
    "Who wrote Pride and Prejudice? Answer with the author's full name and the year it was published.",
    "Tom has 12 apples and gives away 5. How many are left?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The capital of Italy is Rome.",
]
TINY = "hf:tiny-llama"


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return zoo.resolve("tiny-llama")


@pytest.fixture
def probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The layer probe's pick cache in a temporary folder (the zoo's models stay where they are)."""
    root = tmp_path / "fl_cache"
    monkeypatch.setattr(pe, "cache_root", lambda: root)
    return root


def _full_hidden(path: str, text: str) -> tuple[torch.Tensor, ...]:
    """Every hidden state of the whole (uncut) model for one text, straight from transformers."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        return model(**tok([text], return_tensors="pt"), output_hidden_states=True).hidden_states


def test_spec_parses_and_names_round_trip_with_the_resolved_layer() -> None:
    assert parse_prefill_spec("hf:smollm2-135m") == ("smollm2-135m", None, "mean")
    assert parse_prefill_spec("hf:/models/x@-3:last") == ("/models/x", -3, "last")
    assert parse_prefill_spec("hf:/a:b/c@4") == ("/a:b/c", 4, "mean")  # a path may hold a colon
    e = build_encoder(f"{TINY}@-1:last+len64")  # tiny-llama: 2 layers, hidden_states 0..2
    assert isinstance(e, PrefillEncoder) and (e.layer, e.pool, e.max_seq_length, e.dim) == (2, "last", 64, 64)
    assert e.name == "hf:tiny-llama@2:last+len64"
    for spec in (e.name, f"{TINY}@1", f"{TINY}@0+len16"):
        assert build_encoder(build_encoder(spec).name).name == build_encoder(spec).name
    assert build_encoder(f"{TINY}@1:mean").name == build_encoder(f"{TINY}@1+len256").name == "hf:tiny-llama@1"
    assert build_encoder("hf:some-model@5").name == "hf:some-model@5"  # a given layer needs no model to name
    with pytest.raises(ValueError, match="layer comes before the pool"):
        build_encoder(f"{TINY}:last@1")
    with pytest.raises(ValueError, match="no \\+onnx"):
        build_encoder(f"{TINY}@1+onnx")
    with pytest.raises(ValueError, match="layers 0..2"):
        _ = build_encoder(f"{TINY}@-4").name
    with pytest.raises(ValueError, match="neither a local directory nor a zoo"):
        _ = build_encoder("hf:no-such-model-here").dim


def test_vectors_are_the_models_hidden_states_pooled_unit_and_float32(tiny_dir: str) -> None:
    text = TEXTS[2]
    full = _full_hidden(tiny_dir, text)
    assert len(full) == 3
    for layer in (0, 1, 2):  # the model is cut above the layer asked for: the states must not change
        mean = build_encoder(f"{TINY}@{layer}").encode([text])[0]  # the mean of the tokens' unit vectors
        want = torch.nn.functional.normalize(torch.nn.functional.normalize(full[layer][0], dim=-1).mean(0), dim=-1)
        np.testing.assert_allclose(mean, want.numpy(), atol=1e-5)
        last = build_encoder(f"{TINY}@{layer}:last").encode([text])[0]
        np.testing.assert_allclose(last, torch.nn.functional.normalize(full[layer][0, -1], dim=-1).numpy(), atol=1e-5)
    v = build_encoder(f"{TINY}@1").encode(TEXTS)
    assert v.shape == (len(TEXTS), 64) and v.dtype == np.float32
    norms = np.linalg.norm(v, axis=1)
    assert np.all(v[4] == 0) and np.allclose(np.delete(norms, 4), 1.0, atol=1e-5)  # the empty text: a zero row


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_batch_size_padding_side_and_a_fresh_load_give_the_same_vectors(pool: str) -> None:
    spec = f"{TINY}@1:{pool}"
    one = np.concatenate([build_encoder(spec).encode([t], batch_size=1) for t in TEXTS])
    enc = build_encoder(spec)
    eight = enc.encode(TEXTS, batch_size=8)
    np.testing.assert_allclose(eight, one, atol=1e-5)
    left = build_encoder(spec, padding_side="left").encode(TEXTS, batch_size=8)
    np.testing.assert_allclose(left, one, atol=1e-5)
    np.testing.assert_array_equal(build_encoder(spec).encode(TEXTS, batch_size=8), eight)  # deterministic
    np.testing.assert_array_equal(enc.encode(TEXTS[::-1], batch_size=8), eight[::-1])  # order-free
    enc.max_batch_tokens = 24  # long texts alone, short ones together
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=8), one, atol=1e-5)


def test_token_batches_cap_rows_and_padded_tokens() -> None:
    lengths = [5, 40, 3, 3, 12, 0, 30, 7]
    batches = pe.token_batches(lengths, batch_size=3, max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(8))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # by length: batches pad little
    assert all(len(b) <= 3 for b in batches)
    assert all(len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1 for b in batches)
    assert batches[-1] == [1] and [6] in batches  # 30 and 40 tokens: a batch each


def test_max_seq_length_truncates(tiny_dir: str) -> None:
    tok = build_encoder(f"{TINY}@1").tokenizer
    head = TEXTS[2]
    assert len(tok(head)["input_ids"]) > 8
    short = build_encoder(f"{TINY}@1+len8").encode([head, head + " and a long tail that changes nothing"])
    np.testing.assert_allclose(short[0], short[1], atol=1e-6)  # the first 8 tokens are all it reads
    full = build_encoder(f"{TINY}@1").encode([head, head + " and a long tail that changes nothing"])
    assert np.abs(full[0] - full[1]).max() > 1e-3


def test_without_a_layer_the_probe_pick_else_the_middle_layer_with_a_log_line(
        tiny_dir: str, probe_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=pe.__name__):
        assert build_encoder(TINY).name == "hf:tiny-llama@1"  # 2 layers: the middle one
    assert "the middle layer: no layer probe result" in caplog.text
    where = pe.probe_pick_path(tiny_dir, "mean")
    assert where.parent.parent == probe_cache / "layer_probe"
    where.parent.mkdir(parents=True)
    where.write_text(json.dumps({"layer": 2}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=pe.__name__):
        assert build_encoder(TINY).name == "hf:tiny-llama@2"
        assert build_encoder(f"{TINY}:last").name == "hf:tiny-llama@1:last"  # picks are per pool
    assert "the layer probe's pick" in caplog.text and str(where) in caplog.text
    assert build_encoder("hf:tiny-llama@0").name == "hf:tiny-llama@0"  # a given layer wins


def test_cache_returns_the_same_vectors_without_running_the_model(tmp_path: Path, monkeypatch) -> None:
    enc = build_encoder(f"{TINY}@2")
    first = EmbeddingCache(tmp_path, enc).embed(TEXTS, batch_size=3, show_progress=False)
    calls: list[int] = []
    monkeypatch.setattr(PrefillEncoder, "encode_layers", lambda *a, **k: calls.append(1))
    again = EmbeddingCache(tmp_path, build_encoder(enc.name))
    np.testing.assert_array_equal(again.embed(TEXTS, show_progress=False), first)
    assert again.stats == {"hits": len(TEXTS), "misses": 0} and calls == []


def test_concatenation_joins_unit_parts_caches_each_part_and_shares_one_forward(tmp_path: Path, monkeypatch) -> None:
    cat = build_encoder(["hashing-32", f"{TINY}@1"])
    assert isinstance(cat, ConcatEncoder) and cat.name == "hashing-32&hf:tiny-llama@1" and cat.dim == 96
    assert build_encoder(cat.name).name == cat.name
    parts = [HashingEncoder(32).encode(TEXTS), build_encoder(f"{TINY}@1").encode(TEXTS)]
    want = np.concatenate(parts, axis=1)
    want /= np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-12)
    got = EmbeddingCache(tmp_path, cat).embed(TEXTS, show_progress=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[0, :32] * np.sqrt(2), parts[0][0], atol=1e-5)  # equal weight per part
    alone = EmbeddingCache(tmp_path, build_encoder(f"{TINY}@1"))  # the part's own cache entry serves it alone
    assert {p.name for p in tmp_path.iterdir()} == {"hashing-32", alone.dir.name}
    np.testing.assert_allclose(alone.embed(TEXTS, show_progress=False), parts[1], atol=1e-5)
    assert alone.stats["misses"] == 0
    passes: list[list] = []
    inner = PrefillEncoder.encode_layers
    monkeypatch.setattr(PrefillEncoder, "encode_layers",
                        lambda self, texts, outputs, *a, **k: passes.append(list(outputs)) or inner(self, texts, outputs, *a, **k))
    two = build_encoder(f"{TINY}@1&{TINY}@2:last")
    v = two.encode(TEXTS)
    assert passes == [[(1, "mean"), (2, "last")]]  # two layers, one forward pass
    np.testing.assert_allclose(v[:, 64:] * np.sqrt(2), build_encoder(f"{TINY}@2:last").encode(TEXTS), atol=1e-5)


def _embed_args(tmp_path: Path, name: str, encoder: str, *extra: str) -> list[str]:
    return ["debug=fast", "data.synthetic.n_queries=120", "datamodule.shard_size=32", f"encoder={encoder}",
            f"out={tmp_path / name}", f"run_dir={tmp_path / (name + '_run')}", *extra]


def _cached(root: Path, encoder: str, texts: list[str]) -> np.ndarray:
    return EmbeddingCache(root, build_encoder(encoder)).embed(texts, show_progress=False)


def test_embed_job_writes_the_encoders_vectors_at_any_batch_size(tmp_path: Path) -> None:
    spec = f"{TINY}@1"
    a = fit(compose_recipe("embed", _embed_args(tmp_path, "bs8", spec, "datamodule.batch_size=8")))["embed"]
    b = fit(compose_recipe("embed", _embed_args(tmp_path, "bs32", spec, "datamodule.batch_size=32")))["embed"]
    assert a["encoder"] == "hf:tiny-llama@1" and a["embedded"] == b["embedded"] == a["unique"] > 100
    from fusion_lightning.data.embed_job import EmbedDataModule

    dm = EmbedDataModule(data=dict(compose_recipe("embed", _embed_args(tmp_path, "x", spec)).data), encoder=spec,
                         embedding_cache=str(tmp_path / "x"))
    texts = dm.texts()
    v8, v32 = _cached(tmp_path / "bs8", spec, texts), _cached(tmp_path / "bs32", spec, texts)
    np.testing.assert_allclose(v8, v32, atol=1e-5)
    np.testing.assert_allclose(v8, build_encoder(spec).encode(texts, batch_size=5), atol=1e-5)
    again = fit(compose_recipe("embed", _embed_args(tmp_path, "bs8", spec)))["embed"]
    assert again["planned"] == 0 and again["embedded"] == 0


@pytest.mark.integration
def test_two_ddp_processes_embed_a_concatenation_like_one_process(tmp_path: Path, tiny_dir: str) -> None:
    """trainer.devices=2 on CPU with `encoder=[hashing,hf:tiny-llama@1]`: each part lands in its own cache
    folder, every text once, and the prefill vectors equal one process's (and the encoder's own)."""
    enc = f"[hashing,{TINY}@1]"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "FUSION_LIGHTNING_CACHE": str(Path(tiny_dir).parents[1])}  # the zoo's tiny-llama, from the tmp cwd
    r = subprocess.run([sys.executable, "-m", "fusion_lightning.embed",
                        *_embed_args(tmp_path, "ddp", enc, "trainer.devices=2", "trainer.accelerator=cpu",
                                     "strategy=ddp")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ddp = json.loads((tmp_path / "ddp_run" / "summary.json").read_text())["embed"]
    assert ddp["world_size"] == 2 and ddp["parts"] == 2 and ddp["encoder"] == "hashing-256&hf:tiny-llama@1"
    one = fit(compose_recipe("embed", _embed_args(tmp_path, "one", enc)))["embed"]
    assert ddp["embedded"] == one["embedded"] == 2 * one["unique"]  # every text once per part
    from fusion_lightning.data.embed_job import EmbedDataModule

    texts = EmbedDataModule(data=dict(compose_recipe("embed", _embed_args(tmp_path, "x", enc)).data),
                            embedding_cache=str(tmp_path / "x")).texts()
    for part in ("hashing-256", f"{TINY}@1"):
        keys = [k for p in EmbeddingCache(tmp_path / "ddp", build_encoder(part)).shards()
                for k in np.load(p)["keys"].tolist()]
        assert len(keys) == len(set(keys)) == one["unique"]
        np.testing.assert_allclose(_cached(tmp_path / "ddp", part, texts), _cached(tmp_path / "one", part, texts),
                                   atol=1e-6)
    np.testing.assert_allclose(_cached(tmp_path / "ddp", f"{TINY}@1", texts),
                               build_encoder(f"{TINY}@1").encode(texts, batch_size=1), atol=1e-5)
    counted = EmbeddingCache(tmp_path / "ddp", build_encoder(["hashing", f"{TINY}@1"]))
    counted.embed(texts, show_progress=False)
    assert counted.stats["misses"] == 0


def test_concatenated_features_route_and_the_checkpoint_rebuilds_the_encoder(tmp_path: Path) -> None:
    """router_mlp on hashing + tiny-llama prefill features, on a log whose rule lives inside each task
    (the lookup cannot see it): it routes well above the lookup, and Router.load serves with the same
    concatenated encoder."""
    folder = write_subtopic_logs(tmp_path / "sub")
    summary = fit(compose_recipe("router_mlp", [
        "data=llmrouter", f"data.path={folder}", f"datamodule.encoder=[hashing,{TINY}@1]",
        f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", "logger=none",
        "callbacks=none", "trainer.max_epochs=25"]))
    m = summary["metrics"]
    assert m["test/task_best/perf"] < 0.65, m
    assert m["test/perf"] >= m["test/task_best/perf"] + 0.2, m
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir()} >= {"hashing", "hf_tiny"}
    router = Router.load(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    assert router.encoder.name == "hashing-256&hf:tiny-llama@1" and router.module.hparams.embed_dim == 320
    out = router.route(["math 3: sum add plus total", "math 4: triangle angle circle radius"], tasks=["math", "math"])
    assert out.models == ["alpha", "beta"]


def test_fisher_separability_and_participation_ratio_on_hand_examples() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 3))
    y = np.arange(400) % 2 == 0
    z[y, 0] += 2.0  # the classes 2 apart along one unit-variance axis: J = 4
    assert fisher_separability(z, y) == pytest.approx(4.0, rel=0.15)
    assert fisher_separability(rng.normal(size=(400, 3)), y) < 0.1
    assert participation_ratio(rng.normal(size=(5000, 4))) == pytest.approx(4.0, rel=0.05)
    assert participation_ratio(rng.normal(size=(5000, 4)) * [10, 0.01, 0.01, 0.01]) == pytest.approx(1.0, abs=0.01)
    rows = [{"layer": 0, "fisher": 1.0, "pr_per_dim": 0.5}, {"layer": 1, "fisher": 2.0, "pr_per_dim": 0.1},
            {"layer": 2, "fisher": 1.99, "pr_per_dim": 0.3}]
    assert pick_layer(rows) == 2 and pick_layer(rows, tie=0.0) == 1  # within 1%: the less anisotropic layer
    assert candidate_layers("all", 4) == [0, 1, 2, 3, 4] and candidate_layers(3, 7) == [0, 3, 6, 7]
    assert candidate_layers([-1, 2], 4) == [2, 4]


def _hidden_label(ids: list[int]) -> bool:
    """A pseudo-random function of a text's token ids: nothing a pooled layer sees linearly."""
    return int(hashlib.sha1(str(list(ids)).encode()).hexdigest(), 16) % 2 == 0


def _planted_logs(folder: Path, tokenizer, n: int = 160, seed: int = 0) -> Path:  # noqa: ANN001
    """LLMRouter-format logs, one task: `alpha` is right exactly on the queries whose `_hidden_label` is
    true, `beta` on a coin flip."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["river", "capital", "sum", "poem", "train", "apple", "cloud", "stone", "market", "garden"]
    (folder / "llm_candidates.json").write_text(json.dumps({m: {"size": "7B", "feature": m, "input_price": 1.0,
                                                                 "output_price": 1.0} for m in ("alpha", "beta")}))
    for split, count in (("train", n), ("test", n // 4)):
        scores, queries = [], []
        for i in range(count):
            q = f"{split} {i}: " + " ".join(rng.choice(words, size=5))
            right = _hidden_label(tokenizer(q)["input_ids"])
            scores.append({"question": q, "scores": {"alpha": float(right), "beta": float(rng.random() < 0.5)}})
            queries.append({"task_name": "qa", "query": q, "ground_truth": "x", "metric": "em_mc"})
        (folder / f"scores_{split}.json").write_text(json.dumps(scores))
        (folder / f"queries_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n")
    return folder


@pytest.mark.parametrize("planted", [0, 2])
def test_layer_probe_ranks_the_planted_layer_first_and_hf_name_then_uses_it(
        tmp_path: Path, probe_cache: Path, monkeypatch: pytest.MonkeyPatch, planted: int) -> None:
    """tiny-llama's forward is wrapped so that hidden state `planted` (and only it) moves along one direction
    on the queries where alpha is right (a hash of the token ids: no layer of the model sees it otherwise)."""
    folder = _planted_logs(tmp_path / "logs", build_encoder(f"{TINY}@1").tokenizer)
    load = PrefillEncoder._load

    def marked_load(self, up_to=None):  # noqa: ANN001
        model = load(self, up_to)
        if getattr(model, "_planted", False):
            return model
        direction = torch.nn.functional.normalize(torch.ones(model.config.hidden_size), dim=0)
        forward = model.forward

        def fake_forward(*args, **kw):  # noqa: ANN002, ANN003
            out = forward(*args, **kw)
            ids, mask = kw["input_ids"], kw["attention_mask"].bool()
            hit = torch.tensor([_hidden_label(r[m].tolist()) for r, m in zip(ids, mask, strict=True)],
                               dtype=torch.float32)[:, None, None]
            hs = list(out.hidden_states)
            hs[planted] = hs[planted] + 3.0 * hs[planted].norm(dim=-1, keepdim=True) * hit * direction
            out.hidden_states = tuple(hs)
            return out

        model.forward, model._planted = fake_forward, True
        return model

    monkeypatch.setattr(PrefillEncoder, "_load", marked_load)
    summary = fit(compose_recipe("layer_probe", [
        "data=llmrouter", f"data.path={folder}", f"encoder={TINY}", f"out={tmp_path / 'emb'}",
        f"run_dir={tmp_path / 'run'}", "datamodule.batch_size=16"]))
    p = summary["probe"]
    assert p["layer"] == planted and p["encoder"] == f"hf:tiny-llama@{planted}"
    table = json.loads((tmp_path / "run" / "probe.json").read_text())
    ranked = sorted(table["layers"], key=lambda r: -r["fisher"])
    assert ranked[0]["layer"] == planted and ranked[0]["fisher"] > 5 * ranked[1]["fisher"]
    assert ranked[0]["per_model"]["alpha"]["fisher"] > 10 * ranked[0]["per_model"]["beta"]["fisher"]
    train = summary["data"]["train_queries"]
    assert table["queries"] == train < 160 and table["split"] == "train"  # train only, not val
    lines = (tmp_path / "run" / "probe.csv").read_text().splitlines()
    assert lines[0].startswith("layer,fisher,fisher_within_task,participation_ratio") and len(lines) == 4
    assert (tmp_path / "run" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    e = summary["embed"]
    assert e["parts"] == 1 and len(e["dirs"]) == 3 and e["embedded"] == train  # 3 layers, one forward pass
    assert summary["artifacts"]["probe_png"] == "probe.png"
    # the pick is cached where hf:NAME (no layer) finds it, and every layer's train vectors are cached
    assert json.loads(Path(p["cached_at"]).read_text())["layer"] == planted
    assert build_encoder(TINY).name == f"hf:tiny-llama@{planted}"
    cache = EmbeddingCache(tmp_path / "emb", build_encoder(TINY))
    assert len(cache.cached_keys()) == train


def test_submit_sends_the_layer_probe_with_ddp_across_nodes() -> None:
    from fusion_lightning.submit import build as submit_build

    script, argv, _ = submit_build(["recipe=layer_probe", "slurm.nodes=2", "slurm.gpus_per_node=8", "data=llmrouter",
                                    "encoder=hf:smollm2-135m"])
    assert "--nodes=2" in script and argv[-1] == "strategy=ddp"  # a predict job: not the template's DeepSpeed
