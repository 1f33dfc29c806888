"""Time to embed LLMRouter queries per encoder through the embed job (issue 26: prefill features vs MiniLM).

    python bench/prefill_embed.py [--limit 200] [--encoders minilm hf:smollm2-135m@8 hf:gemma-3-270m@9]

Each encoder embeds the same `--limit` queries (bench/embed.py's `sample_queries`, seed 0: 60 % train,
40 % test) through the embed job (`EncoderModule` + `ShardWriter`, batch size `auto`: 8 on a CPU) into a
fresh cache folder; the model is loaded (and a zoo model fetched) before the clock starts. Prints
seconds per 1,000 queries and texts/s per encoder, the mean token count of the sample under each
model's tokenizer (`+lenN` truncation applied), the torch thread count and the load average (the
machine may be shared). A prefill encoder runs its model only up to the layer asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import SHARED, sample_queries  # noqa: E402

import fusion_lightning.zoo  # noqa: E402,F401  hf:ZOO_NAME resolves


def run(spec: str, texts: list[str], out: Path) -> dict:
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    from fusion_lightning.data.embed_job import EmbedDataModule, EncoderModule, ShardWriter, run_predict

    module = EncoderModule(spec)
    module.encoder.encode(texts[:2])  # load the model (fetch a zoo model, export ONNX) before timing
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[LightningEnvironment()],
                        callbacks=[ShardWriter()])
    report = run_predict(trainer, module, EmbedDataModule(encoder=spec, embedding_cache=str(out), texts=texts))
    tok = getattr(module.encoder, "tokenizer", None)
    max_len = getattr(module.encoder, "max_seq_length", None) or 256
    tokens = (sum(min(len(tok(t)["input_ids"]), max_len) for t in texts) / len(texts)) if tok is not None else None
    return {"encoder": module.encoder.name, "texts": report["embedded"], "seconds": report["seconds"],
            "s_per_1k": round(1000 * report["seconds"] / max(report["embedded"], 1), 1),
            "texts_per_s": report["texts_per_s"], "mean_tokens": round(tokens, 1) if tokens else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--data", default=str(SHARED / "llmrouter"))
    p.add_argument("--encoders", nargs="+", default=["minilm", "hf:smollm2-135m@8"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts, _, _ = sample_queries(Path(args.data), args.limit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.encoders):
            rows.append(run(spec, texts, Path(tmp) / str(i)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print("| encoder | s / 1,000 queries | texts/s | mean tokens |\n|---|---|---|---|")
    for r in rows:
        print(f"| `{r['encoder']}` | {r['s_per_1k']} | {r['texts_per_s']} | {r['mean_tokens'] or '-'} |")


if __name__ == "__main__":
    main()
