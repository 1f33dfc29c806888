"""Building any encoder from its spec, and the on-disk embedding cache (the base encoders: data/encoders.py).

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
from typing import Any

import numpy as np

from fusion_lightning.data.encoders import (
    DEFAULT_MAX_SEQ_LENGTH,
    MINILM_ALIASES,
    Encoder,
    HashingEncoder,
    SentenceTransformerEncoder,
    encoder_dir_name,
    l2_normalise,
    onnxruntime_available,
    parse_encoder_spec,
)
from fusion_lightning.io import atomic_open

CONCAT = "&"


class ConcatEncoder:
    """Several encoders' vectors side by side (`minilm&hf:smollm2-135m@8`, or `encoder=[a,b]` in a config).

    Each part is a unit row, so the concatenation weighs every part equally; it is L2-normalised again
    (divided by sqrt(parts) where no part is a zero row) to stay a unit row like every encoder's. The
    embedding cache keeps each part under its own name (`EmbeddingCache` embeds part by part), so adding
    a part to a feature set re-embeds only that part, and a part's vectors serve every set it is in."""

    def __init__(self, parts: Sequence[Encoder]):
        if len(parts) < 2:
            raise ValueError("a concatenation needs at least two encoders")
        self.parts = list(parts)

    @property
    def name(self) -> str:
        return CONCAT.join(p.name for p in self.parts)

    @property
    def dim(self) -> int:
        return sum(int(p.dim) for p in self.parts)

    def join(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        return l2_normalise(np.concatenate([np.asarray(b, np.float32) for b in blocks], axis=1))

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        got: dict[str, np.ndarray] = {}
        for group in group_encoders(self.parts):  # one forward pass for the layers of one model
            got.update(zip([e.name for e in group], encode_together(group, texts, batch_size, show_progress),
                           strict=True))
        return self.join([got[p.name] for p in self.parts])


def group_encoders(encoders: Sequence[Encoder]) -> list[list[Encoder]]:
    """`encoders` (repeats of a name dropped) in groups one forward pass computes together: prefill
    encoders of one model at several layers or pools (equal `forward_key`s) form one group; any other
    encoder is a group of its own. Order kept (by each group's first member)."""
    group_of: dict[object, list[Encoder]] = {}
    groups: list[list[Encoder]] = []
    seen: set[str] = set()
    for enc in encoders:
        if enc.name in seen:
            continue
        seen.add(enc.name)
        key = getattr(enc, "forward_key", None)
        if key is not None and key in group_of:
            group_of[key].append(enc)
            continue
        groups.append([enc])
        if key is not None:
            group_of[key] = groups[-1]
    return groups


def encode_together(group: Sequence[Encoder], texts: Sequence[str], batch_size: int = 64,
                    show_progress: bool = False) -> list[np.ndarray]:
    """Each member's vectors of `texts` (a group of `group_encoders`: one forward pass for all)."""
    if len(group) == 1:
        return [group[0].encode(list(texts), batch_size=batch_size, show_progress=show_progress)]
    from fusion_lightning.data.prefill_encoder import encode_group

    return encode_group(group, list(texts), batch_size=batch_size)  # type: ignore[arg-type]


def encoder_spec(spec: str | Sequence[str]) -> str:
    """One encoder string from a config value: a list (`encoder=[minilm,hf:smollm2-135m@8]`) joins with '&'."""
    if isinstance(spec, str):
        return spec
    parts = [str(p) for p in spec]
    if not parts:
        raise ValueError("encoder: an empty list of encoders")
    return CONCAT.join(parts)


def build_encoder(name: str | Sequence[str] = "minilm", **kwargs: Any) -> Encoder:
    """Recipe-facing factory: "minilm", "hashing" (or "hashing-<dim>", so `build_encoder(enc.name)`
    round-trips), `hf:NAME[@LAYER][:POOL]` (a causal LM's pooled hidden states, see
    data/prefill_encoder.py), else any sentence-transformers path or hub name; `+onnx`, `+onnx-int8`,
    `+torch` and `+lenN` pick the backend and the max_seq_length (see parse_encoder_spec). `A&B` (or a
    list [A, B]) concatenates encoders' vectors (`ConcatEncoder`); keyword arguments go to every part.

    Without a backend option the packaged MiniLM runs on the fastest exact backend there is: ONNX
    Runtime fp32 on the CPU where onnxruntime is installed (1.25–1.6× torch, vectors equal within
    1e-6, the same routing picks), else torch; it keeps the torch encoder's name, so both share one cache
    entry and one checkpoint name. On a GPU the embed job runs it with torch (`EncoderModule`). Other models
    run on torch unless they name +onnx."""
    name = encoder_spec(name)
    if CONCAT in name:
        parts = [p.strip() for p in name.split(CONCAT)]
        if not all(parts):
            raise ValueError(f"encoder {name!r}: an empty part in a concatenation ('&' joins encoder names)")
        return ConcatEncoder([build_encoder(p, **kwargs) for p in parts])
    base, backend, length = parse_encoder_spec(name)
    if base.startswith("hf:"):
        from fusion_lightning.data.prefill_encoder import PrefillEncoder, parse_prefill_spec

        if backend not in ("auto", "torch"):
            raise ValueError(f"encoder {name!r}: hf: encoders run on torch (no +onnx)")
        model, layer, pool = parse_prefill_spec(base)
        return PrefillEncoder(model, layer, pool, max_seq_length=length or DEFAULT_MAX_SEQ_LENGTH, **kwargs)
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
        packaged = base.lower() in MINILM_ALIASES
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


class EmbeddingCache:
    """Disk cache keyed by encoder name + sha1 of the text: re-running a recipe does not re-embed.

    Layout: `root/<encoder>/shard-*.npz`, each with `keys` (S40 sha1 hex) and `vectors` (float32).
    Every call that encodes something writes one new shard atomically and never rewrites old ones,
    so concurrent writers (e.g. DDP ranks) cannot corrupt each other's work.
    """

    def __init__(self, root: str | Path, encoder: Encoder):
        self.encoder = encoder
        # a concatenation: one cache per part, under each part's own name
        self.parts = [EmbeddingCache(root, p) for p in encoder.parts] if isinstance(encoder, ConcatEncoder) else None
        self.dir = Path(root) / encoder_dir_name(encoder.name)
        self.stats: dict[str, int] = {"hits": 0, "misses": 0}
        self._rows: dict[bytes, int] = {}
        self._blocks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        self._loaded: set[str] = set()

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz")) if self.dir.is_dir() else []

    def cached_keys(self) -> set[bytes]:
        """The keys of every text in the cache, read without the vectors (planning a large job); of a
        concatenation, the texts every part has cached."""
        if self.parts is not None:
            return set.intersection(*(p.cached_keys() for p in self.parts))
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

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors computed elsewhere (one new shard); texts already cached keep their vectors."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(texts), self.encoder.dim):
            raise ValueError(f"encoder {self.encoder.name!r}: {vectors.shape} vectors for {len(texts)} texts")
        keys = np.array([text_key(t) for t in texts], dtype="S40")
        self._write_shard(keys, vectors)
        self._add(keys, vectors)

    def embed(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
        """Vectors in input order; only distinct texts not cached yet are encoded.

        `stats` counts distinct texts: hits were cached, misses were encoded by this call (of a
        concatenation: the most any one part encoded).
        """
        if self.parts is not None:
            assert isinstance(self.encoder, ConcatEncoder)
            by_name = {c.encoder.name: c for c in self.parts}
            for group in group_encoders([c.encoder for c in self.parts]):
                if len(group) == 1:
                    continue
                # a group (layers of one model): texts any member lacks, encoded in one pass for all
                caches = [by_name[e.name] for e in group]
                for c in caches:
                    c._refresh()
                todo = list(dict.fromkeys(t for t in texts if any(text_key(t) not in c._rows for c in caches)))
                if todo:
                    for c, v in zip(caches, encode_together(group, todo, batch_size), strict=True):
                        c.put(todo, v)
            blocks = [p.embed(texts, batch_size=batch_size, show_progress=show_progress) for p in self.parts]
            distinct = len(set(texts))
            missed = max(p.stats["misses"] for p in self.parts)
            self.stats = {"hits": distinct - missed, "misses": missed}
            return self.encoder.join(blocks)
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
