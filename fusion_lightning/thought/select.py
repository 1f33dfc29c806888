"""Which logged responses a query's thought template is summarised from.

Reuses the response ranking the model level distils from (`fusion_lightning.data.select`) and adds
what the paper's thought level does differently:
- `hybrid` (the paper's): the top `pool_size` (5) by performance then cost, re-ranked by judge then
  cost, keep the top `n` (3);
- `performance` / `judge`: the model level's strategies, keep the top `n`;
- a per-response length cap (`max_chars`): the summariser sees at most that many characters.
Wrong answers (score 0) never make a template; the model pool filter and `min_judge` carry over.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.select import Example, SelectionConfig, SelectionReport, select_responses

THOUGHT_STRATEGIES = ("performance", "judge", "hybrid")


@dataclass
class TemplateSelection:
    strategy: str = "hybrid"
    n: int = 3  # responses per query the template is built from
    pool_size: int = 5  # hybrid: first-stage candidates by performance
    pool: list[str] | None = None  # only these models' responses
    min_judge: float | None = None
    max_chars: int | None = 2000  # length cap per response (None: no cap)


def cap_response(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip() + " …"


def select_for_templates(logs: LogTable, cfg: TemplateSelection) -> tuple[dict[str, list[Example]], SelectionReport]:
    """query_id -> its selected responses (best first); queries with no correct response are absent."""
    if cfg.strategy not in THOUGHT_STRATEGIES:
        raise ValueError(f"selection.strategy={cfg.strategy!r}; choose from: {', '.join(THOUGHT_STRATEGIES)}")
    if cfg.n < 1 or cfg.pool_size < 1:
        raise ValueError(f"selection.n and selection.pool_size must be >= 1, got {cfg.n}, {cfg.pool_size}")
    if cfg.max_chars is not None and cfg.max_chars < 1:
        raise ValueError(f"selection.max_chars must be >= 1 or null, got {cfg.max_chars}")
    first = "performance" if cfg.strategy == "hybrid" else cfg.strategy
    k = max(cfg.pool_size, cfg.n) if cfg.strategy == "hybrid" else cfg.n
    examples, report = select_responses(logs, SelectionConfig(strategy=first, k=k, stop_at_zero=True,
                                                              pool=cfg.pool, min_judge=cfg.min_judge))
    by_query: dict[str, list[Example]] = {}
    for e in examples:
        by_query.setdefault(e.query_id, []).append(e)
    for qid, items in by_query.items():
        if cfg.strategy == "hybrid":  # re-rank the performance pool by judge (unjudged last), then cost
            items = sorted(items, key=lambda e: (-(e.judge if e.judge is not None else -1.0),
                                                 e.cost if e.cost is not None else float("inf")))
        by_query[qid] = [replace(e, rank=r, response=cap_response(e.response, cfg.max_chars))
                         for r, e in enumerate(items[: cfg.n], start=1)]
    kept = [e for v in by_query.values() for e in v]
    report.examples = len(kept)
    report.per_task, report.per_source = dict(Counter(e.task for e in kept)), dict(Counter(e.source for e in kept))
    return by_query, report
