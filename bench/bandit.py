"""Off-policy evaluation and learning on bandit logs simulated from full-information logs (issue 24).

Each full log (`--data llmrouter routellm`, pooled: a query in two files is kept once) is turned into
bandit logs whose truth the full log still holds:

1. **Estimator accuracy.** The targets (the per-task lookup, the MLP, kNN and MF routers, best single)
   are trained with full information on K-1 folds and route the held-out fold (K-fold cross-fitting,
   so every query has each target's held-out choice). Per seed, each logger's choice per query is drawn:
   uniform; ε-greedy on an MLP router trained on other folds than the target it is compared with (fold
   f is logged by the MLP trained without fold f+1); ε-greedy on that MLP's score relative to each
   model's mean score (it prefers different models per query even where one model wins nearly
   everywhere, as on RouteLLM's GSM8K). Then the cross-fitted ridge reward model is fitted on the
   MiniLM embeddings + task of the logged calls, and the naive mean, DM, IPS, SNIPS and DR estimate
   each target's mean performance with paired bootstrap intervals. The truth is the target's mean
   performance on the full log. Bias, RMSE, 95% coverage and CI width per
   (logger, target, estimator) over the seeds.
2. **Open Bandit Pipeline cross-check.** OBP's Replay (naive), DM, IPS, SNIPS and DR on the same draws,
   propensities and reward-model predictions, in OBP's own venv (bench/_obp_check.py).
3. **The loop.** A test fold is held out; the rest (train) is cut into R batches, served one per round
   by the current router with ε exploration (round 0: uniform); only the chosen call's logged score is
   revealed, with its propensity; the MLP router is retrained on everything revealed so far, naively
   (`datamodule.off_policy=direct`) or on DR pseudo-rewards (`datamodule.off_policy=dr`). Per round:
   cumulative regret of the served queries (oracle minus chosen, full log) and the router's gap closed
   on the test fold (full information), beside the per-task lookup learned from the same bandit log
   and the MLP trained on the full train log (the ceiling).

    python bench/bandit.py [--data llmrouter routellm] [--seeds 20] [--folds 5] [--rounds 5] [--quick]

Writes bench/out/bandit/: estimators_<log>.csv, obp_<log>.csv, loop_<log>.csv, loop_<log>.png, bandit.md
(every table, also printed) and summary.json (the numbers and whether issue 24's targets are met).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bandit_log import (  # noqa: E402
    SETTING,
    FullLog,
    md_table,
    predict_all,
    quiet,
    recipe,
    write_csv,
    yes,
)
from _bandit_loop import loop_md, loop_study, loop_summary, plot_loop  # noqa: E402
from _folds import fold_logs  # noqa: E402

from fusion_lightning.data.bandit import draw, logging_probabilities  # noqa: E402
from fusion_lightning.fit import build, run  # noqa: E402
from fusion_lightning.query.base import split_arrays  # noqa: E402
from fusion_lightning.query.metrics import baseline_choices, choose  # noqa: E402
from fusion_lightning.query.ope import (  # noqa: E402
    Bootstrap,
    cross_fit_rewards,
    effective_sample_size,
    estimate_all,
    one_hot,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "bandit"
ROUTERS = ("mlp", "knn", "mf")  # trained targets; the lookup and best single come from the same folds
TARGETS = ("lookup", "mlp", "knn", "mf", "best_single")
ESTIMATORS = ("naive", "dm", "ips", "snips", "dr")
OBP_PYTHON = HERE / "out" / "obp_venv" / "bin" / "python"
OBP_SCRIPT = HERE / "_obp_check.py"
# obp 0.5.7 (the last release) declares Python < 3.11 and pins numpy/pandas/scikit-learn/Pillow/PyYAML
# versions without 3.11 wheels: install it without its dependency pins, beside the 3.11-compatible
# releases of what it imports (torch from the CPU wheel: obp.policy imports it).
OBP_VENV_HELP = (
    "python3 -m venv bench/out/obp_venv && bench/out/obp_venv/bin/pip install numpy==1.23.5 scipy==1.9.3 "
    "scikit-learn==1.1.3 pandas==1.5.2 'seaborn<0.12' 'matplotlib<3.8' tqdm pyyaml 'mypy-extensions<0.5' "
    "torch==2.13.0 && bench/out/obp_venv/bin/pip install --no-deps --ignore-requires-python obp==0.5.7"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=["llmrouter", "routellm"],
                   help="full-information logs: a data config name (recipes/data/), optionally =PATH")
    p.add_argument("--seeds", type=int, default=20, help="bandit draws per logger (estimator accuracy)")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the targets; the loop's test fold")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the serve -> reveal -> retrain loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epsilon", type=float, default=0.2, help="exploration of the skewed (router) logger")
    p.add_argument("--explore", type=float, default=0.1, help="the loop's exploration ε (beside ε = 0)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per estimate")
    p.add_argument("--loop-seeds", type=int, default=5, help="repetitions of the loop (different draws and batches)")
    p.add_argument("--loop-epochs", type=int, default=20, help="max epochs of each retraining in the loop")
    p.add_argument("--obp-seeds", type=int, default=2, help="draws per logger cross-checked against OBP")
    p.add_argument("--no-obp", action="store_true", help="skip the Open Bandit Pipeline cross-check")
    p.add_argument("--no-loop", action="store_true", help="skip the loop (e.g. to run the estimators with more seeds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--quick", action="store_true",
                   help="a small synthetic log (300 queries, 4 models, hashing encoder), 3 seeds, 2 folds, "
                        "2 rounds, no OBP: a fast check")
    a = p.parse_args(argv)
    a.target_epochs = None  # the recipes' defaults
    if a.quick:
        a.data, a.seeds, a.folds, a.rounds, a.no_obp = ["synthetic"], 3, 2, 2, True
        a.boot, a.loop_seeds, a.loop_epochs, a.target_epochs = 200, 1, 5, 5
    if a.folds < 2 or a.rounds < 1 or a.seeds < 2:
        p.error("--folds >= 2, --rounds >= 1 and --seeds >= 2")
    return a


def cross_fitted_targets(log: FullLog, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Each target's held-out choice per query ([N] column) and the skewed logger's scores ([N, M]: fold f's
    queries scored by the MLP trained without fold f+1, so it differs from every target of fold f)."""
    n, k = len(log.qm), args.folds
    choice = {t: np.full(n, -1, np.int64) for t in TARGETS}
    mlp_all: dict[int, np.ndarray] = {}
    seconds: dict[str, float] = defaultdict(float)
    for f in range(k):
        flogs = fold_logs(log.logs, log.qm, log.folds, f, val_fraction=0.1, seed=args.seed)
        line = []
        for name in ROUTERS:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                r = build(recipe(name, log.spec, tmp, args, args.target_epochs), logs=flogs)
                run(r)
            sec = time.perf_counter() - t0
            seconds[name] += sec
            module, dm = r.model.eval(), r.datamodule
            assert list(dm.matrices["test"].models) == log.models, "column order differs"
            out = module.eval_outputs["test"]
            rows = log.rows_of(dm.matrices["test"])
            choice[name][rows] = choose(out["scores"][SETTING], out["eval"].mask)
            line.append(f"{name} {sec:.1f}s")
            if name == "mlp":
                mlp_all[f] = predict_all(module, dm, log)
                train_a, ev = split_arrays(dm.splits["train"].tensors), out["eval"]
                base = baseline_choices(train_a, ev, SETTING, dm.model_kwargs()["model_sizes"])
                choice["lookup"][rows], choice["best_single"][rows] = base["task_best"], base["best_single"]
        acc = "  ".join(f"{t} {log.perf[rows, choice[t][rows]].mean():.3f}" for t in TARGETS)
        print(f"[{log.name} fold {f + 1}/{k}] trained {', '.join(line)}; held-out perf: {acc}", flush=True)
    assert all((c >= 0).all() for c in choice.values()), "a query has no held-out choice"
    logger = np.empty((n, len(log.models)))
    for f in range(k):
        rows = log.folds == f
        logger[rows] = mlp_all[(f + 1) % k][rows]
    return choice, logger, dict(seconds)


# -- estimator accuracy ----------------------------------------------------------------------------------
def loggers(log: FullLog, logger_scores: np.ndarray, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """[N, M] probabilities of each logger: uniform; ε-greedy on the MLP's predicted score (`mlp`); ε-greedy on
    the MLP's predicted score minus that model's mean predicted score (`mlp-relative`: each model where it is
    relatively strongest, so the choice varies per query even where one model wins nearly everywhere)."""
    relative = logger_scores - logger_scores.mean(0, keepdims=True)
    return {"uniform": logging_probabilities(None, log.mask),
            f"mlp ε={args.epsilon:g}": logging_probabilities(logger_scores, log.mask, args.epsilon),
            f"mlp-relative ε={args.epsilon:g}": logging_probabilities(relative, log.mask, args.epsilon)}


def estimator_study(log: FullLog, choice: dict[str, np.ndarray], probs: dict[str, np.ndarray],
                    args: argparse.Namespace) -> tuple[list[dict], dict, list[dict]]:
    """Per seed and logger: draw, fit the reward model, estimate every target; returns (per-seed records,
    truth per target, the draws kept for the OBP cross-check)."""
    n, m = log.perf.shape
    rows = np.arange(n)
    truth = {t: float(log.perf[rows, c].mean()) for t, c in choice.items()}
    pis = {t: one_hot(c, m) for t, c in choice.items()}
    records, kept = [], []
    splits = np.full(n, "test")
    for s in range(args.seeds):
        t0 = time.perf_counter()
        parts = []
        for li, (lname, p) in enumerate(probs.items()):
            rng = np.random.default_rng([args.seed, s, li])
            chosen = draw(p, rng)
            mask = one_hot(chosen, m).astype(bool)
            prop = np.where(mask, p, np.nan)
            y = np.where(mask, log.perf, np.nan)
            y_hat = cross_fit_rewards(log.feats, log.tasks, {"perf": y}, mask, splits, folds=5, seed=args.seed + s,
                                      bounds={"perf": (0.0, 1.0)})["perf"]
            boot = Bootstrap(n, args.boot, seed=args.seed + s)
            ours = {}
            for t, pi in pis.items():
                est = estimate_all(pi, y, y_hat, mask, prop, boot)
                ess = effective_sample_size(pi, mask, prop)
                unsupported = float((pi * (p <= 0)).sum() / n)
                ours[t] = {k: e.value for k, e in est.items()}
                ours[t].update(dr_lo=est["dr"].lo, dr_hi=est["dr"].hi)
                for k, e in est.items():
                    records.append({"seed": s, "logger": lname, "target": t, "estimator": k, "value": e.value,
                                    "lo": e.lo, "hi": e.hi, "se": e.se, "ess": ess, "unsupported": unsupported})
            if s < args.obp_seeds:
                kept.append({"seed": s, "logger": lname, "action": chosen, "reward": log.perf[rows, chosen],
                             "pscore": p[rows, chosen], "qhat": y_hat, "ours": ours})
            dr_err = max(abs(ours[t]["dr"] - truth[t]) for t in pis)
            nv_err = max(abs(ours[t]["naive"] - truth[t]) for t in pis)
            parts.append(f"{lname.split(' ')[0]}: max |DR − truth| {dr_err:.3f}, max |naive − truth| {nv_err:.3f}")
        print(f"[{log.name} seed {s + 1}/{args.seeds}] " + "; ".join(parts) + f" ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    return records, truth, kept


def summarise(records: list[dict], truth: dict[str, float]) -> list[dict]:
    """Per (logger, target, estimator): bias, RMSE, SD, Monte-Carlo SE of the bias, coverage, CI width."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["logger"], r["target"], r["estimator"])].append(r)
    out = []
    for (lg, t, k), rs in groups.items():
        v = np.array([r["value"] for r in rs])
        lo, hi = np.array([r["lo"] for r in rs]), np.array([r["hi"] for r in rs])
        err = v - truth[t]
        sd = float(v.std(ddof=1))
        out.append({"logger": lg, "target": t, "estimator": k, "truth": truth[t], "mean": float(v.mean()),
                    "bias": float(err.mean()), "rmse": float(np.sqrt((err ** 2).mean())), "sd": sd,
                    "mcse": sd / np.sqrt(len(v)), "se": float(np.mean([r["se"] for r in rs])),
                    "coverage": float(((lo <= truth[t]) & (truth[t] <= hi)).mean()), "width": float((hi - lo).mean()),
                    "ess": float(np.mean([r["ess"] for r in rs])), "unsupported": float(rs[0]["unsupported"]),
                    "seeds": len(v)})
    lord = {lg: i for i, lg in enumerate(dict.fromkeys(r["logger"] for r in records))}
    return sorted(out, key=lambda r: (lord[r["logger"]], TARGETS.index(r["target"]), ESTIMATORS.index(r["estimator"])))


def estimator_targets(stats: list[dict]) -> dict:
    """Issue 24's targets for the estimators on one log."""
    by = {(r["logger"], r["target"], r["estimator"]): r for r in stats}
    pairs = list(dict.fromkeys((r["logger"], r["target"]) for r in stats))
    supported = [(lg, t) for lg, t in pairs if by[(lg, t, "dr")]["unsupported"] == 0]
    cover = {f"{lg} / {t}": by[(lg, t, "dr")]["coverage"] for lg, t in supported}
    rmse = {f"{lg} / {t}": {"dr": by[(lg, t, "dr")]["rmse"], "ips": by[(lg, t, "ips")]["rmse"]} for lg, t in pairs}
    skewed = {}
    for lg in dict.fromkeys(lg for lg, _ in pairs):
        if lg == "uniform":
            continue
        rows = {t: by[(lg, t, "dr")] for l2, t in pairs if l2 == lg}
        skewed[lg] = {
            "naive_bias": {t: by[(lg, t, "naive")]["bias"] for t in rows},
            "naive_se": {t: by[(lg, t, "naive")]["se"] for t in rows},
            "dr_bias": {t: {"bias": r["bias"], "mcse": r["mcse"], "se_one_estimate": r["se"]} for t, r in rows.items()},
            # within its noise: |mean bias| ≤ one estimate's (bootstrap) SE ...
            "dr_bias_within_se": all(abs(r["bias"]) <= r["se"] for r in rows.values()),
            # ... and, stricter, statistically indistinguishable from 0: ≤ 2 Monte-Carlo SEs (sd over seeds / √seeds)
            "dr_bias_within_2mcse": all(abs(r["bias"]) <= 2 * r["mcse"] for r in rows.values()),
        }
    return {"dr_coverage_ge_90": all(c >= 0.9 for c in cover.values()), "dr_coverage": cover,
            "dr_rmse_le_ips": all(v["dr"] <= v["ips"] for v in rmse.values()), "dr_vs_ips_rmse": rmse,
            "skewed": skewed, "skewed_dr_bias_within_se": all(v["dr_bias_within_se"] for v in skewed.values()),
            "skewed_dr_bias_within_2mcse": all(v["dr_bias_within_2mcse"] for v in skewed.values())}


# -- 2. OBP ----------------------------------------------------------------------------------------------
def obp_check(log: FullLog, kept: list[dict], choice: dict[str, np.ndarray],
              args: argparse.Namespace) -> tuple[list[dict] | None, str]:
    """OBP's estimates on the kept draws, beside ours; (None, why) when OBP is not available."""
    if args.no_obp:
        return None, "skipped (--no-obp / --quick)"
    if not OBP_PYTHON.exists():
        return None, f"skipped: no OBP venv at {OBP_PYTHON}; create it with: {OBP_VENV_HELP}"
    m = len(log.models)
    arrays, cases = {}, []
    for d, k in enumerate(kept):
        arrays.update({f"action_{d}": k["action"], f"reward_{d}": k["reward"], f"pscore_{d}": k["pscore"],
                       f"qhat_{d}": k["qhat"]})
        for t in TARGETS:
            cases.append({"id": f"{d}:{t}", "draw": d, "target": t})
    for t in TARGETS:
        arrays[f"pi_{t}"] = one_hot(choice[t], m)
    arrays["cases"] = np.asarray(json.dumps(cases))
    with tempfile.TemporaryDirectory(prefix="obp_") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(src, **arrays)
        try:
            proc = subprocess.run([str(OBP_PYTHON), str(OBP_SCRIPT), str(src), str(dst)], capture_output=True,
                                  text=True, timeout=1800, check=False)
        except subprocess.TimeoutExpired:
            return None, "skipped: the OBP run timed out"
        if proc.returncode != 0 or not dst.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return None, f"skipped: the OBP script exited {proc.returncode}: {tail}"
        res = json.loads(dst.read_text())
    rows = []
    for c in cases:
        k, got = kept[c["draw"]], res["cases"][c["id"]]
        ours = k["ours"][c["target"]]
        for e in ESTIMATORS:
            rows.append({"logger": k["logger"], "seed": k["seed"], "target": c["target"], "estimator": e,
                         "ours": ours[e], "obp": got[e], "abs_diff": abs(ours[e] - got[e]),
                         **({"ours_lo": ours["dr_lo"], "ours_hi": ours["dr_hi"], "obp_lo": got["dr_lo"],
                             "obp_hi": got["dr_hi"]} if e == "dr" else {})})
    return rows, f"obp {res['obp_version']} (numpy {res['numpy_version']}) in {OBP_PYTHON.parent.parent}"


def estimator_md(stats: list[dict]) -> str:
    """Compact: per (logger, target) the truth, then bias / RMSE / coverage of each estimator, DR's CI width."""
    by = {(r["logger"], r["target"], r["estimator"]): r for r in stats}
    seen = []
    for r in stats:
        if (r["logger"], r["target"]) not in seen:
            seen.append((r["logger"], r["target"]))
    rows = []
    for lg, t in seen:
        cell = [lg, t, f"{by[(lg, t, 'dr')]['truth']:.3f}"]
        for e in ("naive", "ips", "snips", "dm", "dr"):
            s = by[(lg, t, e)]
            cell.append(f"{s['bias']:+.3f} / {s['rmse']:.3f} / {s['coverage']:.0%}")
        d = by[(lg, t, "dr")]
        cell += [f"{d['se']:.3f}", f"{d['width']:.3f}", f"{d['ess']:.0f}"]
        rows.append(cell)
    return md_table(["logger", "target", "truth", "naive", "IPS", "SNIPS", "DM", "DR", "DR SE", "DR CI width",
                     "ESS"], rows)


def obp_md(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ci = (f"[{r['ours_lo']:.3f}, {r['ours_hi']:.3f}] / [{r['obp_lo']:.3f}, {r['obp_hi']:.3f}]"
              if r["estimator"] == "dr" else "")
        body.append([r["logger"], r["seed"], r["target"], r["estimator"], f"{r['ours']:.6f}", f"{r['obp']:.6f}",
                     f"{r['abs_diff']:.1e}", ci])
    return md_table(["logger", "seed", "target", "estimator", "ours", "OBP", "|diff|", "DR 95% CI ours / OBP"], body)


def targets_line(name: str, est: dict, obp: dict | None, loop: dict, args: argparse.Namespace) -> str:
    worst_cov = min(est["dr_coverage"].items(), key=lambda kv: kv[1])
    under = [f"{k} {v:.0%}" for k, v in est["dr_coverage"].items() if v < 0.9]
    worse = [k for k, v in est["dr_vs_ips_rmse"].items() if v["dr"] > v["ips"]]
    ratio = max(v["dr"] / v["ips"] for v in est["dr_vs_ips_rmse"].values())
    text = (f"**{name}**: DR's 95% CIs cover the truth in ≥ 90% of seeds for every target with support: "
            f"{yes(est['dr_coverage_ge_90'])} (" + (f"under 90%: {', '.join(under)}; " if under else "")
            + f"lowest {worst_cov[1]:.0%}: {worst_cov[0]}; {len(est['dr_coverage'])} (logger, target) pairs). "
            f"DR's RMSE ≤ IPS's for every (logger, target): {yes(est['dr_rmse_le_ips'])} (largest DR/IPS RMSE ratio "
            f"{ratio:.2f}" + (f"; DR worse for {', '.join(worse)}" if worse else "") + "). ")
    for lg, v in est["skewed"].items():
        naive = ", ".join(f"{t} {b:+.3f}" for t, b in v["naive_bias"].items())
        worst = max(v["dr_bias"].items(), key=lambda kv: abs(kv[1]["bias"]))
        worst_mc = max(v["dr_bias"].items(), key=lambda kv: abs(kv[1]["bias"]) / max(kv[1]["mcse"], 1e-12))
        text += (f"Skewed logger {lg}: the naive mean's bias {naive}; DR's largest |bias| {worst[1]['bias']:+.4f} "
                 f"({worst[0]}) vs one estimate's SE {worst[1]['se_one_estimate']:.3f}: within it "
                 f"{yes(v['dr_bias_within_se'])}; within 2 Monte-Carlo SEs (sd/√{args.seeds}) for every target "
                 f"{yes(v['dr_bias_within_2mcse'])} (largest |bias|/MCSE {abs(worst_mc[1]['bias']) / max(worst_mc[1]['mcse'], 1e-12):.1f}, "
                 f"{worst_mc[0]}). ")
    lines = [text.strip()]
    if obp is not None:
        lines.append(f"OBP agreement: max |ours − OBP| {obp['max_abs_diff']:.1e} over {obp['cases']} estimates "
                     f"({'agree' if obp['agree'] else 'DIFFER'}).")
    if loop is None:
        return "\n\n".join(lines)
    for eps, c in loop["checks"].items():
        lines.append(f"Loop ({eps}, after the whole train split was served once): DR gap {c['dr_gap']:+.3f} vs naive "
                     f"{c['naive_gap']:+.3f} ({'≥' if c['dr_ge_naive'] else '<'}), vs the lookup from the same bandit "
                     f"log {c['lookup_same_log_gap']:+.3f} ({'≥' if c['dr_ge_lookup_same_log'] else '<'}); distance to "
                     f"the ceiling {c['dr_distance_to_ceiling']:+.3f}.")
    fin = loop["final"]
    e = f"ε={args.explore:g}"
    reg = "; ".join(f"{lbl}: {e} {fin[f'{lbl} {e}']['cum_regret']:.1f} vs ε=0 {fin[f'{lbl} ε=0']['cum_regret']:.1f} "
                    f"(of which exploring cost {fin[f'{lbl} {e}']['cum_explore_cost']:.1f} in expectation; final test "
                    f"gap {fin[f'{lbl} {e}']['test_gap']:+.3f} vs {fin[f'{lbl} ε=0']['test_gap']:+.3f})"
                    for lbl in ("naive", "DR"))
    lines.append(f"Cumulative regret, exploration vs greedy: {reg}. Lower with exploration: "
                 + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in loop["exploration_lowers_regret"].items()) + ".")
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    md = ["# Off-policy evaluation and learning on simulated bandit logs (`bench/bandit.py`)", "",
          f"Settings: {args.seeds} seeds per logger, {args.folds} folds, "
          + ("no loop" if args.no_loop else f"{args.rounds} rounds × {args.loop_seeds} loop seeds") + ","
          f" skewed logger ε={args.epsilon:g}, loop exploration ε={args.explore:g}, {args.boot} bootstrap "
          f"resamples{', --quick' if args.quick else ''}.", ""]
    summary: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "logs": {}}
    for spec in args.data:
        t_log = time.perf_counter()
        log = FullLog(spec, args)
        name = log.name
        print(f"[{name}] {len(log.qm):,} queries × {len(log.models)} models, {len(set(log.tasks))} tasks; encoder "
              f"{log.encoder} ({log.embed_s:.1f}s to embed or read the cache)", flush=True)
        t0 = time.perf_counter()
        choice, logger_scores, train_s = cross_fitted_targets(log, args)
        t_targets = time.perf_counter() - t0
        probs = loggers(log, logger_scores, args)
        t0 = time.perf_counter()
        records, truth, kept = estimator_study(log, choice, probs, args)
        stats = summarise(records, truth)
        est_targets = estimator_targets(stats)
        t_est = time.perf_counter() - t0
        write_csv(out / f"estimators_{name}.csv", stats)
        t0 = time.perf_counter()
        obp_rows, obp_note = obp_check(log, kept, choice, args)
        obp_sum = None
        if obp_rows:
            write_csv(out / f"obp_{name}.csv", obp_rows)
            mx = max(r["abs_diff"] for r in obp_rows)
            obp_sum = {"max_abs_diff": mx, "cases": len(obp_rows), "agree": mx < 1e-9, "note": obp_note}
        t_obp = time.perf_counter() - t0
        print(f"[{name}] OBP: {obp_note}" + (f"; max |ours − OBP| {obp_sum['max_abs_diff']:.1e}" if obp_sum else ""),
              flush=True)
        t0 = time.perf_counter()
        loop = None
        if not args.no_loop:
            loop_rows, ref = loop_study(log, args)
            loop = loop_summary(loop_rows, ref, args)
            write_csv(out / f"loop_{name}.csv", loop_rows)
            plot_loop(loop_rows, ref, out / f"loop_{name}.png", name)
        t_loop = time.perf_counter() - t0
        shares = {lg: np.bincount(pr.argmax(1), minlength=len(log.models)) / len(log.qm)
                  for lg, pr in probs.items() if lg != "uniform"}
        md += [f"## {name}: {len(log.qm):,} queries × {len(log.models)} models", "",
               "Loggers: uniform; `mlp`: ε-greedy on an MLP router's predicted score (fold f logged by the MLP trained "
               "without fold f+1, so it differs from every target); `mlp-relative`: ε-greedy on the same MLP's "
               "predicted score minus that model's mean predicted score (each model where it is relatively "
               "strongest). Their greedy choice per model: " + "; ".join(
                   f"{lg}: " + ", ".join(f"{m} {v:.0%}" for m, v in zip(log.models, sh, strict=True) if v >= 0.005)
                   for lg, sh in shares.items()) + ".", "",
               f"### Estimator accuracy over {args.seeds} seeds (cells: bias / RMSE / 95% CI coverage)", "",
               "Truth: the target's mean performance on the full log. DR SE: the mean bootstrap SE of one DR "
               "estimate; ESS: the effective sample size of the target's importance weights. DM's intervals hold "
               "the reward model fixed (they resample queries, not the reward model's fit), hence its low coverage.",
               "", estimator_md(stats), ""]
        md += ["### Open Bandit Pipeline cross-check", ""]
        if obp_rows:
            md += [f"{obp_note}: same draws, propensities and reward-model predictions; OBP's ReplayMethod is the "
                   f"naive mean. Max |ours − OBP| = {obp_sum['max_abs_diff']:.1e} over {obp_sum['cases']} estimates "
                   "(the intervals differ by construction: ours is a paired percentile bootstrap of Σnum/Σden, "
                   "OBP's a percentile bootstrap of per-round values with its own resamples).", "",
                   obp_md(obp_rows), ""]
        else:
            md += [f"OBP {obp_note}.", ""]
        if loop is not None:
            ref = loop["reference"]
            md += [f"### The loop ({args.rounds} rounds × {args.loop_seeds} seeds, MLP router, ≤ {args.loop_epochs} "
                   "epochs per retraining; mean ± sd over loop seeds)", "",
                   f"Test fold {ref['test_queries']} queries (full information: best single {ref['best_single']:.3f}, "
                   f"oracle {ref['oracle']:.3f}); train split {ref['train_queries']} queries served in {args.rounds} "
                   f"batches; a uniform policy's regret would be {ref['uniform_regret_per_query']:.3f} per query.", "",
                   loop_md(loop_rows, ref), "", f"![loop](loop_{name}.png)", ""]
        line = targets_line(name, est_targets, obp_sum, loop, args)
        md += ["### Targets", "", line, ""]
        wall = time.perf_counter() - t_log
        summary["logs"][name] = {
            "queries": len(log.qm), "models": log.models, "truth": truth, "estimators": stats,
            "estimator_targets": est_targets, "obp": obp_sum, "obp_note": obp_note, "loop": loop,
            "seconds": {"total": wall, "targets": t_targets, "estimators": t_est, "obp": t_obp, "loop": t_loop,
                        "embed": log.embed_s, "train_targets": train_s}}
        print(f"[{name}] done in {wall:.0f}s (targets {t_targets:.0f}s, estimators {t_est:.0f}s, OBP {t_obp:.0f}s, "
              f"loop {t_loop:.0f}s)", flush=True)
        print(line, flush=True)
    summary["seconds"] = time.perf_counter() - t_all
    text = "\n".join(md)
    (out / "bandit.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n" + text)
    print(f"wrote {out} ({summary['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
