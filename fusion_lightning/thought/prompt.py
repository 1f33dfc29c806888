"""Prompt assembly for thought-level fusion, and the `TemplateAugmenter` the fused pipeline, `serve` and
`evaluate` call.

Four modes (`ThoughtSettings.mode`), one retrieval: the query's top templates under the retriever (the
trained one, or the frozen encoder the library was embedded with), same-task only with the task
filter, nearest first.

- `templates` (the paper's prompt): the k retrieved (question, template) pairs, then the query;
- `exemplars`: the log's best responses to the retrieved templates' source questions, as k solved
  demonstrations (question + solution, the format of the random `few_shot_prompt` baseline): the
  nearest solved train queries, reached through the same library, retriever and task filter;
- `both`: per retrieved template, its source question, the template and the solution;
- `none`: the zero-shot prompt.
Every prompt ends with the answer instruction of the query's scorer (`scoring.formats.answer_instruction`:
`####` for GSM8K, `\\boxed{}` for MATH, `(letter)` for multiple choice, a code fence for code).

Order and budget: demonstrations come nearest first (the template's retrieval rank; a template that
merged several source queries gives its exemplars in provenance order). `budget_tokens` caps their
total length in tokens of the target model's tokenizer: a demonstration (as rendered, with its
separator) is kept whole or left out, never cut; one that does not fit in what is left is skipped
and the next (nearer-last) ones are still tried. The tokenizer is the backend's own where it has one
(a `LocalBackend`'s `tokenizer`), else `approx_tokens`: ceil(UTF-8 bytes / 4), the usual size of an
English BPE token (an OpenAI-compatible server does not expose its tokenizer).

Per target model: `TemplateAugmenter.selection` maps backend names to the settings val chose for
them (`thought_selection.json` next to the library, written by the `thought_auto` recipe; see
`fusion_lightning.thought.auto`), and `task_selection` to the tasks where the choice differs per task;
`prompts(..., model=NAME)` uses them (per query's task), other models the default.
`mode: auto` (`load_settings`) is how a config asks for that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.scoring.formats import answer_instruction, zero_shot_prompt
from fusion_lightning.thought.library import Template, TemplateLibrary
from fusion_lightning.thought.retriever import TemplateIndex

__all__ = ["MODES", "Demonstration", "TemplateAugmenter", "ThoughtSettings", "approx_tokens", "both_prompt",
           "fit_budget", "fit_prompts", "few_shot_prompt", "template_prompt", "token_counter", "zero_shot_prompt"]

MODES = ("none", "templates", "exemplars", "both")
DEFAULT_BUDGET_TOKENS = 1024
TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class ThoughtSettings:
    """What the thought stage puts in a prompt: `mode` (see the module docstring), `k` demonstrations,
    at most `budget_tokens` tokens of them (None: no cap)."""

    mode: str = "templates"
    k: int = 3
    budget_tokens: int | None = DEFAULT_BUDGET_TOKENS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"thought.mode={self.mode!r}; choose from: {', '.join(MODES)} (or auto)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"thought.k must be an integer >= 1, got {self.k!r}")
        if self.budget_tokens is not None and (isinstance(self.budget_tokens, bool) or self.budget_tokens < 1):
            raise ValueError(f"thought.budget_tokens must be >= 1 or null, got {self.budget_tokens!r}")

    @property
    def name(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode}@{self.k}"


@dataclass(frozen=True)
class Demonstration:
    question: str
    template: str | None = None  # templates, both
    solution: str | None = None  # exemplars, both

    def block(self) -> str:
        parts = [f"Question: {self.question.strip()}"]
        if self.template is not None:
            parts.append(f"Thought template:\n{self.template.strip()}")
        if self.solution is not None:
            parts.append(f"Solution: {self.solution.strip()}")
        return "\n".join(parts)


SEPARATOR = "\n\n"


SELECTION_FILE = "thought_selection.json"  # beside the library: written by thought_auto (thought/auto.py)


def _read_models(path: str | Path) -> dict[str, dict]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ValueError(f"{path} is not a thought selection (no 'models' object)")
    return data["models"]


def read_selection(path: str | Path) -> dict[str, ThoughtSettings]:
    """backend name -> the settings val chose for it (over all tasks)."""
    return {m: ThoughtSettings(e["mode"], int(e["k"]), e.get("budget_tokens")) for m, e in _read_models(path).items()}


def per_task_exceptions(entry: Mapping) -> dict[str, str]:
    """task -> candidate name, for the tasks whose choice differs from the model's overall one."""
    return {t: c["candidate"] for t, c in (entry.get("per_task") or {}).items()
            if (c["mode"], int(c["k"])) != (entry["mode"], int(entry["k"]))}


def read_task_selection(path: str | Path) -> dict[str, dict[str, ThoughtSettings]]:
    """backend name -> task -> the settings chosen for that task where it differs from the model's overall
    choice (a selection made with `per_task`; empty for one made without)."""
    out: dict[str, dict[str, ThoughtSettings]] = {}
    for m, e in _read_models(path).items():
        tasks = {t: ThoughtSettings(e["per_task"][t]["mode"], int(e["per_task"][t]["k"]), e.get("budget_tokens"))
                 for t in per_task_exceptions(e)}
        if tasks:
            out[m] = tasks
    return out


def approx_tokens(text: str) -> int:
    """The fallback token count: ceil(UTF-8 bytes / 4)."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def token_counter(backend) -> TokenCounter:
    """Tokens of a text under `backend`'s own tokenizer (a `LocalBackend`'s), else `approx_tokens`."""
    tok = getattr(backend, "tokenizer", None)
    if tok is None or not callable(tok):
        return approx_tokens
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def fit_budget(blocks: Sequence[str], budget: int | None, count: TokenCounter) -> list[int]:
    """Indices of the blocks kept, in order: each whole (with its separator) or not at all; one that does
    not fit in what is left is skipped and later ones are still tried. `budget` None keeps all."""
    if budget is None:
        return list(range(len(blocks)))
    kept, left = [], budget
    for i, b in enumerate(blocks):
        n = count(b + SEPARATOR)
        if n <= left:
            kept.append(i)
            left -= n
    return kept


def template_prompt(query: str, pairs: Sequence[tuple[str, str]], metric: str | None) -> str:
    """k (question, template) pairs, the query, its answer instruction; no pairs -> the zero-shot prompt."""
    if not pairs:
        return zero_shot_prompt(query, metric)
    shown = SEPARATOR.join(Demonstration(q, template=t).block() for q, t in pairs)
    return (f"Here are similar questions with thought templates that solve them:\n\n{shown}\n\n"
            f"Use the most relevant template to solve this question:\n{query.strip()}\n\n{answer_instruction(metric)}")


def few_shot_prompt(query: str, examples: Sequence[tuple[str, str]], metric: str | None) -> str:
    """k solved (question, solution) examples, the query, its answer instruction: the random few-shot
    baseline's prompt and the `exemplars` mode's."""
    if not examples:
        return zero_shot_prompt(query, metric)
    shown = SEPARATOR.join(Demonstration(q, solution=a).block() for q, a in examples)
    return f"{shown}\n\nQuestion: {query.strip()}\n\n{answer_instruction(metric)}"


def both_prompt(query: str, triples: Sequence[tuple[str, str, str]], metric: str | None) -> str:
    """k (question, template, solution) triples, the query, its answer instruction."""
    if not triples:
        return zero_shot_prompt(query, metric)
    shown = SEPARATOR.join(Demonstration(q, template=t, solution=a).block() for q, t, a in triples)
    return (f"Here are similar solved questions, each with the thought template behind its solution:\n\n{shown}\n\n"
            f"Use the most relevant template to solve this question:\n{query.strip()}\n\n{answer_instruction(metric)}")


def _check_lengths(queries: Sequence[str], tasks: Sequence[str | None], metrics: Sequence[str | None]) -> None:
    if not len(queries) == len(tasks) == len(metrics):
        raise ValueError(f"need one task and metric per query: {len(queries)} queries, {len(tasks)} tasks, "
                         f"{len(metrics)} metrics")


def fit_prompts(queries: Sequence[str], demos: Sequence[Sequence[Demonstration]], metrics: Sequence[str | None],
                settings: ThoughtSettings, count: TokenCounter) -> list[str]:
    """Each query's prompt in `settings.mode` with the whole demonstrations that fit `settings.budget_tokens`."""
    out = []
    for q, ds, m in zip(queries, demos, metrics, strict=True):
        kept = fit_budget([d.block() for d in ds], settings.budget_tokens, count)
        out.append(render(q, [ds[i] for i in kept], settings.mode, m))
    return out


def render(query: str, demos: Sequence[Demonstration], mode: str, metric: str | None) -> str:
    if mode == "none" or not demos:
        return zero_shot_prompt(query, metric)
    if mode == "templates":
        return template_prompt(query, [(d.question, d.template or "") for d in demos], metric)
    if mode == "exemplars":
        return few_shot_prompt(query, [(d.question, d.solution or "") for d in demos], metric)
    return both_prompt(query, [(d.question, d.template or "", d.solution or "") for d in demos], metric)


def load_settings(mode: str = "auto", k: int = 3, budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
                  selection: str | Path | None = None, library_dir: str | Path | None = None
                  ) -> tuple[ThoughtSettings, dict[str, ThoughtSettings], dict[str, dict[str, ThoughtSettings]]]:
    """(default settings, per-model selection, per-model per-task exceptions) of a thought config. `mode:
    auto`: the models val chose for (`selection`, default `<library>/thought_selection.json`, when it
    exists) get their choice (per task where the selection made one), the others `templates` with `k`;
    any other mode applies to every model and task."""

    if mode != "auto":
        return ThoughtSettings(mode, int(k), budget_tokens), {}, {}
    default = ThoughtSettings("templates", int(k), budget_tokens)
    path = Path(selection) if selection else (Path(library_dir) / SELECTION_FILE if library_dir else None)
    if selection and not path.is_file():
        raise FileNotFoundError(f"thought.selection {path} not found")
    if path is None or not path.is_file():
        return default, {}, {}
    return default, read_selection(path), read_task_selection(path)


class TemplateAugmenter:
    """Retrieve from a template library for each query and build the thought stage's prompt.

    `mode`, `k`, `budget_tokens`: the default settings; `selection`: backend name -> its own settings
    (what val chose for it); `task_selection`: backend name -> task -> the settings for that task's
    queries where the selection chose per task (a query without a task gets the model's overall
    settings). Token counts: `set_token_counter(model, fn)` per backend (the pipeline registers each
    backend's tokenizer), else `count_tokens`, else `approx_tokens`."""

    def __init__(self, library: TemplateLibrary, encode_queries, template_vectors: torch.Tensor | np.ndarray,
                 k: int = 3, task_filter: bool = True, mode: str = "templates",
                 budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
                 selection: Mapping[str, ThoughtSettings] | None = None, count_tokens: TokenCounter | None = None,
                 task_selection: Mapping[str, Mapping[str, ThoughtSettings]] | None = None):
        self.settings = ThoughtSettings(mode, k, budget_tokens)
        self.library, self.task_filter = library, task_filter
        self.selection = dict(selection or {})
        self.task_selection = {m: dict(v) for m, v in (task_selection or {}).items()}
        self._encode = encode_queries
        self.index = TemplateIndex(template_vectors, [t.task for t in library.templates])
        self.count_tokens = count_tokens or approx_tokens
        self._counters: dict[str, TokenCounter] = {}

    @property
    def k(self) -> int:
        return self.settings.k

    @classmethod
    def load(cls, library_dir: str | Path, retriever_ckpt: str | Path | None = None, k: int = 3,
             task_filter: bool = True, mode: str = "templates", budget_tokens: int | None = DEFAULT_BUDGET_TOKENS,
             selection: str | Path | None = None) -> TemplateAugmenter:
        """`retriever_ckpt` None: the frozen encoder the library was embedded with (cosine top-k).
        `mode: auto` applies the val selection (see `load_settings`)."""
        default, chosen, per_task = load_settings(mode, k, budget_tokens, selection, library_dir)
        lib = TemplateLibrary.load(library_dir)
        if len(lib) == 0:
            raise ValueError(f"template library {library_dir} is empty")
        every = (default, *chosen.values(), *(s for v in per_task.values() for s in v.values()))
        if any(s.mode in ("exemplars", "both") for s in every) and not lib.exemplars:
            raise ValueError(f"template library {library_dir} has no exemplars (built before they existed): build "
                             "it again from its log (python -m fusion_lightning.templates build ... out=LIB) to add them")
        if retriever_ckpt is None:
            enc = build_encoder(lib.encoder)
            encode, vectors = (lambda texts: torch.from_numpy(enc.encode(list(texts)))), lib.embeddings
        else:
            from fusion_lightning.thought.retriever import TemplateRetriever

            if not Path(retriever_ckpt).is_file():
                raise FileNotFoundError(f"retriever checkpoint {retriever_ckpt} not found")
            model = TemplateRetriever.load_from_checkpoint(str(retriever_ckpt), map_location="cpu")
            model.eval()
            encode, vectors = model.encode_queries, model.encode_templates([t.text for t in lib.templates])
        return cls(lib, encode, vectors, default.k, task_filter, default.mode, default.budget_tokens, chosen,
                   task_selection=per_task)

    # -- settings -------------------------------------------------------------------------------
    def settings_for(self, model: str | None = None, task: str | None = None) -> ThoughtSettings:
        """`model`'s settings for a query of `task`: its per-task choice, else its overall one, else the default."""
        if model is None:
            return self.settings
        if task is not None and task in self.task_selection.get(model, {}):
            return self.task_selection[model][task]
        return self.selection.get(model, self.settings)

    def rewrites(self, model: str | None = None, task: str | None = None) -> bool:
        """Whether `model`'s prompt for a query of `task` gets a thought stage (its settings there are not none)."""
        return self.settings_for(model, task).mode != "none"

    def describe(self, model: str) -> str:
        """`model`'s choice in words: `both@3`, or `both@3 (none on logicgrid)` with per-task exceptions."""
        tasks = self.task_selection.get(model, {})
        by: dict[str, list[str]] = {}
        for t, s in sorted(tasks.items()):
            by.setdefault(s.name, []).append(t)
        extra = "; ".join(f"{name} on {', '.join(ts)}" for name, ts in by.items())
        return self.settings_for(model).name + (f" ({extra})" if extra else "")

    def set_token_counter(self, model: str, count: TokenCounter) -> None:
        self._counters[model] = count

    def counter_for(self, model: str | None = None) -> TokenCounter:
        return self._counters.get(model, self.count_tokens) if model is not None else self.count_tokens

    # -- retrieval ------------------------------------------------------------------------------
    def _ranked(self, queries: Sequence[str], tasks: Sequence[str | None] | None, depth: int,
                exclude: Sequence[set[str]] | None, drop_templates: bool = True) -> list[list[Template]]:
        """Each query's templates, nearest first, at least `depth` of them where the library has them after
        dropping every template with an excluded source query (e.g. the query itself, on a val pass; with
        `drop_templates` False they stay, for their other sources' exemplars)."""
        if not drop_templates:
            exclude = None
        q = torch.as_tensor(self._encode(list(queries)), dtype=torch.float32)
        t = list(tasks) if self.task_filter and tasks is not None else None
        n = len(self.library)
        extra = max((len(x) for x in exclude), default=0) if exclude is not None else 0
        kk = min(n, depth + extra + 4)
        while True:
            scores, idx = self.index.search(q, kk, t)
            out = []
            for r, (srow, irow) in enumerate(zip(scores.tolist(), idx.tolist(), strict=True)):
                drop = exclude[r] if exclude is not None else set()
                out.append([self.library.templates[j] for s, j in zip(srow, irow, strict=True)
                            if j >= 0 and s != float("-inf") and not drop.intersection(self.library.templates[j].query_ids)])
            if kk >= n or all(len(x) >= depth for x in out) or extra == 0:
                return out
            kk = n  # an excluded source hid more templates than expected: search the whole index once

    def retrieve(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None,
                 exclude: Sequence[set[str]] | None = None) -> list[list[Template]]:
        """The top-k templates per query (the default settings' k), none with an excluded source."""
        if not queries:
            return []
        return [ts[: self.k] for ts in self._ranked(queries, tasks, self.k, exclude)]

    def demonstrations(self, queries: Sequence[str], tasks: Sequence[str | None] | None, settings: ThoughtSettings,
                       exclude: Sequence[set[str]] | None = None,
                       exclude_built: bool = False) -> list[list[Demonstration]]:
        """Up to k demonstrations per query, nearest first (before the token budget). `exclude`: per query, source
        query ids whose exemplar and templates are never shown; in `exemplars` mode a template merged from an
        excluded query and others still leads to the others' exemplars unless `exclude_built` (then nothing
        built from an excluded query takes part, not even in the ranking: the cross-fitted selection's rule)."""
        if settings.mode == "none" or not queries:
            return [[] for _ in queries]
        k, ex = settings.k, self.library.exemplars
        depth = k if settings.mode == "templates" else max(2 * k, k + 4)  # templates without an exemplar are passed
        out = []
        # a template summarised (partly) from an excluded query's answer is never shown; its other sources'
        # exemplars are (the query's own exemplar is left out below)
        ranked_all = self._ranked(queries, tasks, depth, exclude,
                                  drop_templates=exclude_built or settings.mode != "exemplars")
        for r, ranked in enumerate(ranked_all):
            drop = exclude[r] if exclude is not None else set()
            demos: list[Demonstration] = []
            seen: set[str] = set()
            for t in ranked:
                if len(demos) >= k:
                    break
                if settings.mode == "templates":
                    demos.append(Demonstration(t.questions[0] if t.questions else "", template=t.text))
                    continue
                sources = [ex[q] for q in t.query_ids if q in ex and q not in drop and q not in seen]
                if settings.mode == "both":
                    sources = sources[:1]  # one solution per template
                for e in sources:
                    if len(demos) >= k:
                        break
                    seen.add(e.query_id)
                    demos.append(Demonstration(e.question, template=t.text if settings.mode == "both" else None,
                                               solution=e.response))
            out.append(demos)
        return out

    def render(self, queries: Sequence[str], tasks: Sequence[str | None], metrics: Sequence[str | None],
               settings: ThoughtSettings, count_tokens: TokenCounter | None = None,
               exclude: Sequence[set[str]] | None = None, exclude_built: bool = False) -> list[str]:
        """The prompts under `settings`, the demonstrations cut to `settings.budget_tokens` (whole ones)."""
        _check_lengths(queries, tasks, metrics)
        demos = self.demonstrations(queries, tasks, settings, exclude, exclude_built)
        return fit_prompts(queries, demos, metrics, settings, count_tokens or self.count_tokens)

    def random_demonstrations(self, tasks: Sequence[str | None], k: int, exclude: Sequence[set[str]] | None = None,
                              seed: int = 0) -> list[list[Demonstration]]:
        """k solved examples per query drawn at random from the pool `exemplars` retrieves from: the library's
        exemplars that a template leads to, of the query's task under the task filter, none of an excluded query."""
        rng = np.random.default_rng(seed)
        reachable = self.library.query_ids
        pool = sorted((e for q, e in self.library.exemplars.items() if q in reachable), key=lambda e: e.query_id)
        by_task: dict[str, list] = {}
        for e in pool:
            by_task.setdefault(e.task, []).append(e)
        out = []
        for r, t in enumerate(tasks):
            drop = exclude[r] if exclude is not None else set()
            cands = [e for e in (by_task.get(t, []) if self.task_filter and t is not None else pool)
                     if e.query_id not in drop]
            out.append([Demonstration(cands[i].question, solution=cands[i].response)
                        for i in rng.permutation(len(cands))[:k]])
        return out

    def prompts(self, queries: list[str], tasks: list[str | None], metrics: list[str | None],
                model: str | None = None, exclude: Sequence[set[str]] | None = None) -> list[str]:
        """The prompts for `model` (its val-selected settings per query's task, else the default), in its
        tokenizer's budget."""
        _check_lengths(queries, tasks, metrics)
        groups: dict[ThoughtSettings, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault(self.settings_for(model, t), []).append(i)
        out = [""] * len(queries)
        for settings, idx in groups.items():
            got = self.render([queries[i] for i in idx], [tasks[i] for i in idx], [metrics[i] for i in idx], settings,
                              self.counter_for(model), [exclude[i] for i in idx] if exclude is not None else None)
            for i, p in zip(idx, got, strict=True):
                out[i] = p
        return out
