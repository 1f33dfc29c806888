"""What `python -m fusion_lightning.route` reads and writes: JSONL or a JSON array of queries in, and out
our JSONL, RouterArena's prediction file or a RouteLLM-style decision CSV.

RouterArena's prediction file is what its `router_inference/generate_prediction_file.py` writes and
`router_inference/check_config_prediction_files.py` checks (RouteWorks/RouterArena): a JSON array of
{"global index", "prompt", "prediction", "generated_result": null, "cost": null, "accuracy": null}, the
prompt exactly the dataset's `prompt_formatted` (else `prompt`), the prediction a model name. Its dataset
file (`dataset/router_data.json`, a JSON array with "global index" and "prompt_formatted") is read here
as it is, so `--input router_data.json --format routerarena` gives a file to submit.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fusion_lightning.data.text import read_input_lines
from fusion_lightning.io import atomic_open

FORMATS = ("jsonl", "routerarena", "routellm")
TEXT_FIELDS = ("query", "prompt_formatted", "prompt")  # the first non-empty one is what gets routed
INDEX_FIELDS = ("global index", "global_index", "Global Index")


def query_text(rec: dict[str, Any]) -> str | None:
    for f in TEXT_FIELDS:
        v = rec.get(f)
        if isinstance(v, str) and v.strip():
            return v
    return None


def _check(rec: dict[str, Any]) -> list[str]:
    return [] if query_text(rec) else ["field 'query' (or 'prompt_formatted'/'prompt') missing or empty"]


def read_queries(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, or of a JSON array file (RouterArena's dataset); raises ValueError naming
    every bad line (JSONL) or entry (array)."""
    head = path.read_bytes()[:4096].lstrip()
    if not head.startswith(b"["):
        return [rec for _, rec in read_input_lines(path, _check)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON array ({e})") from None
    bad = [f"entry {i}: " + (", ".join(_check(r)) if isinstance(r, dict) else "expected a JSON object")
           for i, r in enumerate(data) if not isinstance(r, dict) or _check(r)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'}: " + "; ".join(bad[:10]))
    return data


def global_indices(path: Path, records: list[dict[str, Any]]) -> list[Any]:
    """Each record's RouterArena global index; raises naming every record without one."""
    out, bad = [], []
    for i, rec in enumerate(records):
        v = next((rec[f] for f in INDEX_FIELDS if rec.get(f) not in (None, "")), None)
        if v is None:
            bad.append(i)
        else:
            out.append(v)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
        raise ValueError(f"{path}: format=routerarena needs field 'global index' (or 'global_index') in every "
                         f"record; record(s) {shown} (0-based) lack it")
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:  # complete file or none
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def write_routerarena(path: Path, records: list[dict[str, Any]], indices: list[Any], models: list[str]) -> None:
    """RouterArena's prediction file (fields and layout as its generate_prediction_file.py)."""
    entries = [{"global index": gi, "prompt": rec.get("prompt_formatted") or rec.get("prompt") or rec["query"],
                "prediction": m, "generated_result": None, "cost": None, "accuracy": None}
               for rec, gi, m in zip(records, indices, models, strict=True)]
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(entries, fh, ensure_ascii=False, indent=2)


def write_routellm(path: Path, records: list[dict[str, Any]], models: list[str], scores: list[float]) -> None:
    """One row per query: `prompt`, `model` (the chosen one), `score` (see the README: the strong win score
    under threshold routing, else the chosen model's predicted reward)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "model", "score"])
        for rec, m, s in zip(records, models, scores, strict=True):
            w.writerow([query_text(rec), m, repr(float(s))])
