"""Embedding throughput on the shared LLMRouter queries, in one run (issue 17's benchmark).

    python bench/embed.py [--limit 1000] [--data DIR] [--threads 2] [--repeats 3]
    python bench/embed.py --format routellm --data ../shared/data/routellm_gsm8k
    python bench/embed.py --device cuda --limit 6108     # the GPU check, when a GPU is lent
    python bench/embed.py --routing-batches --threads 1  # serve's encode: one padded batch vs token budget

Rows (texts/s, and the ratio to the baseline):
- baseline: plain sentence-transformers fp32 `model.encode(texts)` (MiniLM at its defaults: batch 32,
  max_seq_length 256);
- tuned baseline: the same at the job's CPU batch size (8, `auto_batch_size`), so the job's gain from
  its batch size and from ONNX can be told apart;
- job torch fp32: the embed job (Lightning predict + shard writer) with `encoder=minilm+torch`, the default
  encoder until issue 25;
- job, the default encoder: the same job with `encoder=minilm`, which is ONNX Runtime fp32 on a CPU;
- job onnx fp32 / job onnx int8: the same job with `encoder=minilm+onnx` / `minilm+onnx-int8`;
- job DDP x2: `python -m fusion_lightning.embed ... trainer.devices=2 strategy=ddp` on CPU, one thread per
  rank (its time is rank 0's predict, through the slowest rank, model loads included).
With `--device cuda` the rows are the baseline and tuned baseline on the GPU (the tuned one at the job's
GPU batch rule) and the job on the GPU in fp32 and bf16-mixed; no ONNX (the CPU path) or DDP row.
Single-process rows use `--threads` torch/ORT threads and report the median time of `--repeats` runs (on
a shared 2-core machine one run varies by ±10 %); models are loaded and ONNX exports made before
timing. Each row embeds into a fresh cache folder. Agreement with the baseline vectors is printed beside
each row: mean cosine, and `routing_agreement` (the same picks of a ridge router fitted on the baseline's
train vectors, the routed score difference, and how close the changed decisions were). Prints the load
average: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.data.embed_job import CPU_BATCH_SIZE, auto_batch_size

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", ROOT.parent / "shared" / "data"))


LOGS = {"llmrouter": "llmrouter", "routellm": "routellm_gsm8k"}  # reader -> shared data folder


def sample_queries(data: Path, limit: int, fmt: str = "llmrouter") -> tuple[list[str], np.ndarray, int]:
    """`limit` queries of a log (seed 0): 60 % from the train split, then 40 % from test (as many as it
    has), with their [N, M] scores (the routing check's router is fitted on the train part)."""
    from fusion_lightning.data.logtable import load_logs

    m = load_logs(fmt, data).matrix()
    rng = np.random.default_rng(0)
    train, test = np.flatnonzero(m.splits == "train"), np.flatnonzero(m.splits == "test")
    n_train = min(int(limit * 0.6), len(train))
    rows = np.concatenate([rng.choice(train, n_train, replace=False),
                           rng.choice(test, min(limit - n_train, len(test)), replace=False)])
    return [m.queries[i] for i in rows], m.performance[rows], n_train


def baseline(model: Any, texts: list[str], batch_size: int | None = None) -> tuple[float, np.ndarray]:
    """sentence-transformers' `encode` of a loaded, warmed model, at its default batch size unless one is given."""
    kw = {} if batch_size is None else {"batch_size": batch_size}
    t0 = time.perf_counter()
    out = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False, **kw)
    return time.perf_counter() - t0, np.asarray(out, np.float32)


def job(texts: list[str], spec: str, out: Path, accelerator: str = "cpu",
        precision: str = "32-true") -> tuple[float, np.ndarray]:
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    from fusion_lightning.data.embed_job import EmbedDataModule, EncoderModule, ShardWriter, run_predict
    from fusion_lightning.data.embeddings import EmbeddingCache

    module = EncoderModule(spec)
    module.encoder.encode(texts[:8])  # load the model, make the ONNX export: not part of the timing
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[LightningEnvironment()],
                        callbacks=[ShardWriter()])
    report = run_predict(trainer, module, EmbedDataModule(encoder=spec, embedding_cache=str(out), texts=texts))
    assert report["embedded"] == len(texts), report
    return report["seconds"], EmbeddingCache(out, module.encoder).embed(texts, show_progress=False)


def ddp_job(texts: list[str], out: Path, work: Path) -> tuple[float, np.ndarray]:
    from fusion_lightning.data.embeddings import EmbeddingCache, build_encoder

    f = work / "texts.jsonl"
    f.write_text("".join(json.dumps({"query": t}) + "\n" for t in texts), encoding="utf-8")
    run_dir = work / "ddp_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fusion_lightning.embed", "encoder=minilm", f"out={out}",
                        f"datamodule.texts_file={f}", f"run_dir={run_dir}", "trainer.devices=2",
                        "trainer.accelerator=cpu", "strategy=ddp", "trainer.deterministic=false"],
                       cwd=work, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"DDP run failed:\n{r.stderr[-3000:]}")
    report = json.loads((run_dir / "summary.json").read_text())["embed"]
    assert report["embedded"] == len(texts) and report["world_size"] == 2, report
    return report["seconds"], EmbeddingCache(out, build_encoder("minilm")).embed(texts, show_progress=False)


def median_run(repeats: int, run: Callable[[int], tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    """The median time of `repeats` calls of run(i) -> (seconds, vectors), with the last call's vectors."""
    times, vecs = [], None
    for i in range(max(1, repeats)):
        seconds, vecs = run(i)
        times.append(seconds)
    return float(np.median(times)), vecs


def routing_batches(texts: list[str], sizes: tuple[int, ...] = (8, 32, 64), rounds: int = 12) -> None:
    """What `serve` pays per routing batch: the default encoder on batches of new prompts as the MicroBatcher
    hands them over, in one padded batch (the encoder before issue 25's fix: `max_batch_tokens` unlimited)
    and in length-sorted batches within 1,024 padded tokens (the default). The two alternate on the same
    batches, so a busy machine slows both alike."""
    from fusion_lightning.data.embeddings import build_encoder

    padded, budget = build_encoder("minilm+onnx", max_batch_tokens=10**9), build_encoder("minilm+onnx")
    padded.encode(texts[:8]), budget.encode(texts[:8])  # exports and sessions made before timing
    rng = np.random.default_rng(0)
    print("| batch | one padded batch, ms/query | token budget 1,024, ms/query | ratio | max abs diff |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        times: dict[str, list[float]] = {"padded": [], "budget": []}
        diff = 0.0
        for r in range(rounds):
            batch = [texts[i] for i in rng.choice(len(texts), size, replace=False)]
            order = [("padded", padded), ("budget", budget)][:: 1 if r % 2 else -1]
            out = {}
            for name, enc in order:
                t0 = time.perf_counter()
                out[name] = enc.encode(batch, batch_size=size)
                times[name].append((time.perf_counter() - t0) / size * 1000)
            diff = max(diff, float(np.abs(out["padded"] - out["budget"]).max()))
        a, b = np.median(times["padded"]), np.median(times["budget"])
        print(f"| {size} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {diff:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "llmrouter")
    ap.add_argument("--format", choices=sorted(LOGS), default="llmrouter",
                    help="the log's reader (routellm: the RouteLLM GSM8K log, --data SHARED/routellm_gsm8k)")
    ap.add_argument("--limit", type=int, default=1000, help="queries sampled (seed 0): 60 %% from train, 40 %% from test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each single-process row (median time)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the GPU check (baseline, tuned baseline at the GPU batch rule, job fp32 and bf16)")
    ap.add_argument("--routing-batches", action="store_true",
                    help="only serve's routing batches: one padded batch against the token budget (the default)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    texts, perf, n_train = sample_queries(args.data, args.limit, args.format)
    if args.routing_batches:
        print(f"{len(texts)} {args.format} queries, {args.threads} thread(s); load average {os.getloadavg()[0]:.2f}")
        routing_batches(texts)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    gpu = f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"{len(texts)} {args.format} queries (of {args.data}); {args.threads} threads{gpu}; "
          f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("FUSION_LIGHTNING_CACHE", str(work / "cache"))  # the ONNX exports: made here
        from fusion_lightning.data.encoders import SentenceTransformerEncoder

        st = SentenceTransformerEncoder("minilm", device=args.device)._load()
        st.encode(texts[:8])  # warm
        # on a GPU the job's batches are cut within its shards (datamodule.shard_size, 1024)
        tuned_bs = CPU_BATCH_SIZE if args.device == "cpu" else min(1024, auto_batch_size(torch.device("cuda"), 256))
        t_base, ref = median_run(args.repeats, lambda i: baseline(st, texts))
        t_tuned, tuned = median_run(args.repeats, lambda i: baseline(st, texts, tuned_bs))
        rows.append(("sentence-transformers fp32 encode, default batch 32 (baseline)", t_base, ref))
        rows.append((f"sentence-transformers fp32 encode, batch {tuned_bs} (tuned baseline)", t_tuned, tuned))
        if args.device == "cuda":  # ONNX Runtime is the CPU path; DDP needs more than one GPU
            for name, precision in (("job fp32 on the GPU", "32-true"), ("job bf16-mixed on the GPU", "bf16-mixed")):
                rows.append((name, *median_run(args.repeats, lambda i, p=precision: job(
                    texts, "minilm", work / f"gpu-{p}-{i}", accelerator="gpu", precision=p))))
        else:
            for name, spec in (("job torch fp32 (minilm+torch: the default until issue 25)", "minilm+torch"),
                               ("job, the default encoder (minilm: ONNX Runtime fp32)", "minilm"),
                               ("job ONNX fp32 (minilm+onnx)", "minilm+onnx"), ("job ONNX int8", "minilm+onnx-int8")):
                rows.append((name, *median_run(args.repeats, lambda i, spec=spec: job(texts, spec, work / f"{spec}-{i}"))))
            rows.append(("job DDP (the default encoder), 2 processes x 1 thread", *ddp_job(texts, work / "ddp", work)))
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    from fusion_lightning.data.onnx_encoder import routing_agreement

    print(f"routing: a ridge router fitted on the baseline vectors of {n_train} train queries picks a model for "
          f"{len(texts) - n_train} test queries; 'same picks' compares each row's picks with the baseline's")
    print("| run | texts/s | vs baseline | vs tuned baseline | mean cosine vs baseline | same picks | routed score - baseline's "
          "| median margin: changed picks (all) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, seconds, vecs in rows:
        r = routing_agreement(ref, vecs, perf, n_train)
        print(f"| {name} | {len(texts) / seconds:.1f} | {t_base / seconds:.2f}x | {t_tuned / seconds:.2f}x | "
              f"{float((vecs * ref).sum(1).mean()):.4f} | {r['same_pick']:.1%} | {r['quality_diff']:+.3f} | "
              f"{r['changed_median_margin']:.4f} ({r['median_margin']:.4f}) |")


if __name__ == "__main__":
    main()
