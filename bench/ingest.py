"""Ingest benchmark: read + validate + build query × model matrices of a 1M-row LLMFusionBench file.

Compares fusion_lightning's pyarrow path against a plain pandas baseline doing the same work
(read, validity checks, duplicate check, groupby/pivot to queries × models), each in its own
process so peak RSS is measured separately. Prints rows/s, peak RSS and the ratios. Ours also
derives query ids, domains and the model catalog inside that time (the baseline does not); the
split by query that `load_logs` adds afterwards is timed and printed on its own line.

Two settings, each with both sides reading the same columns:
- `routers`: what a router recipe loads (`data.responses=false`): every column but `response`;
- `all`: what distillation loads: the response texts too (the largest column by far).

    python bench/ingest.py [--queries 50000] [--models 20] [--repeats 3] [--settings routers all]

Target: ≥ 3× the pandas baseline's rows/s at ≤ its peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"routers": False, "all": True}  # setting -> read the response column


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(path: str, responses: bool) -> dict:
    """The issue's work (read + validate + matrices), then `load_logs`' remaining step, splits by query, apart:
    the pandas baseline does not split, so it is reported beside the comparison rather than inside it."""
    from fusion_lightning.data.logtable import LogTable
    from fusion_lightning.data.readers import ReaderOptions, get_reader, read_source
    from fusion_lightning.data.validate import validate

    get_reader("llmfusionbench")  # imports every reader module: not part of the timed work
    t0 = time.perf_counter()
    src = read_source("llmfusionbench", path, ReaderOptions(responses=responses))
    logs = LogTable(validate(src).table, src.catalog)
    qm = logs.matrix()
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    logs.assign_splits()
    return {"rows": len(logs), "shape": list(qm.performance.shape), "seconds": dt,
            "split_seconds": time.perf_counter() - t1}


def run_pandas(path: str, responses: bool) -> dict:
    import numpy as np
    import pandas as pd

    from fusion_lightning.data.readers.llmfusionbench import USED_COLUMNS

    t0 = time.perf_counter()
    skip = {"query_id"} | (set() if responses else {"response"})
    df = pd.read_parquet(path, columns=[c for c in USED_COLUMNS if c not in skip])  # the columns we read too
    perf = pd.to_numeric(df["performance"], errors="coerce")
    cost = pd.to_numeric(df["cost"], errors="coerce") / 1e6
    bad = perf.isna() | (perf < 0) | (perf > 1) | cost.isna() | (cost < 0)
    bad |= df["query"].isna() | (df["query"].str.strip() == "")
    if bad.any():
        raise ValueError(f"{int(bad.sum())} bad rows")
    if df.duplicated(["task_name", "query", "llm"]).any():
        raise ValueError("duplicate (query, model) rows")
    df = df.assign(performance=perf, cost=cost)
    p = df.pivot_table(index=["task_name", "query"], columns="llm", values="performance", aggfunc="first")
    c = df.pivot_table(index=["task_name", "query"], columns="llm", values="cost", aggfunc="first")
    mask = p.notna().to_numpy()
    dt = time.perf_counter() - t0
    assert np.asarray(c).shape == mask.shape
    return {"rows": len(df), "shape": list(p.shape), "seconds": dt}


def build(path: str, queries: int, models: int) -> dict:
    import pyarrow.parquet as pq

    from fusion_lightning.data.synthetic import generate_llmfusionbench

    t0 = time.perf_counter()
    table = generate_llmfusionbench(n_queries=queries, models=models, with_responses=True, seed=0)
    pq.write_table(table, path)
    return {"rows": table.num_rows, "seconds": time.perf_counter() - t0}


def worker(kind: str, path: str, responses: bool, queries: int, models: int) -> None:
    if kind == "build":  # in its own process too, so the parent (and its forks) never hold the big table
        return print(json.dumps(build(path, queries, models)))
    out = (run_ours if kind == "ours" else run_pandas)(path, responses)
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--worker", choices=["ours", "pandas", "build"])
    ap.add_argument("--responses", action="store_true")
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.path, args.responses, args.queries, args.models)

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "llmfusionbench.parquet")
        r = subprocess.run([sys.executable, __file__, "--worker", "build", "--path", path, f"--queries={args.queries}",
                            f"--models={args.models}"], capture_output=True, text=True, check=True)
        built = json.loads(r.stdout.strip().splitlines()[-1])
        size_mb = Path(path).stat().st_size / 2**20
        print(f"built {built['rows']:,} rows ({size_mb:.0f} MB parquet, with responses) in {built['seconds']:.1f}s")
        results: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeats):  # interleaved, so load from other jobs hits both sides alike
            for setting in args.settings:
                for kind in ("pandas", "ours"):
                    flag = ["--responses"] if SETTINGS[setting] else []
                    r = subprocess.run([sys.executable, __file__, "--worker", kind, "--path", path, *flag],
                                       capture_output=True, text=True, check=True)
                    results.setdefault((setting, kind), []).append(json.loads(r.stdout.strip().splitlines()[-1]))

    print(f"\nread + validate + queries×models matrices, best of {args.repeats}; "
          "baseline = pandas read_parquet (same columns) + checks + pivot_table")
    print(f"{'':<32}{'seconds':>10}{'rows/s':>14}{'peak RSS MB':>14}")
    for setting in args.settings:
        base, ours = (min(results[(setting, k)], key=lambda r: r["seconds"]) for k in ("pandas", "ours"))
        assert base["shape"] == ours["shape"], (base["shape"], ours["shape"])
        label = "routers: no response column" if setting == "routers" else "all: with response texts"
        print(f"{label} ({ours['shape'][0]:,} × {ours['shape'][1]})")
        for name, r in (("  pandas (baseline)", base), ("  fusion_lightning", ours)):
            print(f"{name:<32}{r['seconds']:>10.2f}{r['rows'] / r['seconds']:>14,.0f}{r['peak_rss_mb']:>14,.0f}")
        print(f"{'  + splits by query (ours only)':<32}{ours['split_seconds']:>10.2f}")
        speed = base["seconds"] / ours["seconds"]
        mem = ours["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"{'  ratio (ours/baseline)':<32}{'':>10}{speed:>13.2f}x{mem:>13.2f}x")
        print(f"  target: speed ≥ 3.00x -> {'met' if speed >= 3 else 'NOT met'}; "
              f"memory ≤ 1.00x -> {'met' if mem <= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
