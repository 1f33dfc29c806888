"""Distillation benchmark: training throughput of our `fit` path vs a plain `transformers.Trainer` loop,
and supervised tokens/s with naive padding vs length grouping vs packing.

Every variant trains the same tiny random Llama (a few M parameters, built once with the package's
`build_tiny_llama`, so compute rather than Python overhead dominates) on the same SFT examples, through
the `distill_top_k` recipe's selection and `DistillDataModule`, with the recipe's batch size, optimiser,
schedule and LoRA settings. Two data settings (`--data`, default both, each its own table):
- `synthetic`: the recipe's default log (templated answers; lengths fairly even, max_length 256);
- `routellm`: the real GPT-4 / Mixtral GSM8K answers of the RouteLLM log (`data=routellm`), the
  length spread of real LLM responses (max_length 1024; 2 of 1,377 responses truncated).

- `fit/*`: `fusion_lightning.fit.fit(compose_recipe("distill_top_k", ...))` end to end (Lightning
  Trainer, `Student`, `DistillDataModule`), with a timing callback added through the config;
- `fit/packed_dense_mask`: packing through stock SDPA with the dense block-diagonal mask
  (`model.attn_implementation=sdpa_dense`), to show what per-example packed attention saves;
- `hf_trainer`: `transformers.Trainer` on the same model and config, fed the DataModule's own train
  loader (identical batches to `fit/grouped`), AdamW + cosine warmup + grad clipping 1.0 as in the recipe.

Each run is its own process (so peak RSS is per variant); variants are interleaved (A B C D A B C D ...)
and, per step, the fastest repeat is kept (every repeat sees the same seeded batches), so that load
from other jobs on a shared CPU biases no ratio. Timing covers `--steps` optimiser steps after
`--warmup` steps. Raw tokens = every position of the
batch (padding included); supervised tokens = labelled (response) positions.

    python bench/distill.py [--data synthetic routellm] [--repeats 3] [--steps 8] [--hidden 256] [--layers 4]
                            [--model student_lora]

Targets: fit raw tokens/s ≥ 0.95× the Trainer's; packing supervised tokens/s ≥ 1.5× naive padding.
Writes bench/out/distill.md and bench/out/distill.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

VARIANTS = {  # name -> (runner, datamodule overrides)
    "hf_trainer": ("hf", {"packing": False, "group_by_length": True}),
    "fit/grouped": ("fit", {"packing": False, "group_by_length": True}),
    "fit/naive": ("fit", {"packing": False, "group_by_length": False}),
    "fit/packed": ("fit", {"packing": True, "group_by_length": True}),
    # packing through stock SDPA with the dense block-diagonal mask (what fit/packed did before sdpa_packed)
    "fit/packed_dense_mask": ("fit", {"packing": True, "group_by_length": True, "+model.attn_implementation": "sdpa_dense"}),
}
OUT = Path(__file__).resolve().parent / "out"
# --data: which SFT examples. `synthetic`: the recipe's default log (templated answers, lengths fairly even:
# naive batches are ~2/3 real tokens). `routellm`: the real GPT-4 / Mixtral GSM8K responses of the RouteLLM
# log (data=routellm), whose lengths spread as real answers do (tiny tokenizer: median 289, p95 ~520, max ~1130).
DATA = {
    "synthetic": lambda a: [f"data.synthetic.n_queries={a.queries}"],
    "routellm": lambda a: ["data=routellm"],
}
MAX_LENGTH = {"synthetic": 256, "routellm": 1024}  # default --max-length per data setting


class StepTimer(L.Callback):
    """Per optimiser step after `warmup`: seconds since the previous step's end, raw and supervised tokens."""

    def __init__(self, out: str, warmup: int):
        self.out, self.warmup = out, warmup
        self.step, self.last, self.steps = 0, 0.0, []

    def count(self, batch: dict) -> None:
        self.step += 1
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # GPU work is asynchronous: time what has finished
        now = time.perf_counter()
        if self.step > self.warmup:
            self.steps.append((now - self.last, int(batch["input_ids"].numel()),
                               int((batch["labels"] != -100).sum())))
        self.last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.count(batch)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dump()

    def dump(self) -> None:
        Path(self.out).write_text(json.dumps({"steps": self.steps}))


def _overrides(args: argparse.Namespace, dm: dict, run_dir: str) -> list[str]:
    out = [f"student.name_or_path={args.model_dir}", f"model={args.model}", "callbacks=none", "logger=none",
           "trainer.accelerator=cpu", "trainer.max_epochs=1000", f"+trainer.max_steps={args.warmup + args.steps}",
           "+trainer.limit_val_batches=0", "+trainer.limit_test_batches=0", "+trainer.enable_progress_bar=false",
           *DATA[args.data](args), f"datamodule.batch_size={args.batch_size}",
           f"datamodule.max_length={args.max_length}", f"run_dir={run_dir}"]
    return out + [f"{k}={v}" if "." in k else f"datamodule.{k}={str(v).lower()}" for k, v in dm.items()]


def run_fit(args: argparse.Namespace, dm: dict, tmp: str) -> dict:
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit

    timing = str(Path(tmp) / "timing.json")
    cfg = compose_recipe("distill_top_k", _overrides(args, dm, str(Path(tmp) / "run")) + [
        "+callbacks.timer._target_=distill.StepTimer", f"+callbacks.timer.out={timing}",
        f"+callbacks.timer.warmup={args.warmup}"])
    fit(cfg)
    return json.loads(Path(timing).read_text())


def run_hf(args: argparse.Namespace, dm: dict, tmp: str) -> dict:
    """The same recipe's data, model and optimiser settings through a plain transformers.Trainer."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from fusion_lightning.config import compose_recipe

    cfg = compose_recipe("distill_top_k", _overrides(args, dm, str(Path(tmp) / "run")))
    L.seed_everything(int(cfg.seed), verbose=False)
    datamodule = instantiate(cfg.datamodule, _convert_="all")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    m = OmegaConf.to_container(cfg.model, resolve=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if m.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **m["lora"]))
    timer = StepTimer(str(Path(tmp) / "timing.json"), args.warmup)
    batches: list[dict] = []

    class Counter(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # after the optimiser step, as Lightning's batch end
            timer.count(batches[-1])

    class LoaderTrainer(Trainer):
        def get_train_dataloader(self):
            return self.accelerator.prepare(loader)

        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({"input_ids": inputs["input_ids"], "labels": inputs["labels"]})
            return super().training_step(model, inputs, num_items_in_batch)

    targs = TrainingArguments(
        output_dir=str(Path(tmp) / "hf"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=m["lr"], weight_decay=m["weight_decay"],
        warmup_steps=int(m["warmup_ratio"] * (args.warmup + args.steps)), lr_scheduler_type="cosine", max_grad_norm=float(cfg.trainer.gradient_clip_val),
        logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False, seed=int(cfg.seed))
    LoaderTrainer(model=model, args=targs, train_dataset=loader.dataset, callbacks=[Counter()]).train()
    timer.dump()
    return json.loads(Path(timer.out).read_text())


def worker(args: argparse.Namespace) -> None:
    runner, dm = VARIANTS[args.worker]
    with tempfile.TemporaryDirectory() as tmp:
        out = (run_fit if runner == "fit" else run_hf)(args, dm, tmp)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(out))


def best_of(runs: list[dict]) -> dict:
    """Per step index the fastest repeat (every repeat trains on the same seeded batches), summed: a burst
    of load from other jobs on a shared CPU then costs a step only when it hits that step in every repeat."""
    steps = [min(s, key=lambda x: x[0]) for s in zip(*(r["steps"] for r in runs), strict=True)]
    return {"seconds": sum(s[0] for s in steps), "raw_tokens": sum(s[1] for s in steps),
            "supervised_tokens": sum(s[2] for s in steps), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def table(best: dict[str, dict]) -> list[dict]:
    base, naive = best["hf_trainer"], best["fit/naive"]
    rows = []
    for name, r in best.items():
        raw, sup = r["raw_tokens"] / r["seconds"], r["supervised_tokens"] / r["seconds"]
        rows.append({"variant": name, "raw_tok_s": raw, "sup_tok_s": sup,
                     "raw_vs_trainer": raw / (base["raw_tokens"] / base["seconds"]),
                     "sup_vs_naive": sup / (naive["supervised_tokens"] / naive["seconds"]),
                     "padding_free": r["supervised_tokens"] / r["raw_tokens"], "peak_rss_mb": r["peak_rss_mb"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--queries", type=int, default=300, help="synthetic log size (the recipe's data)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None, help="default: 256 synthetic, 1024 routellm")
    ap.add_argument("--data", nargs="+", default=["synthetic", "routellm"], choices=list(DATA),
                    help="data settings, each benchmarked in turn (default: both)")
    ap.add_argument("--model", default="student_lora", choices=["student_lora", "student_full"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--worker", choices=list(VARIANTS))
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.worker:
        args.data = args.data[0]
        return worker(args)

    from fusion_lightning.zoo.builders import build_tiny_llama

    if args.max_length and len(args.data) > 1:
        sys.exit("--max-length applies to one --data setting at a time")
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp) / "student", hidden=args.hidden, layers=args.layers)
        n_params = _n_params(model_dir)
        for data in args.data:
            a = argparse.Namespace(**{**vars(args), "data": data, "max_length": args.max_length or MAX_LENGTH[data]})
            best = run_setting(a, model_dir, n_params)
            if {"hf_trainer", "fit/naive"} <= set(best):
                sections.append((a, table(best)))
            else:
                print(json.dumps(best, indent=2))
    if sections:
        report(sections, n_params)


def run_setting(args: argparse.Namespace, model_dir: Path, n_params: int) -> dict[str, dict]:
    print(f"data {args.data}; student: tiny Llama, {n_params / 1e6:.1f}M parameters, {args.model}; batch "
          f"{args.batch_size}, max_length {args.max_length}; {args.steps} timed steps after {args.warmup}, "
          f"best of {args.repeats}")
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("steps", "warmup", "queries", "batch_size", "max_length", "model", "data")]
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rep in range(args.repeats):
        for v in args.variants:  # interleaved: contention hits every variant alike
            r = subprocess.run([sys.executable, __file__, "--worker", v, f"--model-dir={model_dir}", *passthrough],
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{v} failed:\n{r.stderr[-3000:]}")
            res = json.loads(next(ln for ln in r.stdout.splitlines()[::-1] if ln.startswith("RESULT "))[7:])
            results[v].append(res)
            one = best_of([res])
            print(f"  [{rep + 1}/{args.repeats}] {v:<12} {one['raw_tokens'] / one['seconds']:>9,.0f} raw tok/s"
                  f" {one['supervised_tokens'] / one['seconds']:>9,.0f} supervised tok/s", flush=True)
    return {v: best_of(rs) for v, rs in results.items()}


def _n_params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def report(sections: list[tuple[argparse.Namespace, list[dict]]], n_params: int) -> None:
    head = ("| variant | raw tok/s | supervised tok/s | raw vs Trainer | supervised vs naive | non-pad share | "
            "peak RSS MB |\n|---|---:|---:|---:|---:|---:|---:|")
    texts, csv_rows = [], []
    for args, rows in sections:
        lines = [head] + [f"| {r['variant']} | {r['raw_tok_s']:,.0f} | {r['sup_tok_s']:,.0f} | "
                          f"{r['raw_vs_trainer']:.2f}x | {r['sup_vs_naive']:.2f}x | {r['padding_free']:.2f} | "
                          f"{r['peak_rss_mb']:,.0f} |" for r in rows]
        by = {r["variant"]: r for r in rows}
        targets = []
        if "fit/grouped" in by:
            x = by["fit/grouped"]["raw_vs_trainer"]
            targets.append(f"fit raw tokens/s vs transformers.Trainer (same batches): {x:.2f}x, target ≥ 0.95x -> "
                           f"{'met' if x >= 0.95 else 'NOT met'}")
        if "fit/packed" in by:
            x = by["fit/packed"]["sup_vs_naive"]
            targets.append(f"packing supervised tokens/s vs naive padding: {x:.2f}x, target ≥ 1.50x -> "
                           f"{'met' if x >= 1.5 else 'NOT met'}")
        title = (f"distill benchmark, data {args.data}: tiny Llama {n_params / 1e6:.1f}M params ({args.model}), "
                 f"batch {args.batch_size}, max_length {args.max_length}, {args.steps} timed steps, "
                 f"best of {args.repeats}, CPU")
        texts.append("\n".join([title, "", *lines, "", *targets]))
        csv_rows += [{"data": args.data, "max_length": args.max_length, **r} for r in rows]
    text = "\n\n".join(texts)
    print("\n" + text)
    OUT.mkdir(exist_ok=True)
    (OUT / "distill.md").write_text(text + "\n")
    with open(OUT / "distill.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        w.writeheader()
        w.writerows(csv_rows)


if __name__ == "__main__":
    main()
