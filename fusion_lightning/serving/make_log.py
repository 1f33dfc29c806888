"""Make a multi-LLM log: every query to every backend, scored, priced, optionally judged.

Records are written in LLMFusionBench's row format (one JSON line per (query, model) call), so the
`llmfusionbench` reader reads the log back like any downloaded one. Resumable twice over: the HTTP
backends' disk cache never pays for an answer twice, and records already in the output file are
skipped (key: query id + model). Each chunk of answers is appended and flushed as it completes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_lightning.data.schema import ModelCatalog, make_query_id
from fusion_lightning.data.text import read_input_lines
from fusion_lightning.scoring import resolve_metric, score
from fusion_lightning.scoring.formats import with_choices, zero_shot_prompt
from fusion_lightning.serving import Backend, build_backend
from fusion_lightning.serving.judge import judge_responses

THINK_SUFFIX = "_think"  # LLMFusionBench's name for the reasoning-prompt variant of a model
THINK_LINE = "Let's think step by step."


@dataclass
class QueryRecord:
    query_id: str
    task: str
    query: str
    ground_truth: str
    metric: str
    line: int


def read_query_file(path: str | Path) -> list[QueryRecord]:
    """Queries of a JSONL file (`task_name`, `query`, `ground_truth`, `metric`; optional `query_id`,
    and `choices`: a multiple-choice (`em_mc`) question's options, written below its text as "(A) ..."
    lines, as LLMRouter's query files keep them apart from the question; other metrics ignore them).

    Raises ValueError naming every bad line and field; nothing is skipped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such query file (queries=)")
    def check(rec: dict[str, Any]) -> list[str]:
        task = rec.get("task_name", rec.get("task"))
        problems = [f"field {k!r} missing or empty" for k, v in
                    (("task_name", task), ("query", rec.get("query")), ("ground_truth", rec.get("ground_truth")),
                     ("metric", rec.get("metric"))) if not isinstance(v, str) or not v.strip()]
        if not problems and resolve_metric(rec["metric"]) is None:
            problems.append(f"field 'metric': unknown metric {rec['metric']!r}")
        if not problems and _mc_choices(rec) is not None:
            try:
                with_choices(rec["query"], rec["choices"], rec["ground_truth"])
            except ValueError as e:
                problems.append(f"field 'choices': {e}")
        return problems

    out = []
    for i, rec in read_input_lines(path, check):
        task = rec.get("task_name", rec.get("task"))
        query, gold = rec["query"], rec["ground_truth"]
        if _mc_choices(rec) is not None:
            query, gold = with_choices(query, rec["choices"], gold)
        qid = str(rec.get("query_id") or make_query_id(task, query))
        out.append(QueryRecord(qid, task, query, gold, rec["metric"], i))
    if not out:
        raise ValueError(f"{path}: no queries")
    return out


def _mc_choices(rec: Mapping[str, Any]) -> Any:
    """The options of a multiple-choice record, None for other metrics (MBPP keeps its tests there) and
    where there are none (null; an empty list or "[]" is an error in `lettered_choices`)."""
    return rec.get("choices") if resolve_metric(rec["metric"]) == "em_mc" and rec.get("choices") is not None else None


def read_done(out: Path) -> set[tuple[str, str]]:
    """(query_id, llm) of the records already written. A torn last line (a crash mid-write) is cut
    off and reported; any other bad line is an error naming it."""
    done: set[tuple[str, str]] = set()
    if not out.exists():
        return done
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done.add((str(rec["query_id"]), str(rec["llm"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if i == len(lines) and not raw.endswith(b"\n"):  # torn final write: drop it, redo that call
                with out.open("r+b") as fh:
                    fh.truncate(len(raw) - len(line))
                print(f"note: {out}: line {i} was an incomplete record (interrupted write); it will be redone")
                break
            raise ValueError(f"{out}: line {i}: not a collect record ({type(e).__name__}: {e})") from None
    return done


@dataclass
class CollectReport:
    out: str
    written: int = 0
    skipped: int = 0  # already in the output file
    cached: int = 0  # answered from a backend's disk cache
    failed: int = 0  # the backend gave up (errors=return): not written, retried by the next run
    judged: int = 0
    judge_missing: int = 0  # judge answers that could not be parsed, or failed judge calls (null, not 0)
    per_model: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _prompt(q: QueryRecord, think: bool) -> str:
    base = zero_shot_prompt(q.query, q.metric)
    return f"{base}\n\n{THINK_LINE}" if think else base


def _prices(catalog: ModelCatalog | None, name: str) -> tuple[float | None, float | None, str]:
    if catalog is None:
        return None, None, ""
    info = catalog[name]
    return info.input_price, info.output_price, info.description


def collect(queries: Sequence[QueryRecord], backends: Sequence[Backend | Mapping[str, Any]], out: str | Path, *,
            catalog: ModelCatalog | None = None, think: bool = False, judge: Backend | Mapping | None = None,
            sampling: Mapping[str, Any] | None = None, chunk_size: int = 32, progress: bool = True) -> CollectReport:
    """Send every query to every backend (and its `_think` variant with `think`), write log records."""
    from tqdm.auto import tqdm

    built = [b if isinstance(b, Backend) else build_backend(b) for b in backends]
    judge_b = judge if judge is None or isinstance(judge, Backend) else build_backend(judge)
    names = [b.name for b in built]
    if len(set(names)) != len(names):
        raise ValueError(f"backend names must be unique (they are the model names in the log): {names}")
    if catalog is not None:
        missing = [n for n in names if n not in catalog]
        if missing:
            raise ValueError(f"model(s) {missing} not in the catalog ({catalog.source}); add them with prices")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    report = CollectReport(str(out))
    if catalog is None:
        report.notes.append("no catalog given: prices and costs are null")
    jobs = []  # (backend, variant name, think, pending queries)
    for b in built:
        for variant, th in [(b.name, False)] + ([(b.name + THINK_SUFFIX, True)] if think else []):
            pending = [q for q in queries if (q.query_id, variant) not in done]
            report.skipped += len(queries) - len(pending)
            jobs.append((b, variant, th, pending))
    bar = tqdm(total=sum(len(j[3]) for j in jobs), desc="collect", unit="call", disable=not progress)
    with out.open("a", encoding="utf-8") as fh:
        for b, variant, th, pending in jobs:
            in_price, out_price, desc = _prices(catalog, b.name)
            for start in range(0, len(pending), chunk_size):
                chunk = pending[start:start + chunk_size]
                gens = b.generate([_prompt(q, th) for q in chunk], **(sampling or {}))
                ok = [(q, g) for q, g in zip(chunk, gens, strict=True) if not g.error]
                report.failed += len(chunk) - len(ok)
                judged = None
                if judge_b is not None and ok:
                    judged = judge_responses(judge_b, [q.query for q, _ in ok], [q.ground_truth for q, _ in ok],
                                             [g.text for _, g in ok])
                    report.judged += len(ok)
                    report.judge_missing += judged.unparseable + judged.failed
                for k, (q, g) in enumerate(ok):
                    cost = None
                    if in_price is not None and out_price is not None:
                        cost = ((g.input_tokens or 0) * in_price + (g.output_tokens or 0) * out_price)  # µ$
                    rec = {"query_id": q.query_id, "task_name": q.task, "query": q.query,
                           "ground_truth": q.ground_truth, "metric": q.metric, "llm": variant,
                           "input_price": in_price, "output_price": out_price, "llm_description": desc,
                           "input_tokens_num": g.input_tokens, "output_tokens_num": g.output_tokens,
                           "performance": score(g.text, q.ground_truth, q.metric), "cost": cost,
                           "response": g.text, "llm_judge": judged.scores[k] if judged else None,
                           "latency_s": round(g.latency_s, 4)}
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    report.written += 1
                    report.cached += g.cached
                    report.per_model[variant] = report.per_model.get(variant, 0) + 1
                fh.flush()
                bar.update(len(chunk))
    bar.close()
    if report.failed:
        report.notes.append(f"{report.failed} call(s) failed and were not written; re-run to retry them")
    if report.judge_missing:
        report.notes.append(f"{report.judge_missing} judgement(s) unparseable or failed: llm_judge is null there")
    return report
