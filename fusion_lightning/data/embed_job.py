"""Embedding as a Lightning `predict` job: sharded, content-addressed, resumable, on 1 CPU or N GPUs/nodes.

One plan, made once by global rank 0 and broadcast: the unique texts not in the embedding cache yet
(dedup before sharding, cached texts skipped), sorted by length (batches pad little), cut into shards
of `shard_size`. Shard i goes to rank i % world_size. The ShardWriter writes each finished shard to
the cache folder in the cache's own format (`root/<encoder>/shard-<sha1 of its keys>.npz`, keys +
vectors), so `EmbeddingCache` — and so every DataModule — reads the job's output and re-embeds
nothing. A killed job re-plans from the cache: finished shards' texts are cached and never re-sent
to the encoder; a shard whose file appears meanwhile (a concurrent job) is skipped whole.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from fusion_lightning.data.datamodule import LogDataModule
from fusion_lightning.data.embeddings import EmbeddingCache, build_encoder, text_key
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.io import atomic_open, file_lock

CPU_BATCH_SIZE = 8


def auto_batch_size(device: torch.device, max_seq_length: int | None = None) -> int:
    """The batch size rule for `batch_size: auto`: 8 on a CPU, where a batch's activations should stay in
    cache (MiniLM on the LLMRouter queries, 2 cores: 1.45x the texts/s of batch 64 with torch, 1.16x
    with ONNX int8; batch 4 is slower again); on a GPU 128 per 10 GiB of its memory, within [128, 2048],
    scaled by 256 / max_seq_length."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    size = 128 * max(1, int(gib // 10)) * 256 // max(1, max_seq_length or 256)
    return int(min(2048, max(128, size)))


def shard_name(keys: Sequence[bytes]) -> str:
    """Content address of a shard: the same texts (in the same order) always get the same file name."""
    return f"shard-{hashlib.sha1(b''.join(keys)).hexdigest()[:24]}.npz"


def plan_shards(texts: Sequence[str], cached: set[bytes], shard_size: int) -> tuple[list[str], list[np.ndarray]]:
    """(unique texts, shards as index arrays into them) covering every unique uncached text once.

    Sorted by (length, key): deterministic for a given text set and cache, and each shard (and batch)
    holds texts of similar length."""
    if shard_size <= 0:
        raise ValueError(f"embed shard_size must be positive, got {shard_size}")
    uniq = list(dict.fromkeys(texts))
    keys = [text_key(t) for t in uniq]
    todo = sorted((i for i, k in enumerate(keys) if k not in cached), key=lambda i: (len(uniq[i]), keys[i]))
    arr = np.asarray(todo, dtype=np.int64)
    return uniq, [arr[s:s + shard_size] for s in range(0, len(arr), shard_size)]


class ShardBatches(IterableDataset):
    """This rank's batches, shard by shard: dicts of shard name, texts, keys and whether it ends the shard.

    Iterable, so Lightning injects no DistributedSampler (that one pads ranks with repeated items)."""

    def __init__(self, uniq: list[str], shards: list[np.ndarray], rank: int, world: int, batch_size: int,
                 out_dir: Path):
        self.uniq, self.batch_size, self.out_dir = uniq, batch_size, out_dir
        self.mine = [s for i, s in enumerate(shards) if i % world == rank]
        self.texts = sum(len(s) for s in self.mine)
        # fewer shards than ranks: Lightning refuses a rank whose loader has length 0 while others have
        # batches, so such a rank reports one batch and yields none (its predict loop simply ends)
        self.min_len = 1 if world > 1 and len(shards) > 0 else 0

    def __len__(self) -> int:
        return max(self.min_len, sum(math.ceil(len(s) / self.batch_size) for s in self.mine))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.mine:
            texts = [self.uniq[i] for i in shard]
            keys = [text_key(t) for t in texts]
            name = shard_name(keys)
            if (self.out_dir / name).is_file():  # written meanwhile by a concurrent job
                continue
            for s in range(0, len(texts), self.batch_size):
                yield {"shard": name, "texts": texts[s:s + self.batch_size], "keys": keys[s:s + self.batch_size],
                       "last": s + self.batch_size >= len(texts)}


def read_texts(path: str | Path) -> list[str]:
    """`datamodule.texts_file`: any texts to embed, one per line (.txt) or JSONL rows with a "query" field."""
    import json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"datamodule.texts_file: {p} not found")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(row["query"] if isinstance(row["query"], str) else str(row["query"]))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{p}: row {i}: field 'query': {type(e).__name__}: {e}") from None
    return out


def _as_is(batch: Any) -> Any:
    return batch


class EmbedDataModule(LogDataModule):
    """The texts to embed (the log's queries, as the DataModules read them, or `texts`) as a predict loader."""

    def __init__(self, data: dict | None = None, encoder: str = "minilm", embedding_cache: str | None = None,
                 batch_size: int | str = "auto", shard_size: int = 1024, texts: Sequence[str] | None = None,
                 texts_file: str | None = None, logs: LogTable | None = None):
        super().__init__(data, logs)
        if not embedding_cache:
            raise ValueError("the embed job needs an output folder: out=DIR (datamodule.embedding_cache)")
        if batch_size != "auto" and int(batch_size) <= 0:
            raise ValueError(f"embed batch_size must be 'auto' or positive, got {batch_size}")
        self.encoder_name, self.cache_dir = encoder, embedding_cache
        self.batch_size, self.shard_size = batch_size, int(shard_size)
        self._texts = list(texts) if texts is not None else read_texts(texts_file) if texts_file else None
        self.dataset: ShardBatches | None = None
        self.report: dict[str, Any] = {}

    def texts(self) -> list[str]:
        if self._texts is None:
            from fusion_lightning.data.arrow import as_objects

            self._texts = as_objects(self.logs.query_table()["query"]).tolist()
        return self._texts

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" or self.dataset is not None:
            return
        encoder = build_encoder(self.encoder_name)
        cache = EmbeddingCache(self.cache_dir, encoder)
        texts, trainer = self.texts(), self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shards: list[np.ndarray] | None = None
        if rank == 0:
            uniq, shards = plan_shards(texts, cache.cached_keys(), self.shard_size)
        else:
            uniq = list(dict.fromkeys(texts))
        if trainer is not None and world > 1:  # every rank must use rank 0's plan (the cache grows meanwhile)
            shards = trainer.strategy.broadcast(shards, src=0)
        assert shards is not None
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        max_len = getattr(encoder, "max_seq_length", None)
        bs = auto_batch_size(device, max_len) if self.batch_size == "auto" else int(self.batch_size)
        self.dataset = ShardBatches(uniq, shards, rank, world, bs, cache.dir)
        planned = sum(len(s) for s in shards)
        self.report = {"encoder": encoder.name, "dir": str(cache.dir), "texts": len(texts), "unique": len(uniq),
                       "cached": len(uniq) - planned, "planned": planned, "shards": len(shards),
                       "batch_size": bs, "world_size": world}

    def predict_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("predict")
        return DataLoader(self.dataset, batch_size=None, collate_fn=_as_is, num_workers=0)

    def summary(self) -> dict[str, int]:
        if self._texts is not None and self._logs is None:
            return {"queries": len(self._texts)}
        return super().summary()

    def write_artifacts(self, run_dir: Path) -> dict[str, str]:
        return {} if self._logs is None else super().write_artifacts(run_dir)


class EncoderModule(L.LightningModule):
    """Wraps an encoder (`build_encoder` spec) for `trainer.predict`; a sentence-transformers model is
    registered as a submodule so Lightning puts it on the run's device (and precision)."""

    stage = "predict"  # fit runs trainer.predict for this module (no training, no test)

    def __init__(self, encoder: str = "minilm"):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = build_encoder(encoder)
        self.calls = 0  # encode calls; tests count them

    def setup(self, stage: str) -> None:
        if getattr(self.encoder, "auto", False) and self.trainer.strategy.root_device.type != "cpu":
            self.encoder = self.encoder.torch_encoder  # ONNX Runtime is the CPU default; a GPU runs torch
        load = getattr(self.encoder, "_load", None)
        model = load() if load is not None and hasattr(self.encoder, "path") else None
        if isinstance(model, torch.nn.Module):
            self.st = model  # submodule: moved to the device before predict starts

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> Any:
        """As is: a batch holds texts and keys, no tensors (the encoder puts its tokens on the device).
        Lightning's default walks every string of it: 3 % of an int8 job's time on CPU."""
        return batch

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.calls += 1
        vectors = np.asarray(self.encoder.encode(batch["texts"], batch_size=len(batch["texts"])), np.float32)
        if vectors.shape != (len(batch["texts"]), self.encoder.dim):
            raise ValueError(f"encoder {self.encoder.name!r} returned shape {vectors.shape} for "
                             f"{len(batch['texts'])} texts")
        return {"vectors": vectors}


class ShardWriter(BasePredictionWriter):
    """Collects each shard's batches and writes the shard atomically once its last batch is embedded."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.pending: dict[str, tuple[list[bytes], list[np.ndarray]]] = {}
        self.written: list[Path] = []
        self.texts_written = 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        keys, blocks = self.pending.setdefault(batch["shard"], ([], []))
        keys.extend(batch["keys"])
        blocks.append(prediction["vectors"])
        if batch["last"]:
            keys, blocks = self.pending.pop(batch["shard"])
            out = Path(trainer.datamodule.dataset.out_dir) / batch["shard"]
            with atomic_open(out) as f:
                np.savez(f, keys=np.asarray(keys, dtype="S40"), vectors=np.concatenate(blocks))
            self.written.append(out)
            self.texts_written += len(keys)


def run_predict(trainer: L.Trainer, module: EncoderModule, dm: EmbedDataModule) -> dict[str, Any]:
    """`trainer.predict` without keeping predictions; the plan's report plus what all ranks wrote."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning looks for sample indices to hand the writer; the shard loader is an IterableDataset
        # without them, and the writer reads each batch's shard and text keys from the batch itself
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(module, datamodule=dm, return_predictions=False)
    writer = next((c for c in trainer.callbacks if isinstance(c, ShardWriter)), None)
    if writer is None:
        raise ValueError("the embed job needs the ShardWriter callback (callbacks.shard_writer)")
    done = torch.tensor([writer.texts_written, len(writer.written)], dtype=torch.float64)
    if trainer.world_size > 1:
        done = trainer.strategy.reduce(done.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    seconds = time.perf_counter() - t0  # after the reduce: until the slowest rank is done
    report = dict(dm.report)
    report.update(embedded=int(done[0]), shards_written=int(done[1]), seconds=round(seconds, 2),
                  texts_per_s=round(float(done[0]) / seconds, 1) if seconds > 0 else None)
    return report


def prepare_embeddings(texts: Sequence[str], encoder: str, cache_dir: str | Path,
                       progress_interval: float = 30.0) -> dict[str, Any] | None:
    """The DataModules' prepare_data step: the embed job on this process's one device for the texts not
    cached yet (None when every text is cached). A file lock makes concurrent callers wait for the first."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from fusion_lightning.data.embed_progress import EmbedProgress

    with file_lock(Path(cache_dir) / ".prepare.lock"):
        enc = build_encoder(encoder)
        cached = EmbeddingCache(cache_dir, enc).cached_keys()
        if all(text_key(t) in cached for t in texts):
            return None
        # a plain single-device trainer, whatever cluster this process runs in: the fit's own trainer
        # (and its process group, if any) is not touched, nor is its rank (restored below)
        # this predict must not move the fit's random streams (its loader draws a seed from torch's RNG):
        # a run that embeds and one that finds the cache full train the same (resume is checked against both)
        rank, py_state, np_state = rank_zero_only.rank, random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
                trainer = L.Trainer(accelerator="auto", devices=1, num_nodes=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, plugins=[LightningEnvironment()],
                                    callbacks=[ShardWriter(), EmbedProgress(interval=progress_interval)])
                return run_predict(trainer, EncoderModule(encoder), EmbedDataModule(encoder=encoder,
                                   embedding_cache=str(cache_dir), texts=texts))
        finally:
            rank_zero_only.rank = rank
            random.setstate(py_state)
            np.random.set_state(np_state)
