"""`python -m fusion_lightning.route ckpt=PATH input=queries.jsonl output=routed.jsonl [lam=0.5 | tolerance=0.02]`

Each input line is a JSON object with `query` (or `prompt_formatted`/`prompt`; optionally `task` or
`task_name`); a JSON array file (RouterArena's dataset) is read too. Each output line is the input object
plus `model` (the chosen LLM) and `scores` (predicted reward per model). Bad input lines are reported
with their line numbers and nothing is written. `tolerance=τ` routes each query to the cheapest model
(by predicted cost) predicted within τ of its best predicted score, instead of the λ argmax.

Strong/weak threshold routing (RouteLLM): `calibrate.strong_fraction=0.3` (or `calibrate.budget=USD_PER_1K`)
picks the threshold on the val split of the checkpoint's run (or on `input=` queries) and stores it in
the checkpoint (in place, atomically, or in `save_ckpt=`); later runs route by it unless `lam=` or
`tolerance=` is given, or `mode=argmax`. `format=routerarena` writes RouterArena's prediction file,
`format=routellm` a prompt,model,score CSV.

`ope=LOG` estimates the router off-policy on a bandit log (serve's request log, any LLMFusionBench
file with `propensity`): what it would score before it serves (fusion_lightning/query/offline.py).

The keys and their defaults are recipes/route.yaml (composed by Hydra, as `fit` is). The old `--ckpt PATH`
spellings still work for one release (a note says the new one).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from fusion_lightning.config import (
    ConfigError,
    check_choice,
    compose_command,
    help_requested,
    hydra_value,
    legacy_flags,
)
from fusion_lightning.query.calibrate import (
    calibrate,
    heldout_from_queries,
    heldout_from_run,
    parse_target,
    save_calibration,
)
from fusion_lightning.query.metrics import check_decision
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

# the argparse flags of the previous release -> their keys
FLAGS = {"--ckpt": "ckpt", "--input": "input", "--output": "output", "--format": "format", "--lam": "lam",
         "--tolerance": "tolerance", "--mode": "mode", "--calibrate": "calibrate", "--pair": "pair",
         "--save-ckpt": "save_ckpt", "--batch-size": "batch_size", "--ope": "ope", "--ope-format": "ope_format",
         "--ope-split": "ope_split", "--propensity": "propensity"}


def _old_calibrate(value: str) -> str:
    target, sep, v = value.partition("=")
    if not sep:
        raise ConfigError(f"--calibrate {value}: it takes strong_fraction=F or budget=USD_PER_1K "
                          "(now calibrate.strong_fraction=F or calibrate.budget=USD_PER_1K)")
    return f"calibrate.{target.strip()}={hydra_value(v)}"


def legacy(argv: list[str]) -> list[str]:
    """The old flags as keys; `--calibrate strong_fraction=F` and `--pair STRONG,WEAK` as the nodes they are now."""
    return legacy_flags(argv, FLAGS, translate={
        "--calibrate": _old_calibrate,
        "--pair": lambda v: f"pair=[{','.join(hydra_value(n.strip()) for n in v.split(','))}]"})


def compose(argv: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """recipes/route.yaml with `key=value` arguments -> a plain dict (checked); ConfigError (one line) on any problem."""
    cfg = compose_command("route", argv)
    if not cfg["ckpt"]:
        raise ConfigError("ckpt= is required: the router checkpoint (.ckpt) from a router recipe's run dir")
    check_choice(cfg, "format", FORMATS)
    check_choice(cfg, "mode", ("auto", "argmax", "threshold"))
    check_choice(cfg, "propensity", ("logged", "estimate"))
    if not isinstance(cfg["calibrate"], dict):
        raise ConfigError(f"calibrate={cfg['calibrate']}: give calibrate.strong_fraction=F or calibrate.budget=USD_PER_1K")
    targets = {k: v for k, v in cfg["calibrate"].items() if v is not None}
    if len(targets) > 1:
        raise ConfigError("calibrate: give one of calibrate.strong_fraction= and calibrate.budget=")
    cfg["calibrate"] = "{}={}".format(*next(iter(targets.items()))) if targets else None
    if cfg["calibrate"]:
        try:
            parse_target(cfg["calibrate"])
        except ValueError:
            raise ConfigError(f"calibrate.{cfg['calibrate']}: strong_fraction takes a share in [0, 1], budget "
                              "USD per 1,000 queries (≥ 0)") from None
    for key in ("lam", "tolerance"):
        if cfg[key] is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int | float)):
            raise ConfigError(f"{key}={cfg[key]}: a number")
    if cfg["ope"] and cfg["tolerance"] is not None:  # the off-policy estimates are of the λ argmax policy
        raise ConfigError("ope= estimates the lam= argmax policy; tolerance= is not supported with it")
    check_decision(float(cfg["lam"] or 0.0), None if cfg["tolerance"] is None else float(cfg["tolerance"]))
    for key in ("ckpt", "input", "output", "save_ckpt", "ope"):
        cfg[key] = str(cfg[key]) if cfg[key] is not None else None
    return cfg


def _pair(router: Router, pair: list[str] | str | None) -> tuple[int, int] | None:
    if not pair:
        return None
    names = [n.strip() for n in (pair.split(",") if isinstance(pair, str) else pair)]
    unknown = [n for n in names if n not in router.models]
    if len(names) != 2 or unknown or names[0] == names[1]:
        raise ValueError(f"pair= takes [STRONG,WEAK], two different models of {router.models}, got {pair!r}")
    return router.models.index(names[0]), router.models.index(names[1])


def _calibrate(cfg: dict[str, Any], router: Router, records: list[dict] | None) -> None:
    target, value = parse_target(cfg["calibrate"])
    pair = _pair(router, cfg["pair"])
    if records is not None:
        tasks = [r.get("task") or r.get("task_name") for r in records]
        held = heldout_from_queries(router, [query_text(r) for r in records], tasks, cfg["input"], pair,
                                    int(cfg["batch_size"]))
    else:
        held = heldout_from_run(router, Path(cfg["ckpt"]), pair)
    record = calibrate(held, target, value, router.models)
    written = save_calibration(Path(cfg["ckpt"]), record, Path(cfg["save_ckpt"]) if cfg["save_ckpt"] else None)
    router.calibration = record
    cost = f", {record['usd_per_1k']:.4g} USD per 1,000 queries" if "usd_per_1k" in record else ""
    print(f"calibrated {record['target']}: strong={record['strong']} weak={record['weak']} "
          f"threshold={record['threshold']:.6g}; on the {record['source']}: {record['strong_fraction']:.1%} "
          f"strong calls{cost} -> {written}")


def _ope(cfg: dict[str, Any]) -> int:
    """ope=LOG: the router's off-policy estimates on a bandit log, printed as a table."""
    from fusion_lightning.data.logtable import load_logs
    from fusion_lightning.query.offline import evaluate_offline

    try:
        logs = load_logs(cfg["ope_format"], cfg["ope"])
        report = evaluate_offline(logs, {"router": Router.load(cfg["ckpt"])}, split=cfg["ope_split"],
                                  lam=cfg["lam"] or 0.0, propensity=cfg["propensity"])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (code := help_requested(argv, __doc__, "route")) is not None:
        return code
    try:
        cfg = compose(legacy(argv))
        if cfg["ope"]:
            return _ope(cfg)
        if cfg["calibrate"] is None and (cfg["input"] is None or cfg["output"] is None):
            raise ConfigError("input= and output= are required to route (or give calibrate.strong_fraction= or "
                              "calibrate.budget=, or ope=)")
        inp, output = (Path(cfg[k]) if cfg[k] is not None else None for k in ("input", "output"))
        records = read_queries(inp) if inp is not None else None
        indices = global_indices(inp, records) if cfg["format"] == "routerarena" and output else None
        router = Router.load(cfg["ckpt"])
        if cfg["calibrate"] is not None:
            _calibrate(cfg, router, records)
            if output is None:
                return 0
        if inp is None:
            raise ValueError("output= needs input=: the queries to route")
        lam, tolerance = cfg["lam"], cfg["tolerance"]
        chosen_rule = lam is not None or tolerance is not None
        mode = cfg["mode"] if cfg["mode"] != "auto" else ("threshold" if router.calibration and not chosen_rule
                                                          else "argmax")
        if mode == "threshold" and tolerance is not None:
            raise ValueError("tolerance= is a decision rule of its own; it does not apply to mode=threshold")
        queries = [query_text(r) for r in records]
        tasks = [r.get("task") or r.get("task_name") for r in records]
        if mode == "threshold":
            result = router.route_strong_weak(queries, tasks, batch_size=int(cfg["batch_size"]))
        else:
            result = router.route(queries, tasks=tasks, lam=float(lam or 0.0), batch_size=int(cfg["batch_size"]),
                                  tolerance=None if tolerance is None else float(tolerance))
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    col = {m: j for j, m in enumerate(result.candidates)}
    if cfg["format"] == "routerarena":
        write_routerarena(output, records, indices, result.models)
    elif cfg["format"] == "routellm":
        scores = (result.strong_score if result.strong_score is not None
                  else [row[col[m]] for row, m in zip(result.scores, result.models, strict=True)])
        write_routellm(output, records, result.models, list(scores))
    else:
        rows = []
        for i, (rec, model, row) in enumerate(zip(records, result.models, result.scores, strict=True)):
            out = {**rec, "model": model, "scores": dict(zip(result.candidates, map(float, row), strict=True))}
            if result.strong_score is not None:  # JSON has no infinity: a threshold of +inf (no strong call) is null
                t = router.calibration["threshold"]
                out.update(strong_score=float(result.strong_score[i]), threshold=t if math.isfinite(t) else None)
            rows.append(out)
        write_jsonl(output, rows)
    how = (f"strong/weak threshold {router.calibration['threshold']:.6g}" if mode == "threshold"
           else f"cheapest within {tolerance:g} of the best" if tolerance is not None else "argmax")
    print(f"routed {len(records)} queries ({how}) -> {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
