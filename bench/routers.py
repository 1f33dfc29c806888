"""Routing benchmark: every router and baseline on the pooled LLMRouter logs, k-fold cross-validated by query.

The train and test files are pooled (a query in both is kept once), split into k folds by query text
(stratified by task, seeded); each fold is the test set once, the rest is train with a task-stratified
10% held out as val for early stopping and checkpoint selection. Our routers are the library's
LightningModules with their recipe defaults, trained with a Lightning Trainer exactly as `fit` does;
the scikit-learn baselines of FusionFactory / RouterBench / LLMRouter use the same MiniLM
embeddings and folds (fit on train + val). All metrics come from fusion_lightning.query.metrics.

    python bench/routers.py [--folds 5] [--seed 0] [--routers mlp,knn,mf,irt,graph,encoder] [--quick]

Prints one Markdown table (mean ± std over folds) and writes it to bench/out/routers.md and .csv.
Targets (issue 3): best router clearly above task-best, gap_closed ≥ 0.40 aimed for; reaches best
single's performance at ≤ 50% of its cost; ≥ 50,000 decisions/s from cached embeddings; end to end
≥ 0.9× the encoder's own throughput.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _folds import (  # noqa: E402
    fold_logs,
    mean_std,
    query_folds,
    rate,
    rescoring_noise,
    routing_arrays,
    sklearn_routers,
)

from fusion_lightning.config import compose_recipe  # noqa: E402
from fusion_lightning.data.embeddings import SentenceTransformerEncoder  # noqa: E402
from fusion_lightning.data.logtable import load_logs  # noqa: E402
from fusion_lightning.query.metrics import (  # noqa: E402
    cost_to_match,
    gap_closed,
    routing_metrics,
    sweep_choices,
    sweep_points,
)
from fusion_lightning.query.router import Router  # noqa: E402

ROUTERS = ("mlp", "knn", "mf", "irt", "graph", "encoder")
ENSEMBLE = ("mlp", "knn", "mf", "irt", "graph")  # every embedding router; mean predicted score and cost
BASELINES = ("best_single", "task_best", "oracle", "random")
OUT = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--quick", action="store_true", help="2 folds, few epochs: a fast check")
    p.add_argument("--data", default=None, help="LLMRouter folder (default: the recipe's data path)")
    p.add_argument("--encoder-epochs", type=int, default=2)
    p.add_argument("--encoder-folds", type=int, default=None, help="run the encoder router on the first N folds")
    p.add_argument("--e2e-texts", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the per-fold results of an interrupted run with the same settings (the last fold "
                        "is always trained: throughput needs its routers)")
    a = p.parse_args(argv)
    if a.quick:
        a.folds, a.encoder_epochs, a.e2e_texts = 2, 1, min(a.e2e_texts, 300)
    a.routers = [r for r in a.routers.split(",") if r]
    unknown = set(a.routers) - set(ROUTERS)
    if unknown:
        p.error(f"unknown router(s) {sorted(unknown)}; choose from {', '.join(ROUTERS)}")
    return a


def recipe(name: str, run_dir: str, args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """The router's recipe as `fit` composes it; the bench only trims epochs in --quick / for the encoder."""
    over = [*extra, "data=llmrouter", "logger=none", f"run_dir={run_dir}", "~callbacks.progress_bar",
            "~callbacks.routing_report"]
    if args.data:
        over.append(f"data.path={args.data}")
    if name == "encoder":
        over += [f"trainer.max_epochs={args.encoder_epochs}", "datamodule.max_length=64"]
    elif args.quick and name != "knn":
        over.append("trainer.max_epochs=5")
    return compose_recipe(f"router_{name}", over)


def train(name: str, dm, args: argparse.Namespace, seed: int, extra: tuple[str, ...] = ()
          ) -> tuple[L.LightningModule, float]:
    """Fit as `fit` does (seed, model from the recipe, callbacks, Trainer), then test the best checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(name, tmp, args, extra)
        L.seed_everything(seed, workers=True, verbose=False)
        model = instantiate(cfg.model, **dm.model_kwargs(), _convert_="all")
        callbacks = [instantiate(c) for c in cfg.callbacks.values()]
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=False,
                              enable_model_summary=False)
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - t0
        trainer.test(model, datamodule=dm, ckpt_path="best", verbose=False)  # loads the best weights
    return model.eval(), seconds


def evaluate(perf_hat: np.ndarray, cost_hat: np.ndarray | None, train, ev, sizes) -> tuple[dict, dict]:
    """Row for the table (performance-first) + the full metrics; cost to match best single from the λ sweep."""
    m = routing_metrics({"performance_first": perf_hat}, train, ev, sizes)
    row = {"perf": m["perf"], "gap_closed": m["gap_closed"], "cost": m["cost"]}
    if cost_hat is not None:
        pts = sweep_points(sweep_choices(perf_hat, cost_hat, ev.mask), ev)
        row["cost_to_match"] = cost_to_match(pts, m["best_single/perf"], m["best_single/cost"])
    return row, m


def run_folds(args: argparse.Namespace):
    cfg = recipe("mlp", "/tmp/unused", args)
    path = args.data or cfg.data.path
    logs = load_logs("llmrouter", path, split="query")  # pooled; cross-split duplicates kept once
    qm = logs.matrix()
    folds = query_folds(qm, args.folds, args.seed)
    print(f"data: {len(qm):,} queries × {len(qm.models)} models, {len(set(qm.tasks))} tasks; "
          f"{args.folds} folds by query (seed {args.seed})", flush=True)
    rows: dict[str, list[dict]] = defaultdict(list)
    last: dict = {}
    enc_folds = args.encoder_folds or args.folds
    saved = OUT / "routers_folds.json"
    key = {k: v for k, v in vars(args).items() if k not in ("resume", "threads", "e2e_texts")}
    done = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    done = done.get("folds", []) if done.get("settings") == key else []
    for f in range(args.folds):
        if f < min(len(done), args.folds - 1):
            for name, row in done[f].items():
                rows[name].append(row)
            print(f"[fold {f + 1}/{args.folds}] resumed from {saved}", flush=True)
            continue
        before = {n: len(v) for n, v in rows.items()}
        flogs = fold_logs(logs, qm, folds, f, val_fraction=0.1, seed=args.seed)
        dm = instantiate(cfg.datamodule, logs=flogs, _convert_="all")
        dm.setup("fit")
        train_a, ev = routing_arrays(dm.splits["train"].tensors), routing_arrays(dm.splits["test"].tensors)
        sizes = dm.model_kwargs()["model_sizes"]
        preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        m = None

        def report(name: str, row: dict, seconds: float | None, fold: int = f) -> None:
            row["train_s"] = seconds
            rows[name].append(row)
            ctm = row.get("cost_to_match")
            print(f"[fold {fold + 1}/{args.folds}] {name:<15} gap_closed {row['gap_closed']:+.3f}  "
                  f"perf {row['perf']:.3f}  cost/best {'—' if ctm is None else f'{ctm:.2f}'}  "
                  f"train {seconds or 0:.1f}s", flush=True)

        for name in args.routers:
            if name == "encoder":
                if f >= enc_folds:
                    continue
                ecfg = recipe("encoder", "/tmp/unused", args)
                edm = instantiate(ecfg.datamodule, logs=flogs, _convert_="all")
                module, sec = train(name, edm, args, args.seed)
                assert np.array_equal(module.eval_outputs["test"]["eval"].perf, ev.perf), "test order differs"
            else:
                module, sec = train(name, dm, args, args.seed)
            out = module.eval_outputs["test"]
            preds[name] = (out["perf_hat"].astype(np.float64), out["cost_hat"].astype(np.float64))
            row, m = evaluate(*preds[name], train_a, ev, sizes)
            report(name, row, sec)
            last[name] = module
        members = [n for n in ENSEMBLE if n in preds]
        if len(members) > 1:
            p = np.mean([preds[n][0] for n in members], 0)
            c = np.mean([preds[n][1] for n in members], 0)
            row, m = evaluate(p, c, train_a, ev, sizes)
            report("ensemble", row, sum(rows[n][-1]["train_s"] for n in members))
        for sk in sklearn_routers(args.seed):
            scores, sec = sk.fit(dm.splits, len(qm.models))
            row, m = evaluate(scores, None, train_a, ev, sizes)
            report(sk.name, row, sec)
            last[sk.name] = sk
        for b in BASELINES:
            rows[b].append({"perf": m[f"{b}/perf"], "cost": m[f"{b}/cost"],
                            "gap_closed": gap_closed(m[f"{b}/perf"], m["best_single/perf"], m["oracle/perf"])})
        print(f"[fold {f + 1}/{args.folds}] baselines: " + "  ".join(
            f"{b} {rows[b][-1]['perf']:.3f}" for b in BASELINES), flush=True)
        last["dm"], last["edm"] = dm, (edm if "encoder" in args.routers and f < enc_folds else last.get("edm"))
        done = done[:f] + [{n: v[-1] for n, v in rows.items() if len(v) > before.get(n, 0)}]
        OUT.mkdir(exist_ok=True)
        saved.write_text(json.dumps({"settings": key, "folds": done}))
    return rows, last, qm, path


def throughput(last: dict, qm, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Decisions/s from cached features (100k rows, batch 4096) and end to end from text vs the encoder."""
    dm, rng = last["dm"], np.random.default_rng(args.seed)
    t = dm.splits["test"].tensors
    idx = torch.from_numpy(rng.integers(0, len(t["x"]), 100_000))
    x, task = t["x"][idx], t["task"][idx]
    out: dict[str, dict[str, float]] = defaultdict(dict)
    routers = {n: Router(last[n]) for n in ROUTERS if n in last}
    for name, r in routers.items():
        feats = last["edm"].splits["test"].tensors["x"][idx] if name == "encoder" else x
        probe = 256 if name in ("encoder", "graph") else 4096
        out[name]["dps"] = rate(lambda n, r=r, f=feats: r.route_embeddings(f[:n], task[:n], batch_size=4096),
                                len(idx), probe=probe)
        print(f"throughput {name}: {out[name]['dps']:,.0f} decisions/s (cached features)", flush=True)
    members = [routers[n] for n in ENSEMBLE if n in routers]
    if len(members) > 1:
        out["ensemble"]["dps"] = rate(lambda n: [r.route_embeddings(x[:n], task[:n]) for r in members],
                                      len(idx), probe=256)
    xn = x.numpy()
    for sk in sklearn_routers(args.seed):
        if sk.name in last:
            s = last[sk.name]
            feats = np.hstack([xn, np.eye(len(dm.tasks), dtype=np.float32)[task.numpy()]]) if s.task_onehot else xn
            out[sk.name]["dps"] = rate(lambda n, s=s, f=feats: s.predict(f[:n]).argmax(1), len(idx))

    # end to end: text -> decision, next to the encoder alone on the same texts and batch size
    pick = rng.choice(len(qm), min(args.e2e_texts, len(qm)), replace=False)
    texts, tasks = [qm.queries[i] for i in pick], [qm.tasks[i] for i in pick]
    enc = SentenceTransformerEncoder("minilm")
    enc.encode(texts[:64])  # load + warm up

    def encoder_alone() -> float:
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=64)
        return time.perf_counter() - t0

    enc_s = encoder_alone()
    print(f"encoder alone: {len(texts) / enc_s:,.1f} texts/s", flush=True)
    e2e: dict[str, float] = {}
    for name in [n for n in ("mlp", "ensemble", "encoder") if n in routers or (n == "ensemble" and len(members) > 1)]:
        t0 = time.perf_counter()
        if name == "ensemble":  # one encode, then every member on the embeddings
            tid, feats = members[0].task_ids(tasks, len(texts)), enc.encode(texts, batch_size=64)
            for r in members:
                r.route_embeddings(feats, tid)
        else:
            Router(routers[name].module, enc).route(texts, tasks, batch_size=64)
        e2e[name] = time.perf_counter() - t0
    enc_s = min(enc_s, encoder_alone())  # the encoder's best of a run before and after
    for name, sec in e2e.items():
        out[name]["e2e_ratio"] = enc_s / sec
        print(f"end to end {name}: {len(texts) / sec:,.1f} texts/s = {enc_s / sec:.2f}× the encoder's", flush=True)
    return out


NOTES = {
    "encoder": "MiniLM fine-tuned: {ep} epoch(s), max_length 64{folds}; cached = token ids",
    "ensemble": "mean predicted score/cost of " + ", ".join(ENSEMBLE),
    "sk_knn_clf": "KNeighborsClassifier(10) on argmax labels, MiniLM",
    "sk_mlp_reg": "MLPRegressor(128) multi-output, MiniLM",
    "sk_linear_svr": "LinearSVR per model, MiniLM",
    "sk_logreg_task": "LogisticRegression per model, MiniLM + task one-hot, score ≥ 0.5",
    "random": "expectation over models",
}


def table(rows: dict, tp: dict, args: argparse.Namespace) -> tuple[str, list[dict]]:
    order = [*[n for n in (*ROUTERS, "ensemble") if n in rows],
             *[n for n in rows if n.startswith("sk_")], *BASELINES]
    best = max((n for n in order if n not in BASELINES), key=lambda n: np.mean([r["gap_closed"] for r in rows[n]]))
    head = ["router", "folds", "perf", "gap_closed", "cost (µ$/query)", "cost to match best single",
            "train s", "decisions/s (cached)", "end to end / encoder", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    records = []
    for n in order:
        rs = rows[n]
        ctm = [r.get("cost_to_match") for r in rs if "cost_to_match" in r]
        reached = sum(c is not None for c in ctm)
        ctm_s = "—" if not ctm else mean_std([c for c in ctm if c is not None], "{:.2f}") + \
            ("" if reached == len(ctm) else f" (reached {reached}/{len(ctm)})")
        note = NOTES.get(n, "").format(ep=args.encoder_epochs, folds="" if len(rs) == args.folds
                                       else f"; {len(rs)} of {args.folds} folds")
        rec = {"router": f"**{n}**" if n == best else n, "folds": len(rs),
               "perf": mean_std([r["perf"] for r in rs]), "gap_closed": mean_std([r["gap_closed"] for r in rs]),
               "cost": mean_std([r["cost"] * 1e6 for r in rs], "{:.1f}"), "cost_to_match": ctm_s,
               "train_s": mean_std([r.get("train_s") for r in rs], "{:.1f}"),
               "dps": f"{tp[n]['dps']:,.0f}" if "dps" in tp.get(n, {}) else "—",
               "e2e": f"{tp[n]['e2e_ratio']:.2f}×" if "e2e_ratio" in tp.get(n, {}) else "—", "notes": note}
        records.append(rec)
        lines.append("| " + " | ".join(str(v) for v in rec.values()) + " |")
    diff = [r["gap_closed"] - t["gap_closed"] for r, t in zip(rows[best], rows["task_best"], strict=False)]
    lines.append(f"\nBest router: {best}, gap_closed {np.mean([r['gap_closed'] for r in rows[best]]):.3f}; "
                 f"minus task-best on the same folds: {mean_std(diff)} (higher on {sum(d > 0 for d in diff)} "
                 f"of {len(diff)} folds).")
    return "\n".join(lines), records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    t0 = time.perf_counter()
    rows, last, qm, path = run_folds(args)
    tp = throughput(last, qm, args)
    md, records = table(rows, tp, args)
    noise = rescoring_noise(path)
    md += (f"\n\nRe-scoring noise: {noise['queries']} queries are scored twice in the source (train and test "
           f"files): {noise['scores_differ']:.1%} of their (query, model) scores differ, on "
           f"{noise['queries_differing']:.0%} of the queries. Routing each by its other copy's scores closes "
           f"{noise['copy_oracle_gap_closed']:.2f} of the gap on them.\n")
    print("\n" + md)
    OUT.mkdir(exist_ok=True)
    (OUT / "routers.md").write_text(md)
    with (OUT / "routers.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    print(f"wrote {OUT / 'routers.md'} and .csv ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
