"""The embed job (recipe=embed): shards cover every text once (one process or two DDP ranks alike), a killed
job resumes without re-encoding finished shards, the DataModules read its output, progress shows in a log."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.embed_job import CPU_BATCH_SIZE, auto_batch_size, plan_shards, shard_name
from fusion_lightning.data.embed_progress import EmbedProgress, progress_line
from fusion_lightning.data.embeddings import EmbeddingCache, text_key
from fusion_lightning.data.encoders import HashingEncoder
from fusion_lightning.fit import build, fit, run
from fusion_lightning.query.datamodule import UNKNOWN_TASK

N = 300  # synthetic queries: a few shards of 64
PROGRESS = re.compile(r"\[embed\] (rank \d: )?[\d,]+/[\d,]+ texts \(\d+\.\d%\), \d+\.\d texts/s, ETA \S+")


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["debug=fast", f"data.synthetic.n_queries={N}", "datamodule.shard_size=64", "datamodule.batch_size=32",
            f"out={tmp_path / name}", f"run_dir={tmp_path / (name + '_run')}", *extra]


def _shards(root: Path) -> dict[str, dict[bytes, np.ndarray]]:
    """shard file name -> {key: vector} under root/<encoder>/."""
    out = {}
    for p in sorted(root.glob("*/shard-*.npz")):
        with np.load(p) as z:
            out[p.name] = dict(zip(z["keys"].tolist(), z["vectors"], strict=True))
    return out


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the hashing encoder is asked to encode, in this process."""
    seen: list[str] = []
    inner = HashingEncoder.encode

    def encode(self, texts, batch_size=64, show_progress=False):  # noqa: ANN001
        seen.extend(texts)
        return inner(self, texts, batch_size=batch_size, show_progress=show_progress)

    monkeypatch.setattr(HashingEncoder, "encode", encode)
    return seen


def test_auto_batch_size_small_on_cpu_and_by_memory_and_length_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_batch_size(torch.device("cpu")) == CPU_BATCH_SIZE == 8  # bench/embed.py: faster than 32 or 64
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert auto_batch_size(gpu, 256) == 1024  # 128 per 10 GiB
    assert auto_batch_size(gpu, 512) == 512 and auto_batch_size(gpu, 64) == 2048  # by length, capped
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=8 * 2**30))
    assert auto_batch_size(gpu, 512) == 128  # at least 128


def test_plan_dedups_skips_cached_and_covers_every_text_once() -> None:
    texts = [f"query {i % 90} " + "x" * (i % 7) for i in range(200)]
    uniq, shards = plan_shards(texts, set(), shard_size=16)
    assert len(uniq) == len(set(texts))
    flat = np.concatenate(shards)
    assert sorted(flat.tolist()) == list(range(len(uniq)))  # every unique text exactly once
    lengths = [len(uniq[i]) for i in flat]
    assert lengths == sorted(lengths)  # sorted by length: batches pad little
    cached = {text_key(uniq[i]) for i in shards[0]}
    _, rest = plan_shards(texts, cached, shard_size=16)
    assert sum(len(s) for s in rest) == len(uniq) - len(shards[0])
    assert plan_shards(list(reversed(texts)), set(), 16)[1][0].shape == shards[0].shape
    names = {shard_name([text_key(uniq[i]) for i in s]) for s in shards}
    assert len(names) == len(shards)


def test_single_process_job_writes_cache_shards_the_datamodule_reads_without_encoding(
        tmp_path: Path, counted: list[str]) -> None:
    summary = fit(compose_recipe("embed", _args(tmp_path, "single")))
    e = summary["embed"]
    assert e["unique"] == e["planned"] == e["embedded"] == N and e["shards"] == e["shards_written"] == 5
    assert len(counted) == N and len(set(counted)) == N
    shards = _shards(tmp_path / "single")
    assert sum(len(s) for s in shards.values()) == N
    counted.clear()
    again = fit(compose_recipe("embed", _args(tmp_path, "single")))  # all cached: nothing to do
    assert again["embed"]["planned"] == 0 and counted == []
    r = build(compose_recipe("router_mlp", ["debug=fast", f"data.synthetic.n_queries={N}",
                                            f"datamodule.embedding_cache={tmp_path / 'single'}",
                                            f"run_dir={tmp_path / 'fit_run'}"]))
    assert r.datamodule.splits["train"].tensors["x"].shape[1] == 256
    # prepare_data found every query in the job's shards; its own job embedded only the model and task
    # descriptions the graph router reads, so reading them later encodes nothing
    dm = r.datamodule
    descriptions = set(dm.description_texts(dm.logs.models, [UNKNOWN_TASK, *dm.logs.tasks]))
    assert set(counted) == descriptions and len(counted) == len(descriptions)
    counted.clear()
    dm.description_embeddings()
    assert counted == []


def test_killed_job_resumes_without_recomputing_finished_shards(tmp_path: Path, counted: list[str]) -> None:
    class Kill(L.Callback):  # after the writer: the job dies once two shards are on disk
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001
            if batch["last"] and len(list((tmp_path / "killed").glob("*/shard-*.npz"))) == 2:
                raise RuntimeError("killed")

    r = build(compose_recipe("embed", _args(tmp_path, "killed")))
    r.trainer.callbacks.append(Kill())
    with pytest.raises(RuntimeError, match="killed"):
        run(r)
    assert len(counted) == 2 * 64  # exactly the two finished shards were encoded
    first = list(counted)
    counted.clear()
    resumed = fit(compose_recipe("embed", _args(tmp_path, "killed")))["embed"]
    assert resumed["cached"] == 128 and resumed["embedded"] == N - 128
    assert len(counted) == N - 128 and not set(counted) & set(first)  # no text encoded twice
    ref = fit(compose_recipe("embed", _args(tmp_path, "clean")))["embed"]
    assert ref["embedded"] == N
    killed, clean = _shards(tmp_path / "killed"), _shards(tmp_path / "clean")
    assert set(killed) == set(clean)  # the unfinished shards are re-planned to the same content
    kv = {k: v for s in killed.values() for k, v in s.items()}
    cv = {k: v for s in clean.values() for k, v in s.items()}
    assert kv.keys() == cv.keys() and all(np.array_equal(kv[k], cv[k]) for k in cv)


@pytest.mark.integration
def test_two_ddp_processes_cover_every_text_once_equal_to_one_process_and_log_progress(tmp_path: Path) -> None:
    """trainer.devices=2 on CPU (Lightning's DDP launcher starts the second rank): each rank writes its own
    shards; together they are exactly the single-process run's shards. stdout is a file, not a terminal:
    the progress lines must be in it."""
    log = tmp_path / "ddp.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "fusion_lightning.embed",
                            *_args(tmp_path, "ddp", "trainer.devices=2", "trainer.accelerator=cpu", "strategy=ddp",
                                   "progress_interval=0.001")],
                           cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    ddp = _shards(tmp_path / "ddp")
    fit(compose_recipe("embed", _args(tmp_path, "one")))
    one = _shards(tmp_path / "one")
    assert set(ddp) == set(one) and len(one) == 5  # the same content-addressed shards
    keys = [k for s in ddp.values() for k in s]
    assert len(keys) == len(set(keys)) == N  # every text exactly once
    assert all(np.array_equal(ddp[n][k], one[n][k]) for n in one for k in one[n])
    lines = [m.group(0) for m in PROGRESS.finditer(text)]
    assert any("rank 0:" in x for x in lines) and any("rank 1:" in x for x in lines), text[-3000:]
    assert re.search(r"embedded in 5 shard\(s\)", text)  # the summary counts both ranks' shards


@pytest.mark.integration
def test_two_ddp_processes_with_one_shard_between_them_finish_and_write_it_once(tmp_path: Path) -> None:
    """Fewer shards than ranks: rank 1 gets no shard, reports one empty batch and must not hang DDP."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [a.replace(f"n_queries={N}", "n_queries=40") for a in _args(tmp_path, "few", "trainer.devices=2",
                                                                      "trainer.accelerator=cpu", "strategy=ddp")]
    r = subprocess.run([sys.executable, "-m", "fusion_lightning.embed", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    shards = _shards(tmp_path / "few")
    assert len(shards) == 1 and len(next(iter(shards.values()))) == 40
    assert re.search(r"embedded in 1 shard\(s\)", r.stdout + r.stderr)


def test_progress_callback_writes_plain_lines_when_not_a_terminal() -> None:
    assert progress_line(500, 2000, 10.0) == "[embed] 500/2,000 texts (25.0%), 50.0 texts/s, ETA 30s"
    assert "ETA 1h00m00s" in progress_line(1, 3601, 1.0, rank=1) and "rank 1:" in progress_line(1, 2, 1.0, rank=1)
    stream = io.StringIO()  # not a TTY
    cb = EmbedProgress(interval=0.05, stream=stream)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(dataset=SimpleNamespace(texts=90)), global_rank=0,
                              world_size=1)
    cb.on_predict_start(trainer, None)
    for _ in range(3):
        time.sleep(0.06)  # each batch past the interval: one line each
        cb.on_predict_batch_end(trainer, None, None, {"texts": ["q"] * 30}, 0)
    cb.on_predict_batch_end(trainer, None, None, {"texts": []}, 0)  # within the interval: no line
    cb.on_predict_end(trainer, None)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all(PROGRESS.fullmatch(x) for x in lines) and "\r" not in stream.getvalue()
    assert lines[0].startswith("[embed] 30/90 texts (33.3%)") and lines[-1].startswith("[embed] 90/90")
    with pytest.raises(ValueError, match="interval"):
        EmbedProgress(interval=0)


def test_embed_writes_the_cache_format_and_bad_specs_fail_clearly(tmp_path: Path) -> None:
    fit(compose_recipe("embed", _args(tmp_path, "fmt")))
    cache = EmbeddingCache(tmp_path / "fmt", HashingEncoder(256))
    assert len(cache.cached_keys()) == N
    with pytest.raises(InstantiationException, match="unknown option 'onnx8'"):
        fit(compose_recipe("embed", _args(tmp_path, "bad", "encoder=minilm+onnx8")))
    with pytest.raises(ValueError, match="out=DIR"):
        from fusion_lightning.data.embed_job import EmbedDataModule

        EmbedDataModule(texts=["a"], embedding_cache=None)


def test_submit_sends_the_embed_recipe_with_ddp_across_nodes() -> None:
    from fusion_lightning.submit import build as submit_build

    script, argv, _ = submit_build(["recipe=embed", "slurm.nodes=2", "slurm.gpus_per_node=8", "data=llmrouter"])
    assert "--nodes=2" in script and "fusion_lightning.fit" in script
    assert argv[-3:] == ["recipe=embed", "data=llmrouter", "strategy=ddp"]  # not the template's DeepSpeed
