"""Encoders give normalised, meaningful vectors; the disk cache never re-embeds and never mixes encoders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fusion_lightning.data.embeddings import EmbeddingCache, build_encoder, embed_texts
from fusion_lightning.data.encoders import Encoder, HashingEncoder, SentenceTransformerEncoder

TEXTS = [
    "What is the capital of France?",
    "Solve 12 * 7 and explain the steps.",
    "Write a Python function that reverses a string.",
    "Who wrote Pride and Prejudice?",
]


class CountingEncoder:
    """Wraps an encoder and records every batch it is asked to encode."""

    def __init__(self, inner: Encoder, name: str | None = None):
        self.inner, self.dim = inner, inner.dim
        self.name = name or inner.name
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size=batch_size, show_progress=show_progress)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder()


@pytest.fixture
def counting() -> CountingEncoder:
    return CountingEncoder(HashingEncoder(dim=64))


def test_minilm_gives_384d_unit_vectors_where_paraphrases_are_closer(minilm):
    assert minilm.name == "all-MiniLM-L6-v2" and minilm.dim == 384
    v = minilm.encode(
        [
            "How do I bake bread at home?",
            "What is a simple recipe for homemade bread?",
            "The stock market fell 3% today.",
        ]
    )
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.3


def test_minilm_tokenizer_and_empty_input(minilm):
    assert minilm.tokenizer("hello world")["input_ids"][0] == minilm.tokenizer.cls_token_id
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_through_cache_matches_direct_encoding(minilm, tmp_path):
    cached = EmbeddingCache(tmp_path, minilm).embed(TEXTS[:2], show_progress=False)
    np.testing.assert_allclose(cached, minilm.encode(TEXTS[:2]), atol=1e-6)
    assert (tmp_path / "all-MiniLM-L6-v2").is_dir()


def test_build_encoder_names():
    assert build_encoder("minilm").name == "all-MiniLM-L6-v2"
    assert build_encoder("sentence-transformers/all-MiniLM-L6-v2").name == "all-MiniLM-L6-v2"
    h = build_encoder("hashing", dim=32)
    assert isinstance(h, HashingEncoder) and h.name == "hashing-32"
    assert build_encoder(h.name).dim == 32  # names round-trip
    other = build_encoder("/models/my-encoder/")
    assert isinstance(other, SentenceTransformerEncoder) and other.name == "my-encoder"


def test_hashing_is_deterministic_normalised_and_lexical():
    a, b = HashingEncoder(256), HashingEncoder(256)
    va, vb = a.encode(TEXTS), b.encode(TEXTS)
    np.testing.assert_array_equal(va, vb)
    assert va.shape == (4, 256) and va.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-6)
    q, near, far = a.encode(
        ["the cat sat on the mat", "a cat sat on a mat", "quarterly revenue grew strongly"]
    )
    assert cos(q, near) > cos(q, far) + 0.3
    assert not np.allclose(HashingEncoder(256, seed=1).encode(TEXTS), va)


def test_hashing_empty_text_is_a_zero_row_not_nan():
    v = HashingEncoder(16).encode(["", "word"])
    assert np.all(v[0] == 0) and np.isfinite(v).all()


def test_second_call_is_all_hits_and_identical(tmp_path, counting):
    cache = EmbeddingCache(tmp_path, counting)
    first = cache.embed(TEXTS)
    assert cache.stats == {"hits": 0, "misses": 4}
    again = EmbeddingCache(tmp_path, counting)  # fresh process view: reads shards from disk
    second = again.embed(TEXTS)
    assert again.stats == {"hits": 4, "misses": 0}
    assert len(counting.calls) == 1
    np.testing.assert_array_equal(first, second)


def test_new_texts_add_one_shard_and_only_they_are_encoded(tmp_path, counting):
    cache = EmbeddingCache(tmp_path, counting)
    cache.embed(TEXTS[:2])
    assert len(cache.shards()) == 1
    out = cache.embed(TEXTS)
    assert counting.calls[-1] == TEXTS[2:]
    assert cache.stats == {"hits": 2, "misses": 2}
    assert len(cache.shards()) == 2
    np.testing.assert_array_equal(out, counting.inner.encode(TEXTS))


def test_duplicates_encoded_once_and_input_order_kept(tmp_path, counting):
    texts = [TEXTS[1], TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[0]]
    out = EmbeddingCache(tmp_path, counting).embed(texts)
    assert counting.calls == [[TEXTS[1], TEXTS[0], TEXTS[2]]]
    np.testing.assert_array_equal(out, counting.inner.encode(texts))


def test_corrupt_shard_is_a_value_error_naming_the_file(tmp_path, counting):
    EmbeddingCache(tmp_path, counting).embed(TEXTS)
    (shard,) = EmbeddingCache(tmp_path, counting).shards()
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{shard.name}.*delete"):
        EmbeddingCache(tmp_path, counting).embed(TEXTS)


def test_wrong_dim_shard_is_an_error_naming_the_file(tmp_path):
    EmbeddingCache(tmp_path, CountingEncoder(HashingEncoder(dim=8), name="enc")).embed(TEXTS)
    with pytest.raises(ValueError, match=r"shard-.*\.npz.*dim 16"):
        EmbeddingCache(tmp_path, CountingEncoder(HashingEncoder(dim=16), name="enc")).embed(TEXTS)


def test_encoders_never_read_each_others_shards(tmp_path):
    first = CountingEncoder(HashingEncoder(dim=32, seed=0), name="enc-a")
    EmbeddingCache(tmp_path, first).embed(TEXTS)
    for name in ("enc-b", "enc/a", "enc_a"):
        other = CountingEncoder(HashingEncoder(dim=32, seed=1), name=name)
        cache = EmbeddingCache(tmp_path, other)
        out = cache.embed(TEXTS)
        assert cache.stats["hits"] == 0 and len(other.calls) == 1
        np.testing.assert_array_equal(out, other.inner.encode(TEXTS))
    assert len({p.name for p in tmp_path.iterdir()}) == 4


def test_embed_texts_with_and_without_cache(tmp_path, counting):
    direct = embed_texts(TEXTS, counting, cache_dir=None)
    cached = embed_texts(TEXTS, counting, cache_dir=tmp_path)
    np.testing.assert_array_equal(direct, cached)
    assert embed_texts([], counting, cache_dir=tmp_path).shape == (0, 64)
