"""`python -m fusion_lightning.route --ckpt PATH --input queries.jsonl --output routed.jsonl [--lam 0.5 | --tolerance 0.02]`

Each input line is a JSON object with `query` (or `prompt_formatted`/`prompt`; optionally `task` or
`task_name`); a JSON array file (RouterArena's dataset) is read too. Each output line is the input object
plus `model` (the chosen LLM) and `scores` (predicted reward per model). Bad input lines are reported
with their line numbers and nothing is written. `--tolerance τ` routes each query to the cheapest model
(by predicted cost) predicted within τ of its best predicted score, instead of the λ argmax.

Strong/weak threshold routing (RouteLLM): `--calibrate strong_fraction=0.3` (or `budget=USD_PER_1K`)
picks the threshold on the val split of the checkpoint's run (or on `--input` queries) and stores it in
the checkpoint (in place, atomically, or in `--save-ckpt`); later runs route by it unless `--lam` is given
or `--tolerance`, or `--mode argmax`. `--format routerarena` writes RouterArena's prediction file, `--format routellm` a
prompt,model,score CSV.

`--ope LOG` estimates the router off-policy on a bandit log (serve's request log, any LLMFusionBench
file with `propensity`): what it would score before it serves (fusion_lightning/query/offline.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fusion_lightning.query.calibrate import (
    calibrate,
    heldout_from_queries,
    heldout_from_run,
    parse_target,
    save_calibration,
)
from fusion_lightning.query.route_formats import (
    FORMATS,
    global_indices,
    query_text,
    read_queries,
    write_jsonl,
    write_routellm,
    write_routerarena,
)
from fusion_lightning.query.router import Router


def _pair(router: Router, text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in router.models]
    if len(names) != 2 or unknown or names[0] == names[1]:
        raise ValueError(f"--pair takes STRONG,WEAK, two different models of {router.models}, got {text!r}")
    return router.models.index(names[0]), router.models.index(names[1])


def _calibrate(args: argparse.Namespace, router: Router, records: list[dict] | None) -> None:
    target, value = parse_target(args.calibrate)
    pair = _pair(router, args.pair)
    if records is not None:
        tasks = [r.get("task") or r.get("task_name") for r in records]
        held = heldout_from_queries(router, [query_text(r) for r in records], tasks, str(args.input), pair,
                                    args.batch_size)
    else:
        held = heldout_from_run(router, Path(args.ckpt), pair)
    record = calibrate(held, target, value, router.models)
    written = save_calibration(Path(args.ckpt), record, args.save_ckpt)
    router.calibration = record
    cost = f", {record['usd_per_1k']:.4g} USD per 1,000 queries" if "usd_per_1k" in record else ""
    print(f"calibrated {record['target']}: strong={record['strong']} weak={record['weak']} "
          f"threshold={record['threshold']:.6g}; on the {record['source']}: {record['strong_fraction']:.1%} "
          f"strong calls{cost} -> {written}")


def _ope(args: argparse.Namespace) -> int:
    """--ope: the router's off-policy estimates on a bandit log, printed as a table."""
    from fusion_lightning.data.logtable import load_logs
    from fusion_lightning.query.offline import evaluate_offline

    try:
        logs = load_logs(args.ope_format, args.ope)
        report = evaluate_offline(logs, {"router": Router.load(args.ckpt)}, split=args.ope_split,
                                  lam=args.lam or 0.0, propensity=args.propensity)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_lightning.route", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="router checkpoint (.ckpt) from a router recipe's run dir")
    ap.add_argument("--input", type=Path, help="JSONL with a 'query' field per line (or a JSON array)")
    ap.add_argument("--output", type=Path, help="file to write (see --format)")
    ap.add_argument("--format", choices=FORMATS, default="jsonl",
                    help="jsonl (default), routerarena (prediction file), routellm (prompt,model,score CSV)")
    ap.add_argument("--lam", type=float, default=None, help="cost weight λ: reward = perf − λ·normalised cost "
                    "(argmax routing; default 0)")
    ap.add_argument("--tolerance", type=float, default=None, metavar="TAU",
                    help="the cheapest model (by predicted cost) predicted within TAU of the best predicted score "
                    "(in the score's units, e.g. 0.02); instead of --lam")
    ap.add_argument("--mode", choices=("auto", "argmax", "threshold"), default="auto",
                    help="auto: the calibrated strong/weak threshold when the checkpoint has one and neither "
                    "--lam nor --tolerance is given, else argmax (or the tolerance rule)")
    ap.add_argument("--calibrate", metavar="TARGET", help="strong_fraction=F or budget=USD_PER_1K: pick and "
                    "store the strong/weak threshold (on --input queries when given, else the run's val split)")
    ap.add_argument("--pair", metavar="STRONG,WEAK", help="the strong/weak pair to calibrate (default: best "
                    "single on train and the cheapest other model)")
    ap.add_argument("--save-ckpt", type=Path, help="write the calibrated checkpoint here instead of in place")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--ope", metavar="LOG", help="estimate this router off-policy on a bandit log (a file or folder, "
                    "e.g. serve's request log) before it serves: naive, DM, IPS, SNIPS and DR with 95%% intervals")
    ap.add_argument("--ope-format", default="llmfusionbench", help="the --ope log's reader (default llmfusionbench, "
                    "the request log's format)")
    ap.add_argument("--ope-split", default="all", help="the log's split to estimate on (default all: every query)")
    ap.add_argument("--propensity", choices=("logged", "estimate"), default="logged",
                    help="--ope: the log's propensities, or estimate them from its logged choices")
    args = ap.parse_args(argv)
    if args.ope:
        return _ope(args)
    if args.calibrate is None and (args.input is None or args.output is None):
        ap.error("--input and --output are required to route (or give --calibrate, or --ope)")
    try:
        records = read_queries(args.input) if args.input is not None else None
        indices = global_indices(args.input, records) if args.format == "routerarena" and args.output else None
        router = Router.load(args.ckpt)
        if args.calibrate is not None:
            _calibrate(args, router, records)
            if args.output is None:
                return 0
        if args.input is None:
            raise ValueError("--output needs --input: the queries to route")
        chosen_rule = args.lam is not None or args.tolerance is not None
        mode = args.mode if args.mode != "auto" else ("threshold" if router.calibration and not chosen_rule
                                                      else "argmax")
        if mode == "threshold" and args.tolerance is not None:
            raise ValueError("--tolerance is a decision rule of its own; it does not apply to --mode threshold")
        queries = [query_text(r) for r in records]
        tasks = [r.get("task") or r.get("task_name") for r in records]
        if mode == "threshold":
            result = router.route_strong_weak(queries, tasks, batch_size=args.batch_size)
        else:
            result = router.route(queries, tasks=tasks, lam=args.lam or 0.0, batch_size=args.batch_size,
                                  tolerance=args.tolerance)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    col = {m: j for j, m in enumerate(result.candidates)}
    if args.format == "routerarena":
        write_routerarena(args.output, records, indices, result.models)
    elif args.format == "routellm":
        scores = (result.strong_score if result.strong_score is not None
                  else [row[col[m]] for row, m in zip(result.scores, result.models, strict=True)])
        write_routellm(args.output, records, result.models, list(scores))
    else:
        rows = []
        for i, (rec, model, row) in enumerate(zip(records, result.models, result.scores, strict=True)):
            out = {**rec, "model": model, "scores": dict(zip(result.candidates, map(float, row), strict=True))}
            if result.strong_score is not None:  # JSON has no infinity: a threshold of +inf (no strong call) is null
                t = router.calibration["threshold"]
                out.update(strong_score=float(result.strong_score[i]), threshold=t if math.isfinite(t) else None)
            rows.append(out)
        write_jsonl(args.output, rows)
    how = (f"strong/weak threshold {router.calibration['threshold']:.6g}" if mode == "threshold"
           else f"cheapest within {args.tolerance:g} of the best" if args.tolerance is not None else "argmax")
    print(f"routed {len(records)} queries ({how}) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
