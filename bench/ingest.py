"""Ingest benchmark: read + validate + build query × model matrices of a 1M-row LLMFusionBench file.

Compares fusion_lightning's pyarrow path against a plain pandas baseline doing the same work
(read, validity checks, duplicate check, groupby/pivot to queries × models), each in its own
process so peak RSS is measured separately. Prints rows/s, peak RSS and the ratios.

    python bench/ingest.py [--queries 50000] [--models 20] [--repeats 1]

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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_ours(path: str) -> dict:
    from fusion_lightning.data.logtable import load_logs

    t0 = time.perf_counter()
    logs = load_logs("llmfusionbench", path)
    qm = logs.matrix()
    dt = time.perf_counter() - t0
    return {"rows": len(logs), "shape": list(qm.performance.shape), "seconds": dt}


def run_pandas(path: str) -> dict:
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    from fusion_lightning.data.readers.llmfusionbench import USED_COLUMNS

    df = pd.read_parquet(path, columns=[c for c in USED_COLUMNS if c != "query_id"])  # the columns we read too
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


def worker(kind: str, path: str) -> None:
    out = (run_ours if kind == "ours" else run_pandas)(path)
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", choices=["ours", "pandas"])
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.path)

    import pyarrow.parquet as pq

    from fusion_lightning.data.synthetic import generate_llmfusionbench

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "llmfusionbench.parquet")
        t0 = time.perf_counter()
        table = generate_llmfusionbench(n_queries=args.queries, models=args.models, with_responses=True, seed=0)
        pq.write_table(table, path)
        n = table.num_rows
        size_mb = Path(path).stat().st_size / 2**20
        del table
        print(f"built {n:,} rows ({size_mb:.0f} MB parquet, with responses) in {time.perf_counter() - t0:.1f}s")
        results: dict[str, list[dict]] = {"pandas": [], "ours": []}
        for _ in range(args.repeats):
            for kind in ("pandas", "ours"):
                r = subprocess.run([sys.executable, __file__, "--worker", kind, "--path", path],
                                   capture_output=True, text=True, check=True)
                results[kind].append(json.loads(r.stdout.strip().splitlines()[-1]))

    def best(kind: str) -> dict:
        return min(results[kind], key=lambda r: r["seconds"])

    base, ours = best("pandas"), best("ours")
    assert base["shape"] == ours["shape"], (base["shape"], ours["shape"])
    print(f"\nread + validate + queries×models matrices ({ours['shape'][0]:,} × {ours['shape'][1]}),"
          f" best of {args.repeats}; baseline = pandas read_parquet + checks + pivot_table")
    print(f"{'':<22}{'seconds':>10}{'rows/s':>14}{'peak RSS MB':>14}")
    for name, r in (("pandas (baseline)", base), ("fusion_lightning", ours)):
        print(f"{name:<22}{r['seconds']:>10.2f}{r['rows'] / r['seconds']:>14,.0f}{r['peak_rss_mb']:>14,.0f}")
    speed = base["seconds"] / ours["seconds"]
    mem = ours["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"{'ratio (ours/baseline)':<22}{'':>10}{speed:>13.2f}x{mem:>13.2f}x")
    print(f"\ntarget: speed ≥ 3.00x -> {'met' if speed >= 3 else 'NOT met'}; "
          f"memory ≤ 1.00x -> {'met' if mem <= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
