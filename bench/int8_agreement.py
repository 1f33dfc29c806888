"""Which parts of MiniLM, kept fp32, buy back int8's routing agreement, on both shared logs (issue 17).

    python bench/int8_agreement.py [--limit 1000] [--threads 2]

The int8 encoder (`minilm+onnx-int8`) keeps mean cosine 0.99 against fp32 but changes a few percent of a
router's decisions. This quantises the fused fp32 export again with groups of nodes left fp32 (every
attention, every FFN input or output matmul, every attention output projection, or one whole layer)
and reports, per log and variant: texts/s (one encode, `--threads` ORT threads, job batch size 8), mean
and min cosine to plain sentence-transformers fp32 (`model.encode` at its defaults, bench/embed.py's
baseline), and `routing_agreement` (a ridge router fitted on the fp32 vectors of the train queries; the
share of the same picks on the test queries, and the routed score difference). Logs: the shared
LLMRouter queries (9 models, argmax routing) and RouteLLM's GSM8K (2 models, routed at a 50 % strong-call
budget: `routing_agreement(strong_share=0.5)`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fusion_lightning.data.embed_job import CPU_BATCH_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import LOGS, SHARED, baseline, sample_queries  # noqa: E402


def slug(name: str) -> str:
    return name.replace(" ", "_")


def _layer(name: str) -> int | None:
    return int(name.split("layer.")[1].split("/")[0]) if "layer." in name else None


def variants(fp32: Path) -> dict[str, list[str]]:
    """Variant name -> the fused graph's nodes it keeps fp32 (the quantisable ones: Attention, MatMul).

    A fused Attention node's name carries no layer; it is the layer of the matmul that reads its output."""
    import onnx

    nodes = [n for n in onnx.load(str(fp32)).graph.node if n.op_type in ("Attention", "MatMul")]
    reader = {i: n.name for n in nodes for i in n.input}
    layer = {n.name: _layer(n.name) if n.op_type == "MatMul" else _layer(reader.get(n.output[0], "")) for n in nodes}
    names = [n.name for n in nodes]
    groups = {"all int8": [], "attention fp32": [n.name for n in nodes if n.op_type == "Attention"],
              "attention output fp32": [n for n in names if "attention/output" in n],
              "FFN input fp32": [n for n in names if "intermediate" in n],
              "FFN output fp32": [n for n in names if "/output/dense" in n and "attention" not in n]}
    for i in sorted({v for v in layer.values() if v is not None}):
        groups[f"layer {i} fp32"] = [n for n in names if layer[n] == i]
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from fusion_lightning.data.encoders import SentenceTransformerEncoder
    from fusion_lightning.data.onnx_encoder import OnnxEncoder, quantize_int8, routing_agreement

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = OnnxEncoder("minilm", export_dir=work / "fp32").export()
        groups = variants(fp32)
        st = SentenceTransformerEncoder("minilm")._load()
        encoders = {}
        for name, keep in groups.items():  # each variant in its own folder, where OnnxEncoder finds it
            (work / slug(name)).mkdir()
            quantize_int8(fp32, work / slug(name) / "model_int8.onnx", keep)
            encoders[name] = OnnxEncoder("minilm", quantize=True, export_dir=work / slug(name))
        print(f"{args.threads} threads; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
        print("| log | int8 variant | nodes kept fp32 | texts/s | mean cosine | min cosine | same picks | "
              "routed score - fp32's |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for fmt, folder in LOGS.items():
            texts, perf, n_train = sample_queries(SHARED / folder, args.limit, fmt)
            # two models: RouteLLM's routing at a 50 % strong-call budget (an argmax picks the strong one always)
            strong_share = None
            if perf.shape[1] == 2:
                perf, strong_share = perf[:, np.argsort(-np.nanmean(perf[:n_train], 0))], 0.5
            ref = baseline(st, texts)[1]  # bench/embed.py's baseline: model.encode at its defaults
            for name, keep in groups.items():
                enc = encoders[name]
                enc.encode(texts[:CPU_BATCH_SIZE])  # load (first log), warm
                t0 = time.perf_counter()
                vecs = enc.encode(texts, batch_size=CPU_BATCH_SIZE)
                seconds = time.perf_counter() - t0
                cos = (vecs * ref).sum(1)
                r = routing_agreement(ref, vecs, perf, n_train, strong_share=strong_share)
                log = f"{fmt} ({len(texts) - n_train} test, {r['distinct_picks']} models picked)"
                print(f"| {log} | {name} | {len(keep)} | {len(texts) / seconds:.1f} | {cos.mean():.4f} | "
                      f"{cos.min():.3f} | {r['same_pick']:.1%} | {r['quality_diff']:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
