"""MFU of full fine-tuning through our `Student` LightningModule (SmolLM2-135M architecture, bf16) on one GPU.

One short prepared check: build the model, train `--steps` optimiser steps on fixed-length random token
batches (every position supervised, so raw = supervised tokens) after `--warmup` steps, and report

    model FLOPs/token = 6·N + 12·n_layers·d_model·seq_len      (PaLM, appendix B: matmuls + attention)
    MFU = tokens/s · FLOPs/token / peak bf16 FLOP/s

N counts the matmul weights: every parameter except the input embedding, plus the LM head (the tied
embedding matrix of SmolLM2 is that head). The peak comes from a small table by GPU name, or --peak-tflops.

    python bench/gpu_mfu.py                                   # on a GPU: SmolLM2-135M shape, random init
    python bench/gpu_mfu.py --model DIR                       # any Hugging Face causal LM directory / name
    python bench/gpu_mfu.py --device cpu --arch tiny --steps 2 --warmup 1 --seq-len 64 --batch-size 2  # smoke

`--arch smollm2-135m` builds the exact SmolLM2-135M configuration with random weights (MFU does not
depend on the weights, and a GPU node need not reach a model hub). Writes bench/out/gpu_mfu.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
PEAK_BF16_TFLOPS = {  # dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "B200": 2250.0,
}
ARCHS = {  # LlamaConfig kwargs
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}


def peak_tflops(name: str) -> float | None:
    """Longest table key contained in the device name ('NVIDIA H100 80GB HBM3' -> 'H100 80GB HBM3')."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding, plus the LM head."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total - emb.numel() + (head.numel() if head is emb else 0)


def flops_per_token(n_matmul: int, layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * n_matmul + 12.0 * layers * hidden * seq_len


def build_arch(arch: str, out: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**ARCHS[arch])).save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="smollm2-135m", choices=list(ARCHS))
    ap.add_argument("--model", help="a Hugging Face directory or name instead of --arch")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="bf16-mixed", help="Lightning precision (trainer=gpu uses bf16-mixed)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s (default: from the table by GPU name)")
    args = ap.parse_args()

    import lightning as L
    from distill import StepTimer  # bench/distill.py: per-step seconds and token counts (same directory)
    from torch.utils.data import DataLoader

    from fusion_lightning.model.student import Student

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and --arch tiny) for a smoke check")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_arch(args.arch, Path(tmp) / args.arch)
        student = Student(path, lora=None, gradient_checkpointing=args.gradient_checkpointing, lr=2e-5,
                          warmup_ratio=0.0)
        cfg = student.model.config
        vocab = cfg.vocab_size
        g = torch.Generator().manual_seed(0)
        n_batches = args.warmup + args.steps
        ids = torch.randint(0, vocab, (n_batches * args.batch_size, args.seq_len), generator=g)
        data = [{"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)} for x in ids]
        loader = DataLoader(data, batch_size=args.batch_size, pin_memory=args.device == "cuda")
        timer = StepTimer(str(Path(tmp) / "timing.json"), args.warmup)
        trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                            precision=args.precision, max_steps=n_batches, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
        n_matmul = matmul_params(student.model)
        trainer.fit(student, train_dataloaders=loader)
        steps = json.loads(Path(timer.out).read_text())["steps"]
    seconds = sum(s[0] for s in steps)
    tokens = sum(s[1] for s in steps)
    tok_s = tokens / seconds
    fpt = flops_per_token(n_matmul, cfg.num_hidden_layers, cfg.hidden_size, args.seq_len)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if args.device == "cuda" else None)
    achieved = tok_s * fpt / 1e12
    result = {"device": name, "model": args.model or args.arch, "params": sum(p.numel() for p in student.parameters()),
              "matmul_params": n_matmul, "precision": args.precision, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "timed_steps": len(steps), "tokens_per_s": tok_s,
              "model_flops_per_token": fpt, "achieved_tflops": achieved, "peak_tflops": peak,
              "mfu": achieved / peak if peak else None,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}
    print(f"{result['model']} on {name}: {result['params'] / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in matmuls), "
          f"{args.precision}, batch {args.batch_size} × {args.seq_len}, {len(steps)} timed steps")
    print(f"  {tok_s:,.0f} tokens/s × {fpt / 1e9:.3f} GFLOP/token = {achieved:.2f} TFLOP/s")
    print(f"  MFU {result['mfu']:.1%} of {peak:.0f} TFLOP/s" if peak else
          "  MFU: unknown peak for this device (pass --peak-tflops)")
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu_mfu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
