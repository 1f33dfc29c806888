"""Thought-level retrieval benchmark: trained retriever vs frozen encoder vs BM25, and search latency.

For each dataset (RouteLLM GSM8K from ../shared/data when present, and the synthetic default) the
`template_retriever` recipe runs end to end through `fit`: the library is built with the RULE-BASED
summariser (no LLM is reachable here), the retriever is trained, and the Lightning test loop scores
the held-out queries (their own templates excluded from the index) for all three methods on the
same rows. Latency: exact top-k over a 100,000-template index (torch inner product), batched vs a
one-query-at-a-time loop measured in the same run.

    python bench/retrieval.py [--datasets routellm,synthetic] [--epochs 2] [--mode finetune|head]
                              [--encoder minilm] [--templates 100000] [--quick]

Prints Markdown tables and writes bench/out/retrieval.md and .csv.
Targets (issue 5): trained ≥ +10 points nDCG@3 over frozen; ≥ 1,000 queries/s at 100k templates on CPU.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.thought.retriever import TemplateIndex

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", ROOT.parent / "shared" / "data"))
METRICS = ("recall@3", "mrr", "ndcg@3")


def run_quality(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    data = {"routellm": ["data=routellm", f"data.path={SHARED / 'routellm_gsm8k'}"],
            "synthetic": [f"data.synthetic.n_queries={args.synthetic_queries}"]}[name]
    overrides = [*data, f"run_dir={tmp / name}", f"datamodule.encoder={args.encoder}", f"model.mode={args.mode}",
                 f"trainer.max_epochs={args.epochs}", "trainer.accelerator=cpu", "logger=none",
                 f"datamodule.embedding_cache={tmp / 'emb'}", *args.set]
    t0 = time.perf_counter()
    summary = fit(compose_recipe("template_retriever", overrides))
    m = summary["metrics"]
    out = {method: {k: m[f"test/{prefix}{k}"] for k in METRICS}
           for method, prefix in (("trained", ""), ("frozen", "frozen/"), ("bm25", "bm25/"))}
    out["_info"] = {"templates": summary["data"]["templates"], "test_queries": summary["data"]["test_eval_queries"],
                    "seconds": time.perf_counter() - t0}
    return out


def run_latency(n_templates: int, n_queries: int, dim: int = 384, k: int = 3) -> list[tuple[str, float]]:
    g = torch.Generator().manual_seed(0)
    vecs = torch.nn.functional.normalize(torch.randn(n_templates, dim, generator=g), dim=1)
    tasks = [f"task{i % 14}" for i in range(n_templates)]
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
    index = TemplateIndex(vecs, tasks)
    rows = []
    index.search(q[:8], k)  # warm-up
    t = time.perf_counter()
    n_loop = min(n_queries, 200)
    for i in range(n_loop):  # baseline: one query at a time
        index.search(q[i:i + 1], k)
    rows.append(("one query at a time (baseline)", n_loop / (time.perf_counter() - t)))
    def best_of(f, repeats: int = 3) -> float:  # best of 3: robust to a neighbour's burst on a shared machine
        f()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return n_queries / min(times)

    for bs in (256, 512, 1024):
        rows.append((f"batched {bs}", best_of(lambda bs=bs: index.search(q, k, batch_size=bs))))
    q_tasks = [tasks[i % 14] for i in range(n_queries)]
    rows.append(("batched 512 + task filter (14 tasks)", best_of(lambda: index.search(q, k, tasks=q_tasks))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="routellm,synthetic")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--mode", default="finetune", choices=("finetune", "head"))
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--synthetic-queries", type=int, default=1500)
    ap.add_argument("--templates", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra recipe override for the training runs (repeatable), e.g. model.distill_weight=1")
    ap.add_argument("--quick", action="store_true", help="hashing encoder + head mode, 1 epoch: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.encoder, args.mode, args.epochs, args.synthetic_queries = "hashing", "head", 1, 400
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lines = [f"# Template retrieval (summariser: rule-based; encoder {args.encoder}, mode {args.mode}, "
             f"{args.epochs} epochs)", "", "| dataset | method | Recall@3 | MRR | nDCG@3 | Δ nDCG@3 vs frozen |",
             "|---|---|---|---|---|---|"]
    csv_rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in [x for x in args.datasets.split(",") if x]:
            if name == "routellm" and not (SHARED / "routellm_gsm8k").is_dir():
                lines.append(f"| routellm | skipped: {SHARED / 'routellm_gsm8k'} not found | | | | |")
                continue
            res = run_quality(name, args, Path(d))
            info = res.pop("_info")
            for method, m in res.items():
                delta = 100 * (m["ndcg@3"] - res["frozen"]["ndcg@3"])
                lines.append(f"| {name} ({info['templates']} templates, {info['test_queries']} test q) | {method} | "
                             f"{m['recall@3']:.3f} | {m['mrr']:.3f} | {m['ndcg@3']:.3f} | {delta:+.1f} pts |")
                csv_rows.append({"dataset": name, "method": method, **m, "templates": info["templates"]})
            print(f"{name}: {info['seconds']:.0f} s", flush=True)
    lat = run_latency(args.templates, args.queries)
    base = lat[0][1]
    lines += ["", f"# Search latency: {args.templates:,} templates × 384-d, k=3, {args.queries:,} queries, "
              f"{torch.get_num_threads()} CPU threads", "", "| search | queries/s | × baseline |", "|---|---|---|"]
    lines += [f"| {n} | {qps:,.0f} | {qps / base:.1f}× |" for n, qps in lat]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.md").write_text(text + "\n")
    with (out / "retrieval.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["dataset", "method", *METRICS, "templates"])
        w.writeheader()
        w.writerows(csv_rows)


if __name__ == "__main__":
    main()
