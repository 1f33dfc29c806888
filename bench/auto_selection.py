"""How router_auto should pick its winner: selection rules compared on logs nobody tuned them on.

For each log and cross-validation fold (as bench/routers.py builds them), router_auto is fitted once
through `fit`'s own build/run; then every candidate's best state routes the fold's test split. Each
rule below then picks a winner from the *val* rewards alone, and is scored by that winner's *test*
gap closed, next to task-best's on the same fold. One fit per fold serves every rule, so the rules
are compared on identical candidates.

    python bench/auto_selection.py [--data llmrouter routellm synthetic] [--folds 5]

Rules: `best` (highest mean val reward), `se=K` (the best among candidates whose paired val gain
over the lookup exceeds K standard errors; the lookup when none does), and `bonferroni` (K from
the number of candidates: a one-sided 5% test after a Bonferroni correction).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _folds import fold_logs, mean_std, query_folds  # noqa: E402

from fusion_lightning.config import compose_recipe  # noqa: E402
from fusion_lightning.data.datamodule import load_from_config  # noqa: E402
from fusion_lightning.fit import build, run  # noqa: E402
from fusion_lightning.query.base import split_arrays  # noqa: E402
from fusion_lightning.query.metrics import (  # noqa: E402
    baseline_choices,
    choose,
    gap_closed,
    outcome,
    select_over_reference,
)

SETTING = "performance_first"


def candidate_outcomes(module, test: dict) -> tuple[dict, dict]:
    """Per candidate (and ensemble): val per-query rewards (as selection saw them) and test choices."""
    names = list(module.candidates)
    arrays = split_arrays(test)
    val, tst, test_pred = {}, {}, {}
    for n in names:
        b = module.best[n]
        if "rewards" not in b:
            continue
        module.candidates[n].load_state_dict(b["state"])
        module.candidates[n].eval()
        with torch.no_grad():
            perf, cost = module._val_predictions(module.candidates[n], test)
        val[n], test_pred[n] = b["rewards"], (perf, cost)
        tst[n] = _choices(module, perf, cost, arrays)
    for e, members in module.ensembles.items():
        chosen = module._ensemble_members(members)
        if len(chosen) < 2:
            continue
        pc = [np.mean([module.best[n][k] for n in chosen], 0) for k in ("perf", "cost")]
        val[e] = module._rewards(*pc, split_arrays(module.trainer.datamodule.splits["val"].tensors))
        tp = [np.mean([test_pred[n][i] for n in chosen], 0) for i in (0, 1)]
        tst[e] = _choices(module, *tp, arrays)
    return val, tst


def _choices(module, perf: np.ndarray, cost: np.ndarray, arrays) -> np.ndarray:
    scores = module.predicted_reward(torch.from_numpy(perf), torch.from_numpy(cost), SETTING).numpy()
    return choose(scores, arrays.mask)


def rules(k: int) -> dict[str, float | None]:
    z = NormalDist().inv_cdf(1 - 0.05 / max(k - 1, 1))
    return {"best": None, "se=0": 0.0, "se=1": 1.0, "se=2": 2.0, f"bonferroni (z={z:.2f})": z}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=["llmrouter", "routellm", "synthetic"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    lines = ["| log | rule | auto − task-best, gap closed | folds ≥ task-best − 0.005 | winners |", "|---|---|---|---|---|"]
    for data in a.data:
        cfg0 = compose_recipe("router_auto", [f"data={data}"])
        logs = load_from_config({**cfg0.data, "split": "query"})
        qm = logs.matrix()
        folds = query_folds(qm, a.folds, a.seed)
        diffs, winners = defaultdict(list), defaultdict(Counter)
        for f in range(a.folds):
            with tempfile.TemporaryDirectory() as tmp:
                r = build(compose_recipe("router_auto", [f"data={data}", f"run_dir={tmp}", f"seed={a.seed}",
                                                         "logger=none", "~callbacks.progress_bar",
                                                         "~callbacks.routing_report",
                                                         "+trainer.enable_progress_bar=false"]),
                          logs=fold_logs(logs, qm, folds, f, val_fraction=0.1, seed=a.seed))
                run(r)
            test = r.datamodule.splits["test"].tensors
            val, tst = candidate_outcomes(r.model, test)
            train_a, ev = split_arrays(r.datamodule.splits["train"].tensors), split_arrays(test)
            base = baseline_choices(train_a, ev, SETTING, r.model.hparams.model_sizes)
            single, oracle, lookup = (outcome(base[b], ev, SETTING)["perf"] for b in ("best_single", "oracle",
                                                                                      "task_best"))
            for rule, z in rules(len(val)).items():
                w = max(val, key=lambda n: float(np.mean(val[n]))) if z is None else \
                    select_over_reference(val, "lookup", z)
                perf = outcome(tst[w], ev, SETTING)["perf"]
                diffs[rule].append(gap_closed(perf, single, oracle) - gap_closed(lookup, single, oracle))
                winners[rule][w] += 1
            print(f"[{data} fold {f + 1}/{a.folds}] " + "  ".join(f"{k}: {v[-1]:+.3f}" for k, v in diffs.items()),
                  flush=True)
        for rule in diffs:
            ok = sum(d >= -0.005 for d in diffs[rule])
            lines.append(f"| {data} | {rule} | {mean_std(diffs[rule])} | {ok}/{len(diffs[rule])} | "
                         + ", ".join(f"{w} ×{n}" for w, n in winners[rule].most_common()) + " |")
    md = "\n".join(lines)
    print("\n" + md)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "auto_selection.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
