"""`python -m fusion_lightning.collect queries=FILE backends=[...] out=LOG.jsonl [catalog=FILE] [think=true] [judge={...}]`

Sends every query to every backend, scores, prices and (optionally) judges each answer, and appends
LLMFusionBench-format records to `out` (read them with `data=llmfusionbench data.path=LOG.jsonl`).
Re-running the same command resumes: finished records are skipped, cached answers are not re-sent.

`backends` is a list of `build_backend` configs, inline or a YAML/JSON file:
  backends=[{type:openai_compatible,base_url:"http://localhost:8000/v1",model:qwen,api_key_env:KEY}]
  backends=backends.yaml        config=collect.yaml (any of these keys in one file)

The keys and their defaults are recipes/collect.yaml (composed by Hydra, as `fit` is).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from fusion_lightning.config import ConfigError, compose_command, recipes_dir
from fusion_lightning.data.schema import ModelCatalog
from fusion_lightning.serving.make_log import collect, read_query_file

FILE_KEYS = ("backends", "judge", "sampling")  # a .yaml/.json file name as their value: its content


def compose(argv: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """recipes/collect.yaml with `key=value` arguments -> a plain dict; ConfigError (one line) on any problem."""
    return compose_command("collect", argv, file_keys=FILE_KEYS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print((recipes_dir() / "collect.yaml").read_text(encoding="utf-8"))
        return 0 if argv else 2
    try:
        cfg = compose(argv)
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
                         judge=cfg["judge"] or None, sampling=cfg["sampling"], chunk_size=int(cfg["chunk_size"]),
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
