"""Pieces of bench/fusion_e2e.py that are not stages: the question pools of the shared data, the probe's
task choice, the --quick reference answerer, live-column files and the paired gain tables."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.data.schema import make_query_id
from fusion_lightning.fusion_table import Evaluation, add_confidence, table_rows
from fusion_lightning.scoring import resolve_metric
from fusion_lightning.serving.base import Generation, to_messages


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines split on "\\n" only (str.splitlines also splits at U+2028 inside a string)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def question_pools(shared: Path) -> tuple[dict[tuple[str, str], list[dict]], list[str]]:
    """(task, split) -> question records from the shared LLMRouter query files and the RouteLLM GSM8K
    questions (task gsm8k; a stable 80/20 train/test split by a hash of the text). A text in a test pool is
    dropped from the train pools (LLMRouter repeats 119 test queries in train). Returns notes too."""
    notes: list[str] = []
    raw: list[tuple[str, dict]] = []
    for split in ("train", "test"):
        f = shared / "llmrouter" / f"queries_{split}.jsonl"
        if f.is_file():
            raw += [(split, r) for r in read_jsonl(f)]
        else:
            notes.append(f"{f} not found: no LLMRouter questions")
    g = shared / "routellm_gsm8k" / "gsm8k_test.jsonl"
    if g.is_file():
        for r in read_jsonl(g):
            rec = {"task_name": "gsm8k", "query": r["question"], "ground_truth": r["answer"], "metric": "GSM8K"}
            split = "test" if int(hashlib.sha1(r["question"].encode()).hexdigest()[:8], 16) % 5 == 0 else "train"
            raw.append((split, rec))
    else:
        notes.append(f"{g} not found: no RouteLLM GSM8K questions")
    pools: dict[tuple[str, str], list[dict]] = {}
    test_texts = {r["query"] for s, r in raw if s == "test"}
    seen: set[str] = set()
    dropped = 0
    for split, r in raw:
        text, gt, metric = r.get("query"), r.get("ground_truth"), r.get("metric")
        ok = all(isinstance(v, str) and v.strip() for v in (text, gt, metric)) and resolve_metric(metric) is not None
        if not ok or text in seen or (split == "train" and text in test_texts):
            dropped += 1
            continue
        seen.add(text)
        rec = {"task_name": r["task_name"], "query": text, "ground_truth": gt, "metric": metric}
        if r.get("choices"):
            rec["choices"] = r["choices"]  # collect writes a multiple-choice question's options below it
        pools.setdefault((r["task_name"], split), []).append(rec)
    if dropped:
        notes.append(f"{dropped} shared questions dropped (repeated, in test as well as train, or unscorable)")
    return pools, notes


def sample(pool: list[dict], n: int, seed: int, key=None) -> list[dict]:
    """A seeded sample of n records, independent of the pool's order (sorted by `key`, default the question id)."""
    pool = sorted(pool, key=key or (lambda r: make_query_id(r["task_name"], r["query"])))
    idx = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in sorted(idx)]


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def choose_tasks(probe_log: Path, min_tasks: int) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Tasks some model scores above zero on in the probe log; at least `min_tasks` (the best-scoring
    ones are added when fewer are above zero). Returns (kept tasks, task -> model -> mean score)."""
    scores: dict[str, dict[str, list[float]]] = {}
    for r in read_jsonl(probe_log):
        scores.setdefault(r["task_name"], {}).setdefault(r["llm"], []).append(float(r["performance"]))
    means = {t: {m: float(np.mean(v)) for m, v in ms.items()} for t, ms in scores.items()}
    ranked = sorted(means, key=lambda t: (-max(means[t].values()), t))
    kept = [t for t in ranked if max(means[t].values()) > 0]
    kept += [t for t in ranked if t not in kept][: max(0, min_tasks - len(kept))]
    return sorted(kept), means


def priced(records: list[dict], catalog) -> list[dict]:
    """Records with their prices and cost (micro-dollars, as `collect` writes them) from `catalog`."""
    out = []
    for r in records:
        info = catalog[r["llm"]]
        cost = info.call_cost(r.get("input_tokens_num"), r.get("output_tokens_num"))
        out.append({**r, "input_price": info.input_price, "output_price": info.output_price,
                    "cost": None if cost is None else cost * 1e6})
    return out


def solved_train_queries(logs) -> int:
    """Train questions some model answered with a score above zero (what distillation can learn from)."""
    qm = logs.matrix().split("train")
    perf = np.where(qm.mask, qm.performance, 0.0)
    return int((perf > 0).any(axis=1).sum()) if len(qm) else 0


class ReferenceBackend:
    """--quick only: answers each question with its gold answer, so that a log of tiny random models
    still has solved questions for templates and distillation. Not an LLM; its scores mean nothing."""

    name = "reference"

    def __init__(self, questions: Sequence[dict]):
        self.gold = sorted(((r["query"], r["ground_truth"]) for r in questions), key=lambda x: -len(x[0]))

    def generate(self, prompts: Sequence[Any], **sampling: Any) -> list[Generation]:
        out = []
        for p in prompts:
            text = str(to_messages(p)[-1]["content"])
            answer = next((gt for q, gt in self.gold if q in text), "")
            out.append(Generation(answer, len(text.split()), len(answer.split()), 0.0, finish_reason="stop"))
        return out


def save_columns(path: Path, ev: Evaluation, names: dict[str, str], seconds: float) -> None:
    """Live columns of `ev` (renamed by `names`: old -> new) with their query ids, for the table stage."""
    cols = {new: {"kind": ev.kinds[old], "perf": [None if math.isnan(x) else x for x in ev.columns[old][0].tolist()],
                  "cost": [None if math.isnan(x) else x for x in ev.columns[old][1].tolist()]}
            for old, new in names.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"query_ids": ev.query_ids.tolist(), "columns": cols, "seconds": round(seconds, 1),
                                "notes": ev.notes, "written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))


def load_columns(path: Path, ev: Evaluation) -> None:
    """Add the saved live columns to `ev`; the question ids must be the same, in the same order."""
    d = json.loads(path.read_text())
    if d["query_ids"] != ev.query_ids.tolist():
        raise ValueError(f"{path}: its columns were computed on other questions than the table's; redo that stage")
    for name, c in d["columns"].items():
        f = lambda v: np.array([np.nan if x is None else x for x in v], float)  # noqa: E731
        ev.add(name, c["kind"], f(c["perf"]), f(c["cost"]))
    ev.notes.extend(d.get("notes", []))


def gain_rows(ev: Evaluation, reference: str, columns: Sequence[str], n_boot: int, seed: int) -> list[dict]:
    """Table rows of `columns` minus `reference`, paired bootstrap CIs (the table's resampling)."""
    sub = Evaluation(ev.split, ev.query_ids, ev.tasks, ev.domains)
    for c in [reference, *columns]:
        sub.add(c, ev.kinds[c], *ev.columns[c])
    rows = table_rows(sub)
    add_confidence(sub, rows, n_boot=n_boot, seed=seed, reference=reference)
    return rows


def gain_markdown(title: str, reference: str, columns: Sequence[str], rows: list[dict]) -> list[str]:
    lines = [f"## {title}", "", f"Paired difference vs `{reference}`, 95 % bootstrap interval.", "",
             "| task | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for r in rows:
        cells = ["n/a" if math.isnan(r[f"{c}_diff"]) else
                 f"{r[f'{c}_diff']:+.3f} [{r[f'{c}_diff_lo']:+.3f}, {r[f'{c}_diff_hi']:+.3f}]" for c in columns]
        label = r["row"] if r["kind"] == "task" else f"**{r['row']}**"
        lines.append(f"| {label} | {r['queries']} | " + " | ".join(cells) + " |")
    return lines + [""]
