"""Top-k response selection: which logged answers a student is distilled from (model level) and a
thought template is summarised from (thought level, `thought/select.py`); shared, so it sits below both.

Per query, the logged responses are ranked and the top k kept. Strategies:
- `performance`: score desc, then shorter, then cheaper;
- `judge`: judge score desc (unjudged last), then cheaper;
- `hybrid`: score desc, then judge desc, then cheaper;
- `cost_aware`: score − λ · (per-task normalised cost) desc.
Practice from the paper: stop at the first response with score 0 (never distil a wrong answer unless
asked), optionally add the gold answer as one example, restrict to a model pool, drop exact
duplicate responses, require a minimum judge score.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion_lightning.data.arrow import as_objects, codes
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.matrix import TaskNormaliser
from fusion_lightning.io import atomic_write

STRATEGIES = ("performance", "judge", "hybrid", "cost_aware")


@dataclass
class SelectionConfig:
    strategy: str = "hybrid"
    k: int = 5
    stop_at_zero: bool = True  # cut the ranking at the first response scored 0
    include_gold: bool = False  # add the ground truth as one more example
    pool: list[str] | None = None  # only responses of these models
    dedupe: bool = True  # drop exact duplicate responses (whitespace-normalised) per query
    min_judge: float | None = None  # drop responses judged below this
    lam: float = 0.5  # cost weight of `cost_aware`


@dataclass
class Example:
    query_id: str
    query: str
    task: str
    response: str
    source: str  # model name, or "gold"
    rank: int
    performance: float | None
    judge: float | None
    cost: float | None = None  # USD of the call (None for gold); the thought level re-ranks on it


@dataclass
class SelectionReport:
    queries: int = 0
    examples: int = 0
    per_task: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)
    no_usable_response: int = 0
    no_usable_by_task: dict[str, int] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        atomic_write(path, json.dumps(asdict(self), indent=2))
        return path

    def lines(self) -> list[str]:
        by_source = ", ".join(f"{m} {n}" for m, n in sorted(self.per_source.items(), key=lambda x: -x[1]))
        return [f"selected {self.examples:,} examples for {self.queries - self.no_usable_response:,} of "
                f"{self.queries:,} queries ({self.no_usable_response:,} with no usable response)",
                f"by source: {by_source}"]


def _rank_keys(t, cfg: SelectionConfig, cost_n: np.ndarray) -> list[np.ndarray]:
    """Sort keys, most significant LAST (np.lexsort order), each ascending."""
    perf = np.nan_to_num(t["performance"].to_numpy(zero_copy_only=False), nan=-1.0)
    judge = np.nan_to_num(pc.fill_null(t["judge"], np.nan).to_numpy(zero_copy_only=False), nan=-1.0)
    cost = np.nan_to_num(pc.fill_null(t["cost"], np.nan).to_numpy(zero_copy_only=False), nan=np.inf)
    length = pc.fill_null(pc.utf8_length(t["response"]), 0).to_numpy(zero_copy_only=False)
    if cfg.strategy == "performance":
        return [cost, length, -perf]
    if cfg.strategy == "judge":
        return [cost, -judge]
    if cfg.strategy == "hybrid":
        return [cost, -judge, -perf]
    return [cost, -(perf - cfg.lam * cost_n)]


def select_responses(logs: LogTable, cfg: SelectionConfig) -> tuple[list[Example], SelectionReport]:
    """Rank each query's logged responses and keep the top k (see the module docstring)."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"selection.strategy={cfg.strategy!r}; choose from: {', '.join(STRATEGIES)}")
    if cfg.k < 1:
        raise ValueError(f"selection.k must be >= 1, got {cfg.k}")
    all_q = logs.query_table()
    t = logs.table.filter(pc.is_valid(logs.table["response"]))
    if cfg.pool:
        unknown = sorted(set(cfg.pool) - set(logs.models))
        if unknown:
            raise ValueError(f"selection.pool names models not in the log: {unknown}; log models: {logs.models}")
        t = t.filter(pc.is_in(t["model"], value_set=pa.array(cfg.pool)))
    if cfg.min_judge is not None:
        t = t.filter(pc.fill_null(pc.greater_equal(t["judge"], cfg.min_judge), False))
    cost_n = np.zeros(t.num_rows)
    if cfg.strategy == "cost_aware" and t.num_rows:
        norm = TaskNormaliser.fit(logs.matrix())
        cost_n = norm.cost(np.nan_to_num(t["cost"].to_numpy(zero_copy_only=False))[:, None],
                           as_objects(t["task"]))[:, 0]
    qi, _ = codes(t["query_id"])
    order = np.lexsort([*_rank_keys(t, cfg, cost_n), qi]) if t.num_rows else np.zeros(0, int)
    cols = {c: as_objects(t[c])[order] for c in ("query_id", "query", "task", "model", "response")}
    perf = t["performance"].to_numpy(zero_copy_only=False)[order]
    judge = pc.fill_null(t["judge"], np.nan).to_numpy(zero_copy_only=False)[order]
    cost = pc.fill_null(t["cost"], np.nan).to_numpy(zero_copy_only=False)[order]
    starts = np.flatnonzero(np.r_[True, qi[order][1:] != qi[order][:-1]]) if len(order) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)]

    examples: list[Example] = []
    kept_per_query: dict[str, int] = {}
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        seen: set[str] = set()
        rank = 0
        for i in range(s, e):
            if rank >= cfg.k:
                break
            if cfg.stop_at_zero and perf[i] <= 0:
                break
            key = " ".join(cols["response"][i].split())
            if not key or (cfg.dedupe and key in seen):
                continue
            seen.add(key)
            rank += 1
            examples.append(Example(cols["query_id"][i], cols["query"][i], cols["task"][i], cols["response"][i],
                                    cols["model"][i], rank, float(perf[i]),
                                    None if np.isnan(judge[i]) else float(judge[i]),
                                    None if np.isnan(cost[i]) else float(cost[i])))
        kept_per_query[cols["query_id"][s]] = rank

    if cfg.include_gold:
        for r in all_q.to_pylist():
            if r["ground_truth"]:
                examples.append(Example(r["query_id"], r["query"], r["task"], r["ground_truth"], "gold",
                                        kept_per_query.get(r["query_id"], 0) + 1, 1.0, None))
                kept_per_query[r["query_id"]] = kept_per_query.get(r["query_id"], 0) + 1

    report = SelectionReport(queries=all_q.num_rows, examples=len(examples))
    report.per_task = dict(Counter(x.task for x in examples))
    report.per_source = dict(Counter(x.source for x in examples))
    for qid, task in zip(as_objects(all_q["query_id"]), as_objects(all_q["task"]), strict=True):
        if kept_per_query.get(qid, 0) == 0:
            report.no_usable_response += 1
            report.no_usable_by_task[task] = report.no_usable_by_task.get(task, 0) + 1
    return examples, report
