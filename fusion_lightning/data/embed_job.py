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
from fusion_lightning.data.embeddings import (
    ConcatEncoder,
    EmbeddingCache,
    build_encoder,
    encode_together,
    encoder_spec,
    group_encoders,
    text_key,
)
from fusion_lightning.data.encoders import Encoder
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


def job_parts(encoder: Encoder) -> list[list[Encoder]]:
    """The encoders a job runs, in groups (`group_encoders`): a concatenation's parts each write their own
    cache folder, and prefill encoders of one model (several layers or pools) share one forward pass."""
    return group_encoders(encoder.parts if isinstance(encoder, ConcatEncoder) else [encoder])


def encode_part(group: Sequence[Encoder], texts: Sequence[str]) -> list[np.ndarray]:
    """Each member's float32 vectors of `texts`, one batch (a shared forward pass for a prefill group)."""
    blocks = encode_together(group, texts, batch_size=len(texts))
    out = []
    for enc, v in zip(group, blocks, strict=True):
        v = np.asarray(v, np.float32)
        if v.shape != (len(texts), enc.dim):
            raise ValueError(f"encoder {enc.name!r} returned shape {v.shape} for {len(texts)} texts")
        out.append(v)
    return out


class ShardBatches(IterableDataset):
    """This rank's batches, shard by shard: dicts of the part (group of encoders, see `job_parts`) it is
    for, shard name, texts, keys and whether it ends the shard.

    Iterable, so Lightning injects no DistributedSampler (that one pads ranks with repeated items)."""

    def __init__(self, uniq: list[str], shards: list[tuple[int, np.ndarray]], rank: int, world: int,
                 batch_size: int, out_dirs: list[list[Path]]):
        self.uniq, self.batch_size, self.out_dirs = uniq, batch_size, out_dirs
        self.mine = [s for i, s in enumerate(shards) if i % world == rank]
        self.texts = sum(len(s) for _, s in self.mine)
        # fewer shards than ranks: Lightning refuses a rank whose loader has length 0 while others have
        # batches, so such a rank reports one batch and yields none (its predict loop simply ends)
        self.min_len = 1 if world > 1 and len(shards) > 0 else 0

    def __len__(self) -> int:
        return max(self.min_len, sum(math.ceil(len(s) / self.batch_size) for _, s in self.mine))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for part, shard in self.mine:
            texts = [self.uniq[i] for i in shard]
            keys = [text_key(t) for t in texts]
            name = shard_name(keys)
            if all((d / name).is_file() for d in self.out_dirs[part]):  # written meanwhile by a concurrent job
                continue
            for s in range(0, len(texts), self.batch_size):
                yield {"part": part, "shard": name, "texts": texts[s:s + self.batch_size],
                       "keys": keys[s:s + self.batch_size], "last": s + self.batch_size >= len(texts)}


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
    """The texts to embed (the log's queries, as the DataModules read them, or `texts`) as a predict loader.

    `split`: only the queries of this split of the log (the layer probe reads train only); `max_texts`: at
    most this many of them, a seeded sample (`seed`), in the log's order."""

    def __init__(self, data: dict | None = None, encoder: str | Sequence[str] = "minilm",
                 embedding_cache: str | None = None, batch_size: int | str = "auto", shard_size: int = 1024,
                 texts: Sequence[str] | None = None, texts_file: str | None = None, logs: LogTable | None = None,
                 split: str | None = None, max_texts: int | None = None, seed: int = 0):
        super().__init__(data, logs)
        if not embedding_cache:
            raise ValueError("the embed job needs an output folder: out=DIR (datamodule.embedding_cache)")
        if batch_size != "auto" and int(batch_size) <= 0:
            raise ValueError(f"embed batch_size must be 'auto' or positive, got {batch_size}")
        if max_texts is not None and int(max_texts) <= 0:
            raise ValueError(f"embed max_texts must be positive or null, got {max_texts}")
        self.encoder_name, self.cache_dir = encoder_spec(encoder), embedding_cache
        self.batch_size, self.shard_size = batch_size, int(shard_size)
        self.split, self.max_texts, self.seed = split, None if max_texts is None else int(max_texts), int(seed)
        self._texts = list(texts) if texts is not None else read_texts(texts_file) if texts_file else None
        self.dataset: ShardBatches | None = None
        self.report: dict[str, Any] = {}

    def texts(self) -> list[str]:
        if self._texts is None:
            from fusion_lightning.data.arrow import as_objects

            if self.split is None:
                self._texts = as_objects(self.logs.query_table()["query"]).tolist()
            else:
                qm = self.logs.matrix()
                self._texts = [q for q, s in zip(qm.queries, qm.splits, strict=True) if s == self.split]
                if not self._texts:
                    raise ValueError(f"the log's {self.split} split has no queries to embed")
            if self.max_texts is not None and len(self._texts) > self.max_texts:
                keep = np.sort(np.random.default_rng(self.seed).choice(len(self._texts), self.max_texts, replace=False))
                self._texts = [self._texts[i] for i in keep]
        return self._texts

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" or self.dataset is not None:
            return
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        # the plan must be for what the module encodes (the layer probe's module runs every candidate layer)
        encoder = module.encoder if isinstance(module, EncoderModule) else build_encoder(self.encoder_name)
        groups = job_parts(encoder)
        caches = [[EmbeddingCache(self.cache_dir, e) for e in g] for g in groups]
        texts = self.texts()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shards: list[tuple[int, np.ndarray]] | None = None
        uniq = list(dict.fromkeys(texts))
        if rank == 0:  # per group: the texts any of its members lacks (a group's members share a forward pass)
            shards = []
            for g, cs in enumerate(caches):
                cached = set.intersection(*(c.cached_keys() for c in cs))
                shards += [(g, s) for s in plan_shards(uniq, cached, self.shard_size)[1]]
        if trainer is not None and world > 1:  # every rank must use rank 0's plan (the cache grows meanwhile)
            shards = trainer.strategy.broadcast(shards, src=0)
        assert shards is not None
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        max_len = max((getattr(e, "max_seq_length", None) or 0 for g in groups for e in g), default=0) or None
        bs = auto_batch_size(device, max_len) if self.batch_size == "auto" else int(self.batch_size)
        self.dataset = ShardBatches(uniq, shards, rank, world, bs, [[c.dir for c in cs] for cs in caches])
        planned = sum(len(s) for _, s in shards)
        dirs = [str(c.dir) for cs in caches for c in cs]
        # with several parts, texts are counted once per part (group of encoders sharing a forward pass)
        self.report = {"encoder": encoder.name, "dir": dirs[0] if len(dirs) == 1 else str(self.cache_dir),
                       "texts": len(texts), "unique": len(uniq), "cached": len(uniq) * len(groups) - planned,
                       "planned": planned, "shards": len(shards), "batch_size": bs, "world_size": world}
        if len(dirs) > 1:
            self.report.update(parts=len(groups), dirs=dirs)

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
    """Wraps an encoder (`build_encoder` spec, a concatenation included) for `trainer.predict`; each torch
    model (sentence-transformers, a prefill encoder's causal LM) is registered as a submodule so Lightning
    puts it on the run's device (and precision). On a GPU a prefill encoder's weights load in bf16 unless
    its `dtype` says otherwise."""

    stage = "predict"  # fit runs trainer.predict for this module (no training, no test)

    def __init__(self, encoder: str | Sequence[str] = "minilm"):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = build_encoder(encoder)
        self.groups = job_parts(self.encoder)  # what each batch's "part" indexes
        for group in self.groups:  # resolve (fetch) models now: each DDP rank builds this before the process group
            for e in group:
                if hasattr(e, "forward_key"):
                    _ = e.config
        self.calls = 0  # encode calls; tests count them

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        models = []
        for g, group in enumerate(self.groups):
            if device.type != "cpu":  # ONNX Runtime is the CPU default; a GPU runs torch
                group = self.groups[g] = [e.torch_encoder if getattr(e, "auto", False) else e for e in group]
                for e in group:
                    if hasattr(e, "forward_key") and getattr(e, "dtype", "") is None and device.type == "cuda":
                        e.dtype = "bfloat16"
            first = group[0]
            load = getattr(first, "_load", None)
            if load is None or not hasattr(first, "path"):
                continue
            model = load(max(e.layer for e in group)) if hasattr(first, "forward_key") else load()
            if isinstance(model, torch.nn.Module):
                models.append(model)
        if isinstance(self.encoder, ConcatEncoder):
            self.encoder.parts = [e for g in self.groups for e in g]
        elif self.groups[0][0] is not self.encoder:
            self.encoder = self.groups[0][0]
        if models:
            self.st = torch.nn.ModuleList(models)  # submodules: moved to the device before predict starts

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> Any:
        """As is: a batch holds texts and keys, no tensors (the encoder puts its tokens on the device).
        Lightning's default walks every string of it: 3 % of an int8 job's time on CPU."""
        return batch

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """{"vectors": one [B, dim] block per member of the batch's part}."""
        self.calls += 1
        return {"vectors": encode_part(self.groups[batch.get("part", 0)], batch["texts"])}


class ShardWriter(BasePredictionWriter):
    """Collects each shard's batches and writes the shard atomically once its last batch is embedded: into
    the cache folder of every member of the shard's part (one file each, under the same content address)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.pending: dict[tuple[int, str], tuple[list[bytes], list[list[np.ndarray]]]] = {}
        self.written: list[Path] = []  # files (one per member of a shard's part)
        self.shards_done = 0
        self.texts_written = 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        part = batch.get("part", 0)
        folders = trainer.datamodule.dataset.out_dirs[part]
        if len(prediction["vectors"]) != len(folders):
            raise ValueError(f"the embed job's plan has {len(folders)} cache folder(s) for part {part} and the module "
                             f"encoded {len(prediction['vectors'])} block(s): the DataModule and module disagree")
        keys, blocks = self.pending.setdefault((part, batch["shard"]), ([], []))
        keys.extend(batch["keys"])
        blocks.append(prediction["vectors"])
        if batch["last"]:
            keys, blocks = self.pending.pop((part, batch["shard"]))
            for j, folder in enumerate(folders):
                out = Path(folder) / batch["shard"]
                with atomic_open(out) as f:
                    np.savez(f, keys=np.asarray(keys, dtype="S40"), vectors=np.concatenate([b[j] for b in blocks]))
                self.written.append(out)
            self.shards_done += 1
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
    done = torch.tensor([writer.texts_written, writer.shards_done], dtype=torch.float64)
    if trainer.world_size > 1:
        done = trainer.strategy.reduce(done.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    seconds = time.perf_counter() - t0  # after the reduce: until the slowest rank is done
    report = dict(dm.report)
    report.update(embedded=int(done[0]), shards_written=int(done[1]), seconds=round(seconds, 2),
                  texts_per_s=round(float(done[0]) / seconds, 1) if seconds > 0 else None)
    after = getattr(module, "after_predict", None)  # e.g. the layer probe's analysis of what was embedded
    if after is not None and trainer.is_global_zero:
        after(dm)
    return report


def prepare_embeddings(texts: Sequence[str], encoder: str | Sequence[str], cache_dir: str | Path,
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
