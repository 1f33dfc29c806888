"""The ONNX Runtime encoders against the fp32 sentence-transformers MiniLM: on the shared LLMRouter queries,
and (in CI, without the shared data) on a few built-in queries.

ONNX fp32 is the same model (cosine >= 0.999, the same routing decisions on >= 99 % of test queries).
int8 keeps mean cosine >= 0.99, but a router trained on fp32 embeddings picks the same of the 9 models on
only ~94-97 % of test queries: below the issue's 99 %, and no part of the model left fp32 buys it back
(bench/int8_agreement.py). The decisions it changes are near-ties (their margin is a fraction of the
typical one) and the routed score does not drop, so the test holds int8 to that (>= 93 % same picks,
routed score at most 0.02 below fp32's) and the README reports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.data.encoders import parse_encoder_spec
from fusion_lightning.data.onnx_encoder import routing_agreement

pytest.importorskip("onnxruntime", reason="the +onnx encoders need the onnx extra (onnxruntime, onnx)")



@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export folder for the module's tests: each export and quantisation is made once."""
    return tmp_path_factory.mktemp("onnx")


def test_encoder_spec_round_trips_through_the_name(tmp_path: Path) -> None:
    enc = build_encoder("minilm+onnx-int8+len128", export_dir=tmp_path)
    assert enc.name == "all-MiniLM-L6-v2+onnx-int8+len128" and enc.max_seq_length == 128
    again = build_encoder(enc.name, export_dir=tmp_path)  # what a router checkpoint rebuilds
    assert again.name == enc.name and again.quantize
    assert build_encoder("minilm+len128").name == "all-MiniLM-L6-v2+len128"
    assert build_encoder("minilm").name == "all-MiniLM-L6-v2"  # the default keeps the existing cache key
    assert parse_encoder_spec("minilm+onnx") == ("minilm", "onnx", None)
    with pytest.raises(ValueError, match="hashing encoder has no backend"):
        build_encoder("hashing+onnx")


def test_onnx_int8_agrees_with_fp32_on_llmrouter_queries_and_routes_the_same(onnx_export: Path, shared_data) -> None:
    d = shared_data("llmrouter")
    from fusion_lightning.data.logtable import load_logs

    m = load_logs("llmrouter", d).matrix()
    rng = np.random.default_rng(0)
    train = rng.choice(np.flatnonzero(m.splits == "train"), 300, replace=False)  # fp32 only: the router's data
    test = rng.choice(np.flatnonzero(m.splits == "test"), 200, replace=False)
    texts = [m.queries[i] for i in np.concatenate([train, test])]
    fp32 = build_encoder("minilm+torch").encode(texts)
    onnx32 = build_encoder("minilm+onnx", export_dir=onnx_export).encode(texts)
    int8 = build_encoder("minilm+onnx-int8", export_dir=onnx_export).encode(texts)
    assert (onnx_export / "model.onnx").is_file() and (onnx_export / "model_int8.onnx").is_file()
    assert float((onnx32 * fp32).sum(1).mean()) >= 0.999
    cos = (int8 * fp32).sum(1)
    assert float(cos.mean()) >= 0.99, f"int8 mean cosine {cos.mean():.4f}"

    # a small router trained on fp32 embeddings (ridge regression to each model's score, argmax)
    perf = m.performance[np.concatenate([train, test])]
    onnx = routing_agreement(fp32, onnx32, perf, 300)
    q8 = routing_agreement(fp32, int8, perf, 300)
    assert onnx["distinct_picks"] > 1  # the router discriminates between models at all
    assert onnx["same_pick"] >= 0.99
    assert q8["same_pick"] >= 0.93, f"int8 routes {q8['same_pick']:.1%} of test queries as fp32 does"
    # ...and the decisions it changes are near-ties, so the routed quality does not drop
    assert q8["quality_diff"] >= -0.02, q8  # (12 changed picks of 200 here: +0.025 on this sample)
    assert q8["changed_median_margin"] < q8["median_margin"] / 3, q8


QUERIES = ["What is the capital of France?", "Solve 12 * 17 and explain each step.",
           "Write a haiku about autumn leaves falling on a quiet pond.", "def f(x): return x**2 -- what does f(3) return?",
           "Translate 'good morning' into German.", "Which planet is known as the red planet?",
           "Summarise the plot of Hamlet in two sentences.", "Is 97 a prime number?"] * 3


def test_onnx_encoders_match_torch_without_the_shared_data(onnx_export: Path) -> None:
    """The export, fusions and quantisation run in CI too (the LLMRouter check above needs shared data)."""
    fp32 = build_encoder("minilm+torch").encode(QUERIES)
    onnx32 = build_encoder("minilm+onnx", export_dir=onnx_export).encode(QUERIES, batch_size=8)
    int8 = build_encoder("minilm+onnx-int8", export_dir=onnx_export).encode(QUERIES, batch_size=8)
    assert onnx32.shape == int8.shape == fp32.shape == (len(QUERIES), 384)
    assert float((onnx32 * fp32).sum(1).min()) >= 0.999
    assert float((int8 * fp32).sum(1).mean()) >= 0.99
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)


def test_onnx_session_shares_torchs_threads_without_spinning_and_serves_concurrent_encodes(
        onnx_export: Path) -> None:
    """ORT takes torch's thread count and does not spin between runs (spinning threads held the cores the
    pooling's torch threads need); one session serves encodes from a thread pool (serving) unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    enc = build_encoder("minilm+onnx-int8", export_dir=onnx_export)
    alone = enc.encode(QUERIES, batch_size=4)
    options = enc._session.get_session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: enc.encode(QUERIES, batch_size=4), range(4)))
    assert all(np.allclose(r, alone, atol=1e-6) for r in results)


def test_routing_agreement_at_a_strong_call_budget() -> None:
    """Two models: the router sends `strong_share` of the test queries to the strong one (RouteLLM's call
    budget), and a small perturbation of the vectors flips only decisions near the threshold."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perf = np.stack([0.8 + 0.1 * x[:, 0], 0.5 + 0.4 * x[:, 1]], axis=1)  # the first model is stronger on average
    same = routing_agreement(x, x, perf, 400, strong_share=0.3)
    assert same["same_pick"] == 1.0 and same["distinct_picks"] == 2 and same["quality_diff"] == 0.0
    assert same["first_model_share"] == pytest.approx(0.3, abs=0.01)  # 30 % of the test queries go to model 0
    # ...the ones it predicts gain most from it: above a random 30 %, and a reversed threshold (negated
    # scores send model 0 the 30 % predicted to gain least) is below it
    random_30 = 0.3 * perf[400:, 0].mean() + 0.7 * perf[400:, 1].mean()
    reversed_30 = -routing_agreement(x, x, -perf, 400, strong_share=0.3)["reference_quality"]
    assert same["reference_quality"] > random_30 + 0.02 > reversed_30 + 0.04
    noisy = routing_agreement(x, x + rng.normal(scale=0.01, size=x.shape), perf, 400, strong_share=0.3)
    assert 0.8 < noisy["same_pick"] < 1.0
    assert noisy["changed_median_margin"] < noisy["median_margin"] / 3
    with pytest.raises(ValueError, match="strong_share needs 2 models"):
        routing_agreement(x, x, np.tile(perf, (1, 2)), 400, strong_share=0.5)


def test_the_default_encoder_is_onnx_fp32_with_torchs_vectors_name_and_picks() -> None:
    """`minilm` (no backend option) runs on ONNX Runtime fp32 on the CPU: the torch encoder's vectors
    within tolerance, its cache key and checkpoint name, and the same routing picks; `+torch` forces torch."""
    from fusion_lightning.data.embed_job import EncoderModule
    from fusion_lightning.data.encoders import SentenceTransformerEncoder
    from fusion_lightning.data.onnx_encoder import OnnxEncoder

    default, torch_enc = build_encoder("minilm"), build_encoder("minilm+torch")
    assert isinstance(default, OnnxEncoder) and default.auto and not default.quantize
    assert isinstance(torch_enc, SentenceTransformerEncoder)
    assert default.name == torch_enc.name == "all-MiniLM-L6-v2"
    assert parse_encoder_spec("minilm") == ("minilm", "auto", None)
    assert isinstance(build_encoder("minilm", device="cuda"), SentenceTransformerEncoder)  # a GPU: torch
    texts = [f"{q} (variant {i})" for i in range(12) for q in QUERIES]
    a, b = default.encode(texts, batch_size=16), torch_enc.encode(texts, batch_size=16)
    assert np.abs(a - b).max() < 1e-4
    rng = np.random.default_rng(0)
    perf = rng.random((len(texts), 4))
    assert routing_agreement(b, a, perf, len(texts) // 2)["same_pick"] == 1.0
    assert isinstance(EncoderModule("minilm").encoder, OnnxEncoder)  # the embed job on a CPU keeps ONNX


def test_length_batches_cap_rows_and_padded_tokens_longest_first() -> None:
    from fusion_lightning.data.onnx_encoder import length_batches

    lengths = [10, 256, 40, 40, 12, 300, 5]
    batches = length_batches(lengths, batch_size=3, max_tokens=256)
    assert [b.tolist() for b in batches] == [[5], [1], [2, 3, 4], [0, 6]]  # 256 // 40 = 6 rows, capped at 3
    for b in batches:  # the padded width is the batch's first (longest) row; one over-long row runs alone
        assert len(b) <= 3 and (len(b) == 1 or len(b) * lengths[b[0]] <= 256)
        assert lengths[b[0]] == max(lengths[i] for i in b)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches([], 8, 1024) == []


def test_onnx_vectors_do_not_depend_on_how_texts_are_batched(onnx_export: Path) -> None:
    """Long and short texts together: the token-budget batches give each text the vector it gets alone."""
    enc = build_encoder("minilm+onnx", export_dir=onnx_export)
    texts = [*QUERIES, " ".join(QUERIES) * 8, "hi"]
    together = enc.encode(texts, batch_size=64)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    tight = build_encoder("minilm+onnx", export_dir=onnx_export, max_batch_tokens=64).encode(texts)
    assert np.abs(together - alone).max() < 1e-5 and np.abs(tight - alone).max() < 1e-5
