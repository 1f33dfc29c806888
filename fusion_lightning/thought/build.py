"""Build (or extend) a template library from a log: select → summarise → embed → dedup → save.

Every selected query's exemplar (its best response, uncut: the length cap `selection.max_chars` is
what the summariser sees) is stored too, also for queries already in the library, so building an
older library again adds its exemplars without asking the summariser anything.

Resumable: queries already in the library are skipped, the library is saved after every batch
(atomically), and the HTTP backend's disk cache answers the requests of an interrupted batch again
for free. Failed queries are recorded in `failures.jsonl` with their reason and tried again on the
next run (their cached answers make that cheap).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fusion_lightning.data.arrow import as_objects
from fusion_lightning.data.encoders import Encoder
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.select import Example
from fusion_lightning.io import atomic_write
from fusion_lightning.thought.library import Exemplar, Template, TemplateLibrary
from fusion_lightning.thought.select import TemplateSelection, cap_response, select_for_templates
from fusion_lightning.thought.summarise import Summariser


@dataclass
class BuildReport:
    queries: int = 0  # queries in the log
    no_usable_response: int = 0
    skipped: int = 0  # already in the library
    built: int = 0  # new templates stored
    deduplicated: int = 0  # merged into an existing template
    failed: int = 0
    library_size: int = 0
    exemplars_added: int = 0

    def lines(self) -> list[str]:
        return [f"built {self.built:,}, failed {self.failed:,}, deduplicated {self.deduplicated:,}, "
                f"skipped {self.skipped:,} (already in the library) -> {self.library_size:,} templates",
                f"{self.queries:,} queries, {self.no_usable_response:,} without a correct response; "
                f"{self.exemplars_added:,} exemplars added"]


def templates_from(groups: Sequence[list[Example]], parts_text: Sequence[str], domains: dict[str, str],
                   summariser: str) -> list[Template]:
    return [Template(id=Template.content_id(g[0].task, text), task=g[0].task, domain=domains.get(g[0].query_id),
                     text=text, query_ids=[g[0].query_id], questions=[g[0].query], models=[e.source for e in g],
                     summarisers=[summariser], scores=[e.performance for e in g], judges=[e.judge for e in g])
            for g, text in zip(groups, parts_text, strict=True)]


def exemplar_of(group: Sequence[Example]) -> Exemplar:
    """A query's exemplar: the best-scoring of its selected responses (ties: the selection's order)."""
    best = max(enumerate(group), key=lambda x: (x[1].performance if x[1].performance is not None else -1.0, -x[0]))[1]
    return Exemplar(best.query_id, best.task, best.query, best.response, best.source, best.performance)


def build_library(logs: LogTable, summariser: Summariser, encoder: Encoder, out: str | Path | None,
                  selection: TemplateSelection | None = None, dedup_threshold: float = 0.95,
                  batch_size: int = 64, library: TemplateLibrary | None = None,
                  progress: bool = True) -> tuple[TemplateLibrary, BuildReport]:
    """Append templates for the log's queries to `library` (else the one at `out`, else a new one)."""
    out = Path(out) if out is not None else None
    if library is None:
        library = (TemplateLibrary.load(out) if out is not None and (out / "library.json").is_file()
                   else TemplateLibrary(encoder.name, dedup_threshold))
    if library.encoder != encoder.name:
        raise ValueError(f"library at {out} was embedded with {library.encoder!r}, not {encoder.name!r}; "
                         f"build with encoder={library.encoder} or use a new out= folder")
    selection = selection or TemplateSelection()
    # uncut responses: the exemplars keep them whole; the summariser sees them cut at selection.max_chars
    groups_by_q, sel = select_for_templates(logs, replace(selection, max_chars=None))
    qt = logs.query_table()
    domains = dict(zip(as_objects(qt["query_id"]), as_objects(qt["domain"]), strict=True))
    metrics = dict(zip(as_objects(qt["query_id"]), as_objects(qt["metric"]), strict=True))
    report = BuildReport(queries=sel.queries, no_usable_response=sel.no_usable_response)
    report.exemplars_added = library.add_exemplars([exemplar_of(g) for g in groups_by_q.values()])
    done = library.query_ids
    todo = [g for q, g in groups_by_q.items() if q not in done]
    report.skipped = len(groups_by_q) - len(todo)
    failures = {f["query_id"]: f for f in library.failures}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"templates ({summariser.name})", unit="query", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        shown = [[replace(e, response=cap_response(e.response, selection.max_chars)) for e in g] for g in batch]
        results = summariser.summarise(shown, [metrics.get(g[0].query_id) for g in batch])
        ok = [(g, r) for g, r in zip(batch, results, strict=True) if r.parts is not None]
        for g, r in zip(batch, results, strict=True):
            if r.parts is None:
                failures[r.query_id] = {"query_id": r.query_id, "task": g[0].task, "error": r.error,
                                        "attempts": r.attempts, "summariser": summariser.name}
            else:
                failures.pop(r.query_id, None)
        new = templates_from([g for g, _ in ok], [r.parts.text for _, r in ok], domains, summariser.name)
        counts = library.add(new, encoder.encode([t.text for t in new])) if new else {"added": 0, "merged": 0}
        report.built += counts["added"]
        report.deduplicated += counts["merged"]
        library.failures = list(failures.values())
        if out is not None:
            library.save(out)
        bar.update(len(batch))
    bar.close()
    report.failed = len(library.failures)
    report.library_size = len(library)
    if out is not None:
        library.save(out)
        atomic_write(out / "build_report.json", json.dumps(asdict(report), indent=2))
    return library, report
