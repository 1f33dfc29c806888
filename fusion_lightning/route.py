"""`python -m fusion_lightning.route --ckpt PATH --input queries.jsonl --output routed.jsonl [--lam 0.5]`

Each input line is a JSON object with `query` (and optionally `task` or `task_name`); each output line
is the input object plus `model` (the chosen LLM) and `scores` (predicted reward per model). Bad input
lines are reported with their line numbers and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusion_lightning.data.text import read_input_lines
from fusion_lightning.io import atomic_open
from fusion_lightning.query.router import Router


def read_queries(path: Path) -> list[dict]:
    """Records of a JSONL file; raises ValueError naming every bad line."""
    def check(rec: dict) -> list[str]:
        q = rec.get("query")
        return [] if isinstance(q, str) and q.strip() else ["field 'query' missing or empty"]

    return [rec for _, rec in read_input_lines(path, check)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_lightning.route", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="router checkpoint (.ckpt) from a router recipe's run dir")
    ap.add_argument("--input", required=True, type=Path, help="JSONL with a 'query' field per line")
    ap.add_argument("--output", required=True, type=Path, help="JSONL to write")
    ap.add_argument("--lam", type=float, default=0.0, help="cost weight λ: reward = perf − λ·normalised cost")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        records = read_queries(args.input)
        router = Router.load(args.ckpt)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tasks = [r.get("task") or r.get("task_name") for r in records]
    result = router.route([r["query"] for r in records], tasks=tasks, lam=args.lam, batch_size=args.batch_size)
    with atomic_open(args.output, "w", encoding="utf-8") as fh:  # complete file or none
        for rec, model, row in zip(records, result.models, result.scores, strict=True):
            out = {**rec, "model": model, "scores": dict(zip(result.candidates, map(float, row), strict=True))}
            fh.write(json.dumps(out) + "\n")
    print(f"routed {len(records)} queries -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
