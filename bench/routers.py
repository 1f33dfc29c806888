"""Routing benchmark: every router, router_auto, the baselines and the peers on several logs, k-fold by query.

Each log (any registered reader: `--data llmrouter routellm synthetic routerbench=PATH ...`) is pooled
(a query in two files is kept once) and split into k folds by query text (stratified by task, seeded);
each fold is the test set once, the rest is train with a task-stratified 10% held out as val (early
stopping, checkpoint and model selection). Our routers are the library's LightningModules with their
recipe defaults, trained with a Lightning Trainer as `fit` does; the scikit-learn routers of the
routing papers and the real LLMRouter library (`llmrouter-lib`, in its own venv: bench/_peers.py) use
the same MiniLM embeddings and folds (fit on train + val). All metrics come from
fusion_lightning.query.metrics. Task-blind columns route with the task inferred from the text.

    python bench/routers.py [--data llmrouter routellm] [--folds 5] [--routers mlp,knn,...] [--quick]

Prints one Markdown table per log (mean ± std over folds) and writes bench/out/routers.md and
routers_<log>.csv. Targets (issue 12): on every log router_auto's gap closed ≥ task-best's − 0.005
and ≥ every peer row; where costs exist, best single's performance at ≤ 0.5× its cost; task-blind
≥ best single + 70% of (task-best − best single) on the LLMRouter logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _folds import fold_logs, query_folds, rescoring_noise, sklearn_routers  # noqa: E402
from _peers import PEER_ROUTERS, llmrouter_peer_choices  # noqa: E402
from _routers_report import BASELINES, throughput, write_tables  # noqa: E402

from fusion_lightning.callbacks.routing_report import costs_known  # noqa: E402
from fusion_lightning.config import compose_recipe, router_names  # noqa: E402
from fusion_lightning.data.datamodule import load_from_config  # noqa: E402
from fusion_lightning.fit import build, run  # noqa: E402
from fusion_lightning.query.base import split_arrays  # noqa: E402
from fusion_lightning.query.metrics import (  # noqa: E402
    cost_to_match,
    decision_choices,
    gap_closed,
    outcome,
    routing_metrics,
    sweep_points,
)
from fusion_lightning.query.peer_metrics import strong_weak_metrics  # noqa: E402

# every registered router (recipes/model/router_<name>.yaml) is a row, and router_auto once more with holdout selection
ROUTERS = (*router_names(), "auto_holdout")
# run only when named: they read token ids, pairs or responses (their own DataModules) and take the longest
ON_REQUEST = ("encoder", "bt", "dc", "cascade")
DEFAULT_ROUTERS = tuple(n for n in ROUTERS if n not in ON_REQUEST)
ENSEMBLE = ("mlp", "knn", "mf", "irt", "graph")  # every embedding router; mean predicted score and cost
OUT = Path(__file__).resolve().parent / "out"
PEER_METRICS = ("apgr", "cpt@50", "cpt@80")  # RouteLLM's, from each router's own test metrics


def random_strong_weak(train, ev, seed: int, draws: int = 50) -> dict:
    """RouteLLM's metrics of a random strong/weak router (APGR 0.5 and CPT(x%) = x in expectation), as the
    mean over `draws` uniform random scores."""
    rng = np.random.default_rng(seed)
    got = [strong_weak_metrics(np.zeros_like(ev.perf), train, ev, win_score=lambda s, w: rng.random(len(ev.perf)))
           for _ in range(draws)]
    return {k: float(np.mean([g[k] for g in got])) for k in PEER_METRICS if all(k in g for g in got)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=["llmrouter", "routellm"],
                   help="logs: a data config name (recipes/data/), optionally =PATH")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routers", default=",".join(DEFAULT_ROUTERS), help=f"choose from {','.join(ROUTERS)}")
    p.add_argument("--peers", default=",".join(PEER_ROUTERS), help="llmrouter-lib routers ('' for none)")
    p.add_argument("--quick", action="store_true", help="2 folds, few epochs: a fast check")
    p.add_argument("--encoder-epochs", type=int, default=2)
    p.add_argument("--encoder-folds", type=int, default=None, help="run the encoder router on the first N folds")
    p.add_argument("--e2e-texts", type=int, default=2000)
    p.add_argument("--no-throughput", action="store_true", help="skip the decisions/s measurements")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    p.add_argument("--encoder", default=None, help="the routers' query encoder (default: the recipes', minilm), e.g. "
                                                   "hf:smollm2-135m or [minilm,hf:smollm2-135m]; name a --tag too")
    p.add_argument("--tag", default="", help="name the outputs routers_<tag>.md / .csv / fold cache (a second "
                                                 "study beside the main table)")
    p.add_argument("--resume", action="store_true", help="reuse the finished folds of an interrupted run "
                                                         "with the same settings")
    a = p.parse_args(argv)
    if a.quick:
        a.folds, a.encoder_epochs, a.e2e_texts = 2, 1, min(a.e2e_texts, 300)
    a.routers = [r for r in a.routers.split(",") if r]
    a.peers = [r for r in a.peers.split(",") if r]
    unknown = set(a.routers) - set(ROUTERS)
    if unknown:
        p.error(f"unknown router(s) {sorted(unknown)}; choose from {', '.join(ROUTERS)}")
    return a


def data_overrides(spec: str) -> list[str]:
    """'routellm' -> ['data=routellm']; 'routellm=/my/dir' adds 'data.path=/my/dir'."""
    name, _, path = spec.partition("=")
    return [f"data={name}", *([f"data.path={path}"] if path else [])]


def recipe(name: str, data: str, run_dir: str, args: argparse.Namespace):
    """The router's recipe as `fit` composes it; the bench only trims epochs in --quick / for the encoder."""
    over = [*data_overrides(data), "logger=none", f"run_dir={run_dir}", f"seed={args.seed}",
            "~callbacks.progress_bar", "~callbacks.routing_report", "+trainer.enable_progress_bar=false",
            *([f"encoder={args.encoder}"] if getattr(args, "encoder", None) else [])]
    if name == "auto_holdout":  # router_auto selecting on the one val split, beside its default (cross-validation)
        name, over = "auto", [*over, "model.selection=holdout"]
    if name == "encoder":
        over += [f"trainer.max_epochs={args.encoder_epochs}", "datamodule.max_length=64"]
    elif args.quick and name != "knn":
        over.append("trainer.max_epochs=5")
    return compose_recipe(f"router_{name}", over)


def train(name: str, data: str, logs, args: argparse.Namespace) -> tuple[L.LightningModule, float]:
    """Exactly what `fit` runs (build, then run: fit, validate and test the best checkpoint) on one fold's
    logs; returns the tested model and the seconds of the whole run."""
    with tempfile.TemporaryDirectory() as tmp:
        r = build(recipe(name, data, tmp, args), logs=logs)
        t0 = time.perf_counter()
        run(r)
        seconds = time.perf_counter() - t0
    return r.model.eval(), seconds


def evaluate(perf_hat: np.ndarray, cost_hat: np.ndarray | None, train, ev, sizes, known: bool) -> dict:
    """Row for the table (performance-first); cost to match best single from the λ sweep where costs exist."""
    m = routing_metrics({"performance_first": perf_hat}, train, ev, sizes)
    row = {"perf": m["perf"], "gap_closed": m["gap_closed"], "cost": m["cost"]}
    if cost_hat is not None and known:
        pts = sweep_points(decision_choices(perf_hat, cost_hat, ev.mask), ev)
        row["cost_to_match"] = cost_to_match(pts, m["best_single/perf"], m["best_single/cost"])
    return row


def choice_row(choice: np.ndarray, ev, m: dict) -> dict:
    """Row for a router known only by its decisions (peers)."""
    o = outcome(choice, ev, "performance_first")
    return {"perf": o["perf"], "cost": o["cost"],
            "gap_closed": gap_closed(o["perf"], m["best_single/perf"], m["oracle/perf"])}


def run_log(data: str, args: argparse.Namespace, saved: Path):
    """Every router, peer and baseline on one log's k folds."""
    cfg = recipe("mlp", data, "/tmp/unused", args)
    logs = load_from_config({**cfg.data, "split": "query",  # pooled; cross-split duplicates kept once
                             "responses": "cascade" in args.routers})  # the cascade scores logged answers
    qm = logs.matrix()
    folds = query_folds(qm, args.folds, args.seed)
    print(f"[{data}] {len(qm):,} queries × {len(qm.models)} models, {len(set(qm.tasks))} tasks; "
          f"{args.folds} folds by query (seed {args.seed})", flush=True)
    rows: dict[str, list[dict]] = defaultdict(list)
    last: dict = {}
    winners: Counter = Counter()
    peer_errors: dict[str, str] = {}
    enc_folds = args.encoder_folds or args.folds
    key = {k: v for k, v in vars(args).items() if k not in ("resume", "threads", "e2e_texts", "data",
                                                              "no_throughput")} | {"log": data}
    done = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    done = done.get("folds", []) if done.get("settings") == key else []
    for f in range(args.folds):
        if f < min(len(done), args.folds - 1):
            for name, row in done[f]["rows"].items():
                rows[name].append(row)
            winners.update(done[f].get("winners", []))
            print(f"[{data} fold {f + 1}/{args.folds}] resumed from {saved}", flush=True)
            continue
        before = {n: len(v) for n, v in rows.items()}
        flogs = fold_logs(logs, qm, folds, f, val_fraction=0.1, seed=args.seed)
        dm = instantiate(cfg.datamodule, logs=flogs, _convert_="all")
        dm.setup("fit")
        train_a, ev = split_arrays(dm.splits["train"].tensors), split_arrays(dm.splits["test"].tensors)
        sizes = dm.model_kwargs()["model_sizes"]
        known = costs_known(train_a, ev)
        preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        fold_winners = []
        m = routing_metrics({"performance_first": np.zeros_like(ev.perf)}, train_a, ev, sizes)

        def report(name: str, row: dict, seconds: float | None, fold: int = f) -> None:
            row["train_s"] = seconds
            rows[name].append(row)
            ctm = row.get("cost_to_match")
            print(f"[{data} fold {fold + 1}/{args.folds}] {name:<15} gap_closed {row['gap_closed']:+.3f}  "
                  f"perf {row['perf']:.3f}  cost/best {'—' if ctm is None else f'{ctm:.2f}'}  "
                  f"train {seconds or 0:.1f}s", flush=True)

        for name in args.routers:
            if name == "encoder" and f >= enc_folds:
                continue
            module, sec = train(name, data, flogs, args)
            out = module.eval_outputs["test"]
            assert np.array_equal(out["eval"].perf, ev.perf), "test order differs"
            if name == "cascade":  # routes by answers, paying every call: its own outcome, not argmax of scores
                row = {k: out["metrics"][k] for k in ("perf", "cost", "gap_closed")}
                if known and "points" in out:
                    row["cost_to_match"] = cost_to_match(out["points"], m["best_single/perf"], m["best_single/cost"])
            else:
                preds[name] = (out["perf_hat"].astype(np.float64), out["cost_hat"].astype(np.float64))
                row = evaluate(*preds[name], train_a, ev, sizes, known)
            row.update({k: out["metrics"].get(k) for k in PEER_METRICS})
            row["task_blind_gap_closed"] = out["metrics"].get("task_blind/gap_closed")
            m = out["metrics"]
            if name in ("auto", "auto_holdout"):
                fold_winners.append(("holdout:" if name == "auto_holdout" else "") + module.selection["winner"])
            report(name, row, sec)
            last[name] = module
        members = [n for n in ENSEMBLE if n in preds]
        if len(members) > 1:
            p = np.mean([preds[n][0] for n in members], 0)
            c = np.mean([preds[n][1] for n in members], 0)
            report("ensemble", evaluate(p, c, train_a, ev, sizes, known), sum(rows[n][-1]["train_s"] for n in members))
        for sk in sklearn_routers(args.seed):
            scores, sec = sk.fit(dm.splits, len(qm.models))
            report(sk.name, evaluate(scores, None, train_a, ev, sizes, known), sec)
            last[sk.name] = sk
        if args.peers:
            fit_sets = [dm.splits[s].tensors for s in ("train", "val")]
            y = np.vstack([np.where(t["mask"].numpy(), t["perf"].numpy(), np.nan) for t in fit_sets])
            choices, secs, errors = llmrouter_peer_choices(
                np.vstack([t["x"].numpy() for t in fit_sets]), y, np.vstack([t["cost"].numpy() for t in fit_sets]),
                np.concatenate([t["task"].numpy() for t in fit_sets]), dm.splits["test"].tensors["x"].numpy(),
                dm.splits["test"].tensors["task"].numpy(), list(qm.models), dm.description_embeddings()["models"],
                args.seed, routers=args.peers)
            peer_errors.update(errors)
            for r, choice in choices.items():
                report(f"llmrouter_{r}", choice_row(choice, ev, m), secs.get(r))
        for b in BASELINES:
            rows[b].append({"perf": m[f"{b}/perf"], "cost": m[f"{b}/cost"],
                            "gap_closed": gap_closed(m[f"{b}/perf"], m["best_single/perf"], m["oracle/perf"])})
        rows["random"][-1].update(random_strong_weak(train_a, ev, args.seed))
        if "task_blind/task_best/gap_closed" in m:
            rows["task_best (inferred task)"].append({"perf": m["task_blind/task_best/perf"], "cost": None,
                                                      "gap_closed": m["task_blind/task_best/gap_closed"]})
        print(f"[{data} fold {f + 1}/{args.folds}] baselines: " + "  ".join(
            f"{b} {rows[b][-1]['perf']:.3f}" for b in BASELINES), flush=True)
        winners.update(fold_winners)
        last["dm"] = dm
        if "encoder" in last:
            last["edm"] = last["encoder"].trainer.datamodule
        done = done[:f] + [{"rows": {n: v[-1] for n, v in rows.items() if len(v) > before.get(n, 0)},
                            "winners": fold_winners}]
        OUT.mkdir(exist_ok=True)
        saved.write_text(json.dumps({"settings": key, "folds": done}))
    return {"rows": rows, "last": last, "qm": qm, "winners": winners, "peer_errors": peer_errors,
            "costs_known": known, "logs": logs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    t0 = time.perf_counter()
    results = {}
    for spec in args.data:
        name = spec.partition("=")[0]
        results[name] = run_log(spec, args, OUT / f"routers_folds_{name}{'_' + args.tag if args.tag else ''}.json")
    tp = {} if args.no_throughput else throughput(results[args.data[0].partition("=")[0]], args)
    extra = {}
    if "llmrouter" in results:
        extra["llmrouter"] = rescoring_noise(compose_recipe("router_mlp", ["data=llmrouter"]).data.path)
    md = write_tables(results, tp, args, extra, OUT)
    print("\n" + md)
    print(f"wrote {OUT / ('routers' + ('_' + args.tag if args.tag else '') + '.md')} "
          f"({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
