"""`python -m fusion_lightning.collect queries=FILE backends=[...] out=LOG.jsonl [catalog=FILE] [think=true] [judge={...}]`

Sends every query to every backend, scores, prices and (optionally) judges each answer, and appends
LLMFusionBench-format records to `out` (read them with `data=llmfusionbench data.path=LOG.jsonl`).
Re-running the same command resumes: finished records are skipped, cached answers are not re-sent.

`backends` is a list of `build_backend` configs, inline or a YAML/JSON file:
  backends=[{type:openai_compatible,base_url:"http://localhost:8000/v1",model:qwen,api_key_env:KEY}]
  backends=backends.yaml        config=collect.yaml (any of these keys in one file)
"""

from __future__ import annotations

import json
import os
import sys

from fusion_lightning.cli import parse_args
from fusion_lightning.config import ConfigError
from fusion_lightning.data.schema import ModelCatalog
from fusion_lightning.serving.collect import collect, read_query_file

DEFAULTS = {"queries": None, "backends": [], "out": None, "catalog": None, "think": False, "judge": None,
            "sampling": {}, "chunk_size": 32, "limit": None, "progress": True}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(f"keys (defaults): {json.dumps(DEFAULTS)}")
        return 0 if argv else 2
    try:
        cfg = parse_args(argv, DEFAULTS, file_keys=("backends", "judge", "sampling"))
        for key in ("queries", "out"):
            if not cfg[key]:
                raise ConfigError(f"{key}= is required")
        if not isinstance(cfg["backends"], list) or not cfg["backends"]:
            raise ConfigError("backends= must be a non-empty list of backend configs")
        queries = read_query_file(cfg["queries"])
        if cfg["limit"]:
            queries = queries[: int(cfg["limit"])]
        catalog = ModelCatalog.from_json_file(cfg["catalog"]) if cfg["catalog"] else None
        report = collect(queries, cfg["backends"], cfg["out"], catalog=catalog, think=bool(cfg["think"]),
                         judge=cfg["judge"], sampling=cfg["sampling"], chunk_size=int(cfg["chunk_size"]),
                         progress=bool(cfg["progress"]))
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report.written} record(s), skipped {report.skipped} already written, "
          f"{report.cached} from cache, {report.failed} failed -> {report.out}")
    if report.judged:
        print(f"judged {report.judged}: {report.judge_missing} unparseable/failed (recorded as null)")
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
