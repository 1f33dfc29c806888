"""bench/bandit.py's loop: R rounds of serve (the current router with ε exploration) → reveal the chosen call
→ retrain (naively or on DR pseudo-rewards), scored on a held-out test fold with full information."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _bandit_log import SETTING, FullLog, md_table, recipe

from fusion_lightning.data.bandit import draw, logging_probabilities
from fusion_lightning.data.logtable import LogTable, _stratified_assign
from fusion_lightning.fit import build
from fusion_lightning.query.base import split_arrays
from fusion_lightning.query.metrics import RoutingArrays, baseline_choices, choose, gap_closed
from fusion_lightning.query.router import Router, load_router_module


# -- 3. the loop -----------------------------------------------------------------------------------------
def fit_router(log: FullLog, table: LogTable, method: str, args: argparse.Namespace) -> tuple[Router, object]:
    """The MLP router trained on `table` (train/val splits; no test run), loaded from its best checkpoint;
    also its DataModule (the train split's targets, as the off-policy method built them)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = build(recipe("mlp", log.spec, tmp, args, args.loop_epochs, (f"datamodule.off_policy={method}",)),
                  logs=table)
        r.trainer.fit(r.model, datamodule=r.datamodule)
        best = r.trainer.checkpoint_callback.best_model_path
        module = load_router_module(best) if best else r.model.eval()
    return Router(module), r.datamodule


def route_scores(router: Router, log: FullLog, rows: np.ndarray) -> np.ndarray:
    """[len(rows), M] the router's predicted reward, in the log's column order (−inf for a model it lacks)."""
    res = router.route_embeddings(log.feats[rows], router.task_ids(log.tasks[rows].tolist(), len(rows)))
    where = {m: i for i, m in enumerate(res.candidates)}
    out = np.full((len(rows), len(log.models)), -np.inf)
    for j, name in enumerate(log.models):
        if name in where:
            out[:, j] = res.scores[:, where[name]]
    return out


def lookup_choice(dm, log: FullLog, rows: np.ndarray) -> np.ndarray:
    """The per-task lookup learned from a DataModule's train split (its targets: the logged calls under
    direct, DR pseudo-rewards under dr), routing `rows`; columns in the log's order."""
    train = split_arrays(dm.splits["train"].tensors)
    cols = np.array([log.models.index(m) for m in dm.matrices["train"].models], np.int64)
    index = {t: i for i, t in enumerate(dm.tasks)}
    p = log.perf[np.ix_(rows, cols)]
    ev = RoutingArrays(p, np.zeros_like(p), p, np.zeros_like(p), log.mask[np.ix_(rows, cols)],
                       np.array([index.get(t, 0) for t in log.tasks[rows]], np.int64))
    return cols[baseline_choices(train, ev, SETTING, dm.model_kwargs()["model_sizes"])["task_best"]]


def loop_study(log: FullLog, args: argparse.Namespace) -> tuple[list[dict], dict]:
    n, m = log.perf.shape
    test = np.flatnonzero(log.folds == 0)
    pool = np.flatnonzero(log.folds != 0)
    texts = np.array(log.qm.queries, dtype=object)
    role = _stratified_assign(texts[pool], log.tasks[pool].astype(object), {"val": 0.1}, args.seed, "train")
    split_of = np.full(n, "test", dtype=object)
    split_of[pool] = role
    best = int(log.perf[pool].mean(0).argmax())  # best single on the (full-information) train pool
    bs = float(log.perf[test, best].mean())
    orc = float(log.oracle[test].mean())

    def gap(choice: np.ndarray) -> tuple[float, float]:
        perf = float(log.perf[test, choice].mean())
        return perf, gap_closed(perf, bs, orc)

    t0 = time.perf_counter()
    # the ceiling: every call of the train pool (a full-information log; off_policy is moot there)
    full = log.full_table(pool, split_of)
    ceiling_router, ceiling_dm = fit_router(log, full, "direct", args)
    ceiling = gap(choose(route_scores(ceiling_router, log, test), log.mask[test]))
    lookup_full = gap(lookup_choice(ceiling_dm, log, test))
    print(f"[{log.name} loop] test fold {len(test)} queries, train pool {len(pool)}; best single "
          f"{bs:.3f}, oracle {orc:.3f}; ceiling (MLP on the full train log) perf {ceiling[0]:.3f} gap "
          f"{ceiling[1]:+.3f}; lookup (full log) gap {lookup_full[1]:+.3f} ({time.perf_counter() - t0:.1f}s)",
          flush=True)
    variants = [(f"{lbl} ε={eps:g}", method, eps) for lbl, method in (("naive", "direct"), ("DR", "dr"))
                for eps in (0.0, args.explore)]
    rows = []
    for ls in range(args.loop_seeds):
        order = np.random.default_rng([args.seed, ls, 99]).permutation(pool)
        batches = np.array_split(order, args.rounds)
        for name, method, eps in variants:
            router = None
            served, chosen_all, prop_all, round_all = [], [], [], []
            regret = explore_cost = 0.0
            for r, batch in enumerate(batches):
                t1 = time.perf_counter()
                scores = None if router is None else route_scores(router, log, batch)
                probs = logging_probabilities(scores, log.mask[batch], eps if scores is not None else 0.0)
                chosen = draw(probs, np.random.default_rng([args.seed, ls, r]))
                regret += float((log.oracle[batch] - log.perf[batch, chosen]).sum())
                if scores is not None:  # expected regret paid for exploring, vs the same router acting greedily
                    greedy = log.perf[batch, choose(scores, log.mask[batch])]
                    explore_cost += float((greedy - (probs * log.perf[batch]).sum(1)).sum())
                served.append(batch)
                chosen_all.append(chosen)
                prop_all.append(probs[np.arange(len(batch)), chosen])
                round_all.append(np.full(len(batch), r))
                rev = np.concatenate(served)
                table = log.bandit_table(rev, np.concatenate(chosen_all), np.concatenate(prop_all), split_of,
                                         np.concatenate(round_all), [f"round{i}" for i in range(args.rounds)])
                router, dm = fit_router(log, table, method, args)
                perf, g = gap(choose(route_scores(router, log, test), log.mask[test]))
                lk_perf, lk_gap = gap(lookup_choice(dm, log, test))
                rows.append({"loop_seed": ls, "variant": name, "method": method, "epsilon": eps, "round": r + 1,
                             "served": len(rev), "cum_regret": regret, "regret_per_query": regret / len(rev),
                             "cum_explore_cost": explore_cost,
                             "test_perf": perf, "test_gap": g, "lookup_perf": lk_perf, "lookup_gap": lk_gap,
                             "ceiling_gap": ceiling[1], "lookup_full_gap": lookup_full[1], "best_single": bs,
                             "oracle": orc})
                print(f"[{log.name} loop {ls + 1}/{args.loop_seeds}] {name:<12} round {r + 1}/{args.rounds}: served "
                      f"{len(rev)}, cumulative regret {regret:.1f}, test gap {g:+.3f} (lookup from the same log "
                      f"{lk_gap:+.3f}) ({time.perf_counter() - t1:.1f}s)", flush=True)
    ref = {"ceiling_perf": ceiling[0], "ceiling_gap": ceiling[1], "lookup_full_perf": lookup_full[0],
           "lookup_full_gap": lookup_full[1], "best_single": bs, "oracle": orc, "test_queries": len(test),
           "train_queries": len(pool),
           "uniform_regret_per_query": float((log.oracle[pool] - log.perf[pool].mean(1)).mean())}
    return rows, ref


def loop_summary(rows: list[dict], ref: dict, args: argparse.Namespace) -> dict:
    """Final-round (whole train split served once) means over loop seeds, and the loop's targets."""
    last = [r for r in rows if r["round"] == args.rounds]
    by: dict[str, list[dict]] = defaultdict(list)
    for r in last:
        by[r["variant"]].append(r)
    fin = {v: {k: float(np.mean([r[k] for r in rs])) for k in ("test_gap", "lookup_gap", "cum_regret", "test_perf", "cum_explore_cost")}
           | {f"{k}_sd": float(np.std([r[k] for r in rs])) for k in ("test_gap", "cum_regret")}
           for v, rs in by.items()}
    out = {"final": fin, "reference": ref, "checks": {}}
    for eps in (0.0, args.explore):
        dr, nv = fin[f"DR ε={eps:g}"], fin[f"naive ε={eps:g}"]
        out["checks"][f"ε={eps:g}"] = {
            "dr_ge_naive": dr["test_gap"] >= nv["test_gap"], "dr_ge_lookup_same_log": dr["test_gap"] >= dr["lookup_gap"],
            "dr_gap": dr["test_gap"], "naive_gap": nv["test_gap"], "lookup_same_log_gap": dr["lookup_gap"],
            "dr_distance_to_ceiling": ref["ceiling_gap"] - dr["test_gap"]}
    out["exploration_lowers_regret"] = {
        lbl: fin[f"{lbl} ε={args.explore:g}"]["cum_regret"] < fin[f"{lbl} ε=0"]["cum_regret"] for lbl in ("naive", "DR")}
    return out


def loop_md(rows: list[dict], ref: dict) -> str:
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["variant"], r["round"])].append(r)
    body = []
    for (v, rd), rs in by.items():
        def ms(k: str, fmt: str = "{:+.3f}", rs: list[dict] = rs) -> str:
            vals = [x[k] for x in rs]
            return fmt.format(np.mean(vals)) + (f" ± {fmt.format(np.std(vals)).lstrip('+')}" if len(vals) > 1 else "")
        body.append([v, rd, rs[0]["served"], ms("cum_regret", "{:.1f}"), ms("test_perf", "{:.3f}"), ms("test_gap"),
                     ms("lookup_gap")])
    body.append(["ceiling (MLP, full train log)", "—", ref["train_queries"], "—", f"{ref['ceiling_perf']:.3f}",
                 f"{ref['ceiling_gap']:+.3f}", f"{ref['lookup_full_gap']:+.3f} (full log)"])
    return md_table(["variant", "round", "served", "cumulative regret", "test perf", "test gap closed",
                     "lookup from the same log: gap"], body)


def plot_loop(rows: list[dict], ref: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        rounds = sorted({r["round"] for r in rs})
        reg = [np.mean([r["cum_regret"] for r in rs if r["round"] == k]) for k in rounds]
        gp = [np.mean([r["test_gap"] for r in rs if r["round"] == k]) for k in rounds]
        lk = [np.mean([r["lookup_gap"] for r in rs if r["round"] == k]) for k in rounds]
        style = "-" if v.startswith("DR") else "--"
        a.plot(rounds, reg, style, marker="o", label=v)
        line = b.plot(rounds, gp, style, marker="o", label=v)[0]
        if v.startswith("DR"):
            b.plot(rounds, lk, ":", color=line.get_color(), alpha=0.7, label=f"lookup ({v})")
    b.axhline(ref["ceiling_gap"], color="k", lw=1, label="ceiling (full train log)")
    b.axhline(0.0, color="grey", lw=0.5)
    for ax in (a, b):
        ax.set_xticks(sorted({r["round"] for r in rows}))
    a.set(xlabel="round", ylabel="cumulative regret (served queries)", title=f"{title}: regret")
    b.set(xlabel="round", ylabel="test gap closed", title=f"{title}: test gap closed")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
