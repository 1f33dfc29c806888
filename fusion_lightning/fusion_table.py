"""The fusion evaluation table: every single model, best single, each fusion level given, and oracle.

All columns are scored on the same evaluation queries (a split of the log, optionally a seeded
sample of `max_per_task` queries per task), so the numbers are comparable:

- single models, best single (chosen on train, `query.metrics.baseline_choices`) and oracle come
  from the log's recorded scores and costs;
- query level: a router checkpoint routes each query; the recorded score and cost of the model it
  picks are counted (offline, no generation);
- thought level (live): a backend answers each query zero-shot, few-shot (`shots` (default `k`) random
  solved examples, in the exemplars' prompt and token budget: with a template library, from the very
  pool `exemplars` retrieves from under the same task filter, so only retrieval differs; without one,
  or with `few_shot_pool: solved`, from the train queries some model solved, by `data.select`) and,
  with a template library, in the thought
  stage's modes (`templates`, `exemplars`: the retrieved solved examples, `both`; prompts from
  `thought.prompt`, their demonstrations within `budget_tokens` of the backend's tokenizer; a query
  never sees its own template or answer), and `selected`: the mode and k val chose for this backend
  (`thought_auto`'s `thought_selection.json` next to the library, or `selection`); a prompt several
  columns share is generated once;
- model level (live): a student directory (LocalBackend) answers zero-shot.
Live columns are scored with the task's scorer against the ground truth; cost is the backend's
token counts × the catalog's prices where the catalog has the model, else missing (NaN).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusion_lightning.data.logtable import LogTable
from fusion_lightning.data.matrix import QueryMatrix, TaskNormaliser
from fusion_lightning.query.metrics import RoutingArrays, baseline_choices, choose, gap_closed
from fusion_lightning.scoring.formats import zero_shot_prompt

THOUGHT_KEYS = ("backend", "shots", "library", "retriever_ckpt", "k", "task_filter", "modes", "budget_tokens",
                "selection", "few_shot_pool")
THOUGHT_COLUMNS = ("zero_shot", "few_shot", "templates", "exemplars", "both", "selected")  # `none` is zero_shot


@dataclass
class Evaluation:
    split: str
    query_ids: np.ndarray
    tasks: np.ndarray
    domains: np.ndarray
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (perf[N], cost[N])
    kinds: dict[str, str] = field(default_factory=dict)  # name -> single|best_single|query|thought|model|oracle
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, kind: str, perf: np.ndarray, cost: np.ndarray) -> None:
        self.columns[name] = (np.asarray(perf, float), np.asarray(cost, float))
        self.kinds[name] = kind


def _arrays(qm: QueryMatrix, norm: TaskNormaliser) -> RoutingArrays:
    return RoutingArrays(qm.performance, qm.cost, norm.performance(qm.performance, qm.tasks),
                         norm.cost(qm.cost, qm.tasks), qm.mask, qm.tasks, qm.judge)


def eval_queries(qm: QueryMatrix, tasks: list[str] | None, max_per_task: int | None, seed: int) -> np.ndarray:
    """Row indices of the evaluation queries: optional task filter, then a seeded sample per task."""
    keep = np.ones(len(qm), bool) if not tasks else np.isin(qm.tasks, tasks)
    if tasks:
        unknown = sorted(set(tasks) - set(qm.tasks.tolist()))
        if unknown:
            raise ValueError(f"tasks {unknown} have no queries in this split; present: {sorted(set(qm.tasks.tolist()))}")
    idx = np.flatnonzero(keep)
    if max_per_task:
        rng = np.random.default_rng(seed)
        parts = []
        for t in sorted(set(qm.tasks[idx].tolist())):
            rows = idx[qm.tasks[idx] == t]
            rows = rows[np.argsort(qm.query_ids[rows])]  # independent of row order
            parts.append(np.sort(rng.permutation(rows)[:max_per_task]))
        idx = np.sort(np.concatenate(parts)) if parts else idx
    if not len(idx):
        raise ValueError("no evaluation queries")
    return idx


def _solved_examples(train: LogTable) -> dict[str, list[tuple[str, str]]]:
    """task -> (query, best response) of the train queries some model solved (top score 1)."""
    from fusion_lightning.data.select import SelectionConfig, select_responses

    examples, _ = select_responses(train, SelectionConfig(strategy="performance", k=1))
    out: dict[str, list[tuple[str, str]]] = {}
    for e in examples:
        if e.performance is not None and e.performance >= 1.0:
            out.setdefault(e.task, []).append((e.query, e.response))
    return out


def _few_shot_prompts(out: Evaluation, logs: LogTable, aug, queries: list[str], tasks: list[str], metrics: list,
                      settings, count, own: list[set[str]]) -> list[str]:
    """The random few-shot column: `settings.k` random solved examples of the query's task in the exemplars'
    prompt and token budget. With a library (`aug`), from the pool `exemplars` retrieves from, under the same
    task filter (like for like: only retrieval differs); else from the train questions some model solved
    (top score 1)."""
    from fusion_lightning.thought.prompt import Demonstration, fit_prompts

    if aug is not None:
        demos, what = aug.random_demonstrations(tasks, settings.k, own), "library exemplar"
    else:
        solved, rng = _solved_examples(logs.select("train")), np.random.default_rng(0)
        demos, what = [], "solved train example"
        for t in tasks:
            pool = solved.get(t, [])
            demos.append([Demonstration(pool[i][0], solution=pool[i][1]) for i in rng.permutation(len(pool))[: settings.k]])
    no_pool = sorted({t for t, ds in zip(tasks, demos, strict=True) if not ds})
    if no_pool:
        out.notes.append(f"few-shot: no {what} for task(s) {no_pool}: zero-shot there")
    return fit_prompts(queries, demos, metrics, settings, count)


def _generate(backend, prompts: list[str], golds: list, metrics: list, catalog, sampling,
              memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and costs of `prompts` through `backend`; `memo` (prompt -> generation) answers prompts
    another column already sent, so each distinct prompt is generated once."""
    from fusion_lightning.scoring import score

    memo = {} if memo is None else memo
    todo = [p for p in dict.fromkeys(prompts) if p not in memo]
    if todo:
        memo.update(zip(todo, backend.generate(todo, **(sampling or {})), strict=True))
    gens = [memo[p] for p in prompts]
    perf = np.array([np.nan if g.error else score(g.text, gt, m) for g, gt, m in zip(gens, golds, metrics, strict=True)])
    info = catalog.models.get(backend.name)
    cost = np.array([np.nan if info is None or (c := info.call_cost(g.input_tokens, g.output_tokens)) is None else c
                     for g in gens])
    return perf, cost


def evaluate(logs: LogTable, *, routers: Mapping[str, Any] | None = None, thought: Mapping[str, Any] | None = None,
             student: Mapping[str, Any] | None = None, split: str = "test", lam: float = 0.0,
             tasks: list[str] | None = None, max_per_task: int | None = None, seed: int = 0,
             sampling: Mapping[str, Any] | None = None) -> Evaluation:
    """The table's columns over the evaluation queries of `split` (see the module docstring).

    `routers`: name -> checkpoint path (or a loaded Router). `thought`: {backend: build_backend
    config, shots: 3, library: DIR, retriever_ckpt, k, task_filter}. `student`: a `type: local`
    backend config without the type (`model: DIR`, `name`, ...).
    """
    full = logs.matrix()
    train_qm, ev_all = full.split("train"), full.split(split)
    if not len(train_qm) or not len(ev_all):
        raise ValueError(f"need train and {split} queries; the log has {len(train_qm)} train, {len(ev_all)} {split}")
    ev = ev_all.take(eval_queries(ev_all, tasks, max_per_task, seed))
    norm = TaskNormaliser.fit(train_qm)
    tr_a, ev_a = _arrays(train_qm, norm), _arrays(ev, norm)
    out = Evaluation(split, ev.query_ids, ev.tasks, ev.domains)
    rows = np.arange(len(ev))
    for j, m in enumerate(ev.models):
        out.add(m, "single", np.where(ev.mask[:, j], ev.performance[:, j], np.nan), np.where(ev.mask[:, j], ev.cost[:, j], np.nan))
    sizes = [logs.catalog[m].params_b if m in logs.catalog else None for m in ev.models]
    base = baseline_choices(tr_a, ev_a, "performance_first", sizes)
    best_name = ev.models[int(base["best_single"][0])] if len(ev) else ""
    # the fixed model of best single is the train argmax; a query without its call falls back (metrics.py)
    out.add("best_single", "best_single", ev.performance[rows, base["best_single"]], ev.cost[rows, base["best_single"]])
    out.info["best_single_model"] = best_name
    out.info["routers"] = {}
    for name, r in (routers or {}).items():
        from fusion_lightning.query.router import Router

        router = r if isinstance(r, Router) else Router.load(r)
        try:
            scores, res = router.scores_over(ev.queries, list(ev.tasks), ev.models, lam)
        except ValueError as e:
            raise ValueError(f"router {name}: {e}") from None
        c = choose(scores, ev.mask & np.isfinite(scores))
        col = f"router:{name}"
        out.add(col, "query", ev.performance[rows, c], ev.cost[rows, c])
        out.info["routers"][name] = {"checkpoint": str(r) if not isinstance(r, Router) else "",
                                     "models_not_in_log": sorted(set(res.candidates) - set(ev.models)),
                                     "choices": {m: int((c == j).sum()) for j, m in enumerate(ev.models) if (c == j).any()}}
    if thought or student:
        _live(out, logs, ev, thought, student, sampling)
    out.add("oracle", "oracle", ev.performance[rows, base["oracle"]], ev.cost[rows, base["oracle"]])
    bs, orc = np.nanmean(out.columns["best_single"][0]), np.nanmean(out.columns["oracle"][0])
    out.info["gap_closed"] = {n: gap_closed(float(np.nanmean(p)), float(bs), float(orc))
                              for n, (p, _) in out.columns.items() if out.kinds[n] in ("query", "thought", "model")}
    return out


def _live(out: Evaluation, logs: LogTable, ev: QueryMatrix, thought, student, sampling) -> None:
    """Generate and score the thought- and model-level columns on the evaluation queries."""
    from fusion_lightning.serving import build_backend

    qt = {r["query_id"]: r for r in logs.query_table().to_pylist()}
    golds = [qt[q]["ground_truth"] for q in ev.query_ids]
    metrics = [qt[q]["metric"] for q in ev.query_ids]
    missing = sum(g is None or m is None for g, m in zip(golds, metrics, strict=True))
    if missing:
        raise ValueError(f"{missing} of {len(ev)} evaluation queries have no ground truth or metric; "
                         "live columns (thought, student) need both: restrict with tasks=[...]")
    tasks = list(ev.tasks)
    if thought:
        cfg = dict(thought)
        unknown = sorted(set(cfg) - set(THOUGHT_KEYS))
        if unknown or "backend" not in cfg:
            raise ValueError(f"thought config needs 'backend'; valid keys {list(THOUGHT_KEYS)}; unknown: {unknown}")
        backend = build_backend(cfg["backend"])
        modes = list(cfg.get("modes") or (["zero_shot", "few_shot"] + (["templates"] if cfg.get("library") else [])))
        modes = ["zero_shot" if m == "none" else m for m in modes]
        bad = sorted(set(modes) - set(THOUGHT_COLUMNS))
        if bad:
            raise ValueError(f"thought.modes {bad} unknown; choose from {', '.join(THOUGHT_COLUMNS)}")
        library_modes = [m for m in modes if m in ("templates", "exemplars", "both", "selected")]
        if library_modes and not cfg.get("library"):
            raise ValueError(f"thought.modes {library_modes} need a template library (thought.library=DIR)")
        prompts: dict[str, list[str]] = {}
        if "zero_shot" in modes:
            prompts["zero_shot"] = [zero_shot_prompt(q, m) for q, m in zip(ev.queries, metrics, strict=True)]
        k, budget = int(cfg.get("k") or 3), cfg.get("budget_tokens", 1024)
        shots = int(cfg.get("shots") or k)
        pool = cfg.get("few_shot_pool") or ("library" if cfg.get("library") else "solved")
        if pool not in ("library", "solved"):
            raise ValueError(f"thought.few_shot_pool={pool!r}; choose library (the exemplars' pool) or solved")
        aug = None
        if library_modes or ("few_shot" in modes and pool == "library"):
            if not cfg.get("library"):
                raise ValueError("thought.few_shot_pool=library needs a template library (thought.library=DIR)")
            from fusion_lightning.thought.prompt import TemplateAugmenter

            aug = TemplateAugmenter.load(cfg["library"], cfg.get("retriever_ckpt"), k=k,
                                         task_filter=bool(cfg.get("task_filter", True)), mode="auto",
                                         budget_tokens=budget, selection=cfg.get("selection"))
        from fusion_lightning.thought.prompt import ThoughtSettings, token_counter

        if aug is not None and not aug.library.exemplars:
            if {"exemplars", "both"} & set(modes) or cfg.get("few_shot_pool") == "library":
                raise ValueError(f"thought library {cfg['library']} has no exemplars (built before they existed): build "
                                 "it again from its log (python -m fusion_lightning.templates build ... out=LIB)")
            if "few_shot" in modes:
                out.notes.append("few-shot: the library has no exemplars (built before them): the solved train pool")
        count, own = token_counter(backend), [{q} for q in ev.query_ids.tolist()]
        if "few_shot" in modes:
            prompts["few_shot"] = _few_shot_prompts(out, logs, aug if pool == "library" and aug.library.exemplars
                                                    else None, list(ev.queries), tasks, metrics,
                                                    ThoughtSettings("exemplars", shots, budget), count, own)
        if library_modes:
            for mode in library_modes:  # a query never sees its own template or answer
                if mode == "selected":
                    if backend.name not in aug.selection:
                        raise ValueError(f"thought.modes has 'selected' but val chose nothing for {backend.name!r} "
                                         f"(selected: {sorted(aug.selection) or 'none'}): run recipe=thought_auto "
                                         f"with this backend on the library first")
                    out.info.setdefault("thought_selected", {})[backend.name] = aug.describe(backend.name)
                    aug.set_token_counter(backend.name, count)  # per task where the selection chose per task
                    prompts[mode] = aug.prompts(list(ev.queries), tasks, metrics, model=backend.name, exclude=own)
                else:
                    prompts[mode] = aug.render(list(ev.queries), tasks, metrics, ThoughtSettings(mode, k, budget),
                                               count, own)
        memo: dict = {}
        for mode in [m for m in modes if m in prompts]:
            out.add(f"thought:{mode}", "thought",
                    *_generate(backend, prompts[mode], golds, metrics, logs.catalog, sampling, memo))
        out.info["thought_backend"] = backend.name
    if student:
        backend = build_backend({"type": "local", **dict(student)})
        ps = [zero_shot_prompt(q, m) for q, m in zip(ev.queries, metrics, strict=True)]
        out.add(f"student:{backend.name}", "model", *_generate(backend, ps, golds, metrics, logs.catalog, sampling))


def table_rows(ev: Evaluation) -> list[dict[str, Any]]:
    """Rows: each task (grouped by domain, sorted), each domain's average (mean over its tasks), the
    overall average (mean over tasks) and `all queries` (mean over queries). Per column: perf, cost."""
    tasks_by_domain: dict[str, list[str]] = {}
    for t, d in sorted(set(zip(ev.tasks.tolist(), ev.domains.tolist(), strict=True)), key=lambda x: (x[1], x[0])):
        tasks_by_domain.setdefault(d, []).append(t)

    def mean(v: np.ndarray) -> float:
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else float("nan")

    per_task: dict[str, dict[str, Any]] = {}
    for t in ev.tasks.tolist():
        if t in per_task:
            continue
        sel = ev.tasks == t
        row: dict[str, Any] = {"row": t, "kind": "task", "queries": int(sel.sum())}
        for name, (p, c) in ev.columns.items():
            row[f"{name}_perf"], row[f"{name}_cost"] = mean(p[sel]), mean(c[sel])
        per_task[t] = row

    def average(label: str, kind: str, names: list[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"row": label, "kind": kind, "queries": sum(per_task[t]["queries"] for t in names)}
        for col in ev.columns:
            for s in ("perf", "cost"):
                row[f"{col}_{s}"] = mean(np.array([per_task[t][f"{col}_{s}"] for t in names], float))
        return row

    out: list[dict[str, Any]] = []
    for d, ts in tasks_by_domain.items():
        out.extend({**per_task[t], "domain": d} for t in ts)
        out.append({**average(f"{d} (avg)", "domain", ts), "domain": d})
    out.append({**average("overall (task avg)", "overall", list(per_task)), "domain": ""})
    row: dict[str, Any] = {"row": "all queries", "kind": "all", "queries": len(ev.tasks), "domain": ""}
    for name, (p, c) in ev.columns.items():
        row[f"{name}_perf"], row[f"{name}_cost"] = mean(p), mean(c)
    out.append(row)
    return out


def _nanmean_rows(stack: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where a column has no value (no warning)."""
    ok = ~np.isnan(stack)
    n = ok.sum(0)
    return np.divide(np.where(ok, stack, 0.0).sum(0), n, out=np.full(stack.shape[1:], np.nan), where=n > 0)


def _percentiles(x: np.ndarray, level: float) -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if not len(x):
        return float("nan"), float("nan")
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def add_confidence(ev: Evaluation, rows: list[dict[str, Any]], n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0, reference: str = "best_single") -> None:
    """Paired bootstrap CIs for every performance cell of `table_rows(ev)` (in place).

    One replicate resamples the evaluation questions with replacement within each task (a task keeps
    its question count, so task, domain and overall rows stay defined); the same resampled indices
    serve every column, so a column's difference from `reference` is paired. Replicate draws: for each
    task in sorted order, `rng.integers(0, n_task, size=(n_boot, n_task))` with
    `rng = np.random.default_rng(seed)`. Adds per column `<col>_perf_lo`/`_perf_hi` (percentile
    interval at `level`), `<col>_n` (questions with a score), and `<col>_diff` (minus `reference`)
    with `<col>_diff_lo`/`_diff_hi`.
    """
    if n_boot < 1:
        raise ValueError(f"bootstrap needs n_boot >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    if reference not in ev.columns:
        raise ValueError(f"reference column {reference!r} not in the table {list(ev.columns)}")
    tasks = sorted(set(ev.tasks.tolist()))
    rng = np.random.default_rng(seed)
    draws = {}
    for t in tasks:
        pos = np.flatnonzero(ev.tasks == t)
        draws[t] = pos[rng.integers(0, len(pos), size=(n_boot, len(pos)))]
    row_tasks = {r["row"]: [t for t in tasks if (r["kind"] == "task" and r["row"] == t)
                            or (r["kind"] == "domain" and ev.domains[ev.tasks == t][0] == r["domain"])
                            or r["kind"] in ("overall", "all")] for r in rows}
    reps: dict[str, dict[str, np.ndarray]] = {}  # column -> row label -> (n_boot,) replicate statistics
    for col, (p, _) in ev.columns.items():
        sums, counts = {}, {}
        for t in tasks:
            v = p[draws[t]]
            ok = ~np.isnan(v)
            sums[t], counts[t] = np.where(ok, v, 0.0).sum(1), ok.sum(1)
        per = {t: np.divide(sums[t], counts[t], out=np.full(n_boot, np.nan), where=counts[t] > 0) for t in tasks}
        reps[col] = {}
        for r in rows:
            ts = row_tasks[r["row"]]
            if r["kind"] == "all":  # pooled over questions
                n = sum(counts[t] for t in ts)
                reps[col][r["row"]] = np.divide(sum(sums[t] for t in ts), n, out=np.full(n_boot, np.nan), where=n > 0)
            else:  # a task, or a mean over tasks
                reps[col][r["row"]] = _nanmean_rows(np.stack([per[t] for t in ts]))
    for r in rows:
        sel = np.isin(ev.tasks, row_tasks[r["row"]])
        for col, (p, _) in ev.columns.items():
            r[f"{col}_n"] = int((~np.isnan(p[sel])).sum())
            r[f"{col}_perf_lo"], r[f"{col}_perf_hi"] = _percentiles(reps[col][r["row"]], level)
            r[f"{col}_diff"] = r[f"{col}_perf"] - r[f"{reference}_perf"]
            d = reps[col][r["row"]] - reps[reference][r["row"]]
            r[f"{col}_diff_lo"], r[f"{col}_diff_hi"] = _percentiles(d, level)
    ev.info["bootstrap"] = {"n_boot": n_boot, "level": level, "seed": seed, "reference": reference,
                            "resampling": "questions with replacement within each task, the same draws for every column"}
