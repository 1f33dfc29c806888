"""Helpers for bench/routers.py: throughput timing and the per-log Markdown / CSV tables."""

from __future__ import annotations

import argparse
import csv
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _folds import mean_ci, mean_std, rate, sklearn_routers

from fusion_lightning.config import router_names
from fusion_lightning.data.encoders import SentenceTransformerEncoder
from fusion_lightning.query.router import Router

BASELINES = ("best_single", "task_best", "oracle", "random")
# router_auto's two selections first, then every registered router (recipes/model/router_<name>.yaml), then the ensemble
ROUTER_ORDER = ("auto", "auto_holdout", *(n for n in router_names() if n != "auto"), "ensemble")
NOTES = {
    "auto": "router_auto, 5-fold cross-validated selection (selected per fold: {winners})",
    "auto_holdout": "router_auto selecting on the one val split (model.selection=holdout; per fold: {winners_holdout})",
    "residual": "per-task lookup + α·MLP residual, α on val",
    "encoder": "MiniLM fine-tuned: {ep} epoch(s), max_length 64{folds}; cached = token ids",
    "ensemble": "mean predicted score/cost of mlp, knn, mf, irt, graph",
    "sk_knn_clf": "KNeighborsClassifier(10) on argmax labels, the run's features",
    "sk_mlp_reg": "MLPRegressor(128) multi-output, the run's features",
    "sk_linear_svr": "LinearSVR per model, the run's features",
    "sk_logreg_task": "LogisticRegression per model, the run's features + task one-hot, score ≥ 0.5",
    "bt": "Bradley–Terry, similarity-weighted (RouteLLM sw_ranking), pairs derived from scores",
    "dc": "RouterDC: dual contrastive, projection head over MiniLM",
    "cascade": "cheapest first, escalate when the answer scorer rejects; cost counts every call",
    "random": "expectation over models; APGR/CPT: mean of 50 random strong/weak scorings",
    "task_best (inferred task)": "the per-task lookup keyed by the task inferred from the text",
}
PEER_NOTE = "llmrouter-lib 0.4.0, its own {r} router and training code on our MiniLM embeddings"


def throughput(result: dict, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Decisions/s from cached features (100k rows, batch 4096) and end to end from text vs the encoder."""
    last, qm = result["last"], result["qm"]
    dm, rng = last["dm"], np.random.default_rng(args.seed)
    t = dm.splits["test"].tensors
    idx = torch.from_numpy(rng.integers(0, len(t["x"]), 100_000))
    x, task = t["x"][idx], t["task"][idx]
    out: dict[str, dict[str, float]] = defaultdict(dict)
    routers = {n: Router(last[n]) for n in ROUTER_ORDER if n in last}
    for name, r in routers.items():
        feats = last["edm"].splits["test"].tensors["x"][idx] if name == "encoder" else x
        probe = 256 if name in ("encoder", "graph") else 4096
        out[name]["dps"] = rate(lambda n, r=r, f=feats: r.route_embeddings(f[:n], task[:n], batch_size=4096),
                                len(idx), probe=probe)
        print(f"throughput {name}: {out[name]['dps']:,.0f} decisions/s (cached features)", flush=True)
    xn = x.numpy()
    for sk in sklearn_routers(args.seed):
        if sk.name in last:
            s = last[sk.name]
            feats = np.hstack([xn, np.eye(len(dm.tasks), dtype=np.float32)[task.numpy()]]) if s.task_onehot else xn
            out[sk.name]["dps"] = rate(lambda n, s=s, f=feats: s.predict(f[:n]).argmax(1), len(idx))

    # end to end: text -> decision (the task inferred from the text), next to the encoder alone
    pick = rng.choice(len(qm), min(args.e2e_texts, len(qm)), replace=False)
    texts = [qm.queries[i] for i in pick]
    enc = SentenceTransformerEncoder("minilm")
    enc.encode(texts[:64])  # load + warm up

    def encoder_alone() -> float:
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=64)
        return time.perf_counter() - t0

    enc_s = encoder_alone()
    e2e = {}
    for name in [n for n in ("auto", "mlp", "encoder") if n in routers]:
        t0 = time.perf_counter()
        Router(routers[name].module, enc).route(texts, batch_size=64)
        e2e[name] = time.perf_counter() - t0
    enc_s = min(enc_s, encoder_alone())  # the encoder's best of a run before and after
    for name, sec in e2e.items():
        out[name]["e2e_ratio"] = enc_s / sec
        print(f"end to end {name}: {len(texts) / sec:,.1f} texts/s = {enc_s / sec:.2f}× the encoder's", flush=True)
    return out


def _order(rows: dict) -> list[str]:
    ours = [n for n in ROUTER_ORDER if n in rows]
    peers = [n for n in rows if n.startswith("llmrouter_")]
    sk = [n for n in rows if n.startswith("sk_")]
    return [*ours, *peers, *sk, *BASELINES, *(["task_best (inferred task)"] if "task_best (inferred task)" in rows
                                             else [])]


def log_table(name: str, result: dict, tp: dict, args: argparse.Namespace) -> tuple[str, list[dict]]:
    rows, known = result["rows"], result["costs_known"]
    def named(holdout: bool) -> str:
        picks = [(w.removeprefix("holdout:"), c) for w, c in result["winners"].most_common()
                 if w.startswith("holdout:") == holdout]
        return ", ".join(f"{w} ×{c}" for w, c in picks) or "—"

    winners, winners_holdout = named(False), named(True)
    peer = any(r.get("apgr") is not None for rs in rows.values() for r in rs)  # RouteLLM's metrics measured
    head = ["router", "folds", "perf", "gap closed", "task-blind gap closed", "cost (µ$/query)",
            "cost to match best single", *(["APGR", "CPT(50%)", "CPT(80%)"] if peer else []), "fit s",
            "decisions/s (cached)", "end to end / encoder", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    records = []
    for n in _order(rows):
        rs = rows[n]
        ctm = [r.get("cost_to_match") for r in rs if "cost_to_match" in r]
        reached = sum(c is not None for c in ctm)
        if not known:
            ctm_s = "costs unknown" if n not in BASELINES else "—"
        else:
            ctm_s = "—" if not ctm else mean_ci([c for c in ctm if c is not None], "{:.2f}") + \
                ("" if reached == len(ctm) else f" (reached {reached}/{len(ctm)})")
        note = NOTES.get(n, PEER_NOTE.format(r=n.removeprefix("llmrouter_")) if n.startswith("llmrouter_") else "")
        note = note.format(ep=args.encoder_epochs, winners=winners, winners_holdout=winners_holdout,
                           folds="" if len(rs) == args.folds else f"; {len(rs)} of {args.folds} folds")
        costs = [r["cost"] * 1e6 for r in rs if r.get("cost") is not None]
        rec = {"router": f"**{n}**" if n == "auto" else n, "folds": len(rs),
               "perf": mean_std([r["perf"] for r in rs]), "gap_closed": mean_std([r["gap_closed"] for r in rs]),
               "task_blind": mean_std([r.get("task_blind_gap_closed") for r in rs]),
               "cost": mean_std(costs, "{:.1f}") if known else "—", "cost_to_match": ctm_s,
               **({k: mean_std([r.get(k) for r in rs]) for k in ("apgr", "cpt@50", "cpt@80")} if peer else {}),
               "train_s": mean_std([r.get("train_s") for r in rs], "{:.1f}"),
               "dps": f"{tp[n]['dps']:,.0f}" if "dps" in tp.get(n, {}) else "—",
               "e2e": f"{tp[n]['e2e_ratio']:.2f}×" if "e2e_ratio" in tp.get(n, {}) else "—", "notes": note}
        records.append(rec)
        lines.append("| " + " | ".join(str(v) for v in rec.values()) + " |")
    lines += ["", "fit s: our routers, the whole `fit` run (train, validate and test the best checkpoint); the "
              "peers and the ensemble, their training.", "", *verdicts(rows, result)]
    if result["peer_errors"]:
        lines += ["", "Peers that did not run: " + "; ".join(f"{k}: {v}" for k, v in result["peer_errors"].items())]
    return "\n".join(lines), records


def _paired(rows: dict, a: str, b: str) -> list[float]:
    return [x["gap_closed"] - y["gap_closed"] for x, y in zip(rows[a], rows[b], strict=False)]


def verdicts(rows: dict, result: dict) -> list[str]:
    """The issue's targets, in words, from the same folds."""
    if "auto" not in rows:
        return []
    out = []
    d = _paired(rows, "auto", "task_best")
    out.append(f"- router_auto − task-best, gap closed on the same folds: {mean_std(d)} (higher on "
               f"{sum(x > 0 for x in d)} of {len(d)} folds; target ≥ −0.005: "
               f"{'met' if np.mean(d) >= -0.005 else 'not met'})")
    peers = [n for n in rows if n.startswith(("llmrouter_", "sk_"))]
    if peers:
        worse = [n for n in peers if np.mean(_paired(rows, "auto", n)) < 0]
        out.append(f"- router_auto vs every peer row: {'above all' if not worse else 'below ' + ', '.join(worse)}")
    if result["costs_known"]:
        ctm = [r.get("cost_to_match") for r in rows["auto"]]
        ok = [c for c in ctm if c is not None]
        out.append(f"- router_auto reaches best single's performance at {mean_ci(ok, '{:.2f}')}× its cost (95% CI) "
                   f"(reached on {len(ok)} of {len(ctm)} folds; target ≤ 0.5×)")
    tb = [r.get("task_blind_gap_closed") for r in rows["auto"]]
    need = [0.7 * r["gap_closed"] for r in rows["task_best"]]
    if all(v is not None for v in tb):
        out.append(f"- task-blind router_auto gap closed {mean_std(tb)}; 70% of task-best's is "
                   f"{mean_std(need)} ({'met' if np.mean(tb) >= np.mean(need) else 'not met'})")
    return out


def write_tables(results: dict, tp: dict, args: argparse.Namespace, extra: dict, out: Path) -> str:
    tag = f"_{args.tag}" if getattr(args, "tag", "") else ""
    parts = []
    for name, result in results.items():
        qm = result["qm"]
        md, records = log_table(name, result, tp if name == next(iter(results)) else {}, args)
        parts.append(f"## {name}: {len(qm):,} queries × {len(qm.models)} models, {len(set(qm.tasks))} tasks, "
                     f"{args.folds}-fold CV by query{'' if result['costs_known'] else ' (costs unknown)'}\n\n{md}")
        if name in extra:
            n = extra[name]
            parts[-1] += (f"\n\nRe-scoring noise: {n['queries']} queries are scored twice in the source (train and "
                          f"test files): {n['scores_differ']:.1%} of their (query, model) scores differ, on "
                          f"{n['queries_differing']:.0%} of the queries. Routing each by its other copy's scores "
                          f"closes {n['copy_oracle_gap_closed']:.2f} of the gap on them.")
        out.mkdir(exist_ok=True)
        with (out / f"routers_{name}{tag}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    md = "\n\n".join(parts) + "\n"
    (out / f"routers{tag}.md").write_text(md)
    return md
