"""Fused inference: query → (router picks a model) → (thought stage adds templates) → backend → scorer.

Every stage is optional, so one pipeline serves "router only" (several backends + a router
checkpoint), "templates only" (one backend + a template library), "student only" (a LocalBackend
on an exported student) and their combinations. Built from a config (what `serve` and `evaluate`
read):

    backends: [{type: openai_compatible, base_url: ..., model: ..., name: qwen2.5-7b-instruct}, ...]
    router:   {ckpt: RUN/checkpoints/best-07.ckpt, lam: 0.0, tolerance: null,  # optional
               explore: none, epsilon: 0.1, temperature: 1.0, floor: 0.0, seed: null}
    thought:  {library: DIR, retriever_ckpt: CKPT, k: 3, task_filter: true,  # optional
               mode: auto, budget_tokens: 1024, selection: null}
    default:  NAME            # the backend without a router (default: the first)
    catalog:  FILE            # optional: prices, for per-call cost
    sampling: {max_new_tokens: 256}

The thought stage (`TemplateAugmenter`, fusion_lightning/thought/prompt.py) writes each prompt for the
backend that will answer it. `mode: auto` (the default): each backend gets the mode and k val chose
for it (`selection`, default `<library>/thought_selection.json`, written by the `thought_auto`
recipe; `none` where nothing beat zero-shot), per the request's task where the choice differs per
task, a backend without an entry `templates` with `k`; an
explicit `mode` (none | templates | exemplars | both) applies to every backend. The demonstrations'
length budget (`budget_tokens`) is counted in that backend's own tokenizer where it has one (a
local model's), else in approximate tokens (UTF-8 bytes / 4).

Backend names must be the router's model names (the names in the log it was trained on); the
router chooses among the models that have a backend, by one decision rule (`lam`: the argmax of
predicted performance − λ · predicted cost; or `tolerance`: the cheapest model predicted within τ of
the best, fusion_lightning/query/router.py), through an explicit policy (`explore`: none = that
decision, epsilon or softmax; see explore.py; softmax needs scores, so not with `tolerance`). Each plan carries the probability the policy
gave its model (`propensity`) and the policy's id (`policy`), which the server's request log writes:

    router:<sha256 of the ckpt file, 12 hex>[:lam=<λ> | :tol=<τ>][:epsilon=<ε> | :temperature=<T> (softmax)][:floor=<f>]
    default:<backend>     no router: the default backend answers (propensity 1)
    direct:<backend>      the request named a backend (propensity 1)
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fusion_lightning.data.schema import ModelCatalog
from fusion_lightning.query.metrics import check_decision, tolerance_decision
from fusion_lightning.scoring import score
from fusion_lightning.scoring.formats import zero_shot_prompt
from fusion_lightning.serving import Backend, OpenAICompatibleBackend, build_backend
from fusion_lightning.serving.explore import (
    EXPLORE_KEYS,
    Exploration,
    checkpoint_id,
    choice_probabilities,
    router_policy_id,
    sample_choices,
    weights_id,
)

PIPELINE_KEYS = ("backends", "router", "thought", "default", "catalog", "sampling")
ROUTER_KEYS = ("ckpt", "lam", "tolerance", *EXPLORE_KEYS)
THOUGHT_KEYS = ("library", "retriever_ckpt", "k", "task_filter", "mode", "budget_tokens", "selection")


def _section(cfg: Mapping[str, Any], name: str, keys: Sequence[str]) -> dict[str, Any]:
    """cfg[name] as a dict, checked: only `keys`, and the first of them (the required one) present."""
    section = dict(cfg[name])
    if sorted(set(section) - set(keys)) or keys[0] not in section:
        raise ValueError(f"{name} config takes {keys[0]!r} (required), {', '.join(map(repr, keys[1:]))}; "
                         f"got {sorted(section)}")
    return section


class Augmenter(Protocol):
    """The thought stage (fusion_lightning.thought.prompt.TemplateAugmenter)."""

    def prompts(self, queries: list[str], tasks: list[str | None], metrics: list[str | None],
                model: str | None = None) -> list[str]: ...


@dataclass
class PipelineOutput:
    query: str
    task: str | None
    model: str  # the backend that answered
    prompt: str | list[dict]
    text: str
    input_tokens: int | None
    output_tokens: int | None
    latency_s: float
    cost: float | None = None  # USD, when a catalog with this model's prices is given
    score: float | None = None  # when ground truth and metric are given
    error: str | None = None
    propensity: float = 1.0  # the probability the routing policy gave `model`
    policy: str | None = None  # the routing policy's id (see the module docstring)


@dataclass
class Plan:
    """What the pipeline decided for one query before generation."""

    query: str
    task: str | None  # as given, else the task the router inferred (None: unknown)
    task_source: str | None  # "request", "router" (inferred) or None
    model: str  # the backend that will answer
    prompt: str | list[dict]
    propensity: float = 1.0  # the probability with which the policy chose `model` for this query
    policy: str | None = None  # the policy's id (see the module docstring)
    explored: bool = False  # the policy chose another model than the router's argmax
    encode_s: float = 0.0  # seconds the batch this plan was made in spent in the router's encoder


@dataclass
class _Routing:
    """The routing policy's decisions for a batch, one entry per query."""

    models: list[str]
    tasks: list[str | None]  # the task routed under: given or inferred, None if unknown
    propensity: list[float]
    explored: list[bool]


def _last_user(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if isinstance(p, Mapping))
    raise ValueError("a conversation needs at least one user message")


class FusedPipeline:
    """`explore` (default: none) turns the router's scores into choice probabilities; `router_id` names
    the router in the policy id (from_config: the checkpoint file's hash; default: a hash of its weights)."""

    def __init__(self, backends: Sequence[Backend], router=None, augmenter: Augmenter | None = None,
                 default: str | None = None, lam: float = 0.0, catalog: ModelCatalog | None = None,
                 sampling: Mapping[str, Any] | None = None, explore: Exploration | None = None,
                 router_id: str | None = None, tolerance: float | None = None):
        if not backends:
            raise ValueError("a pipeline needs at least one backend")
        self.backends = {b.name: b for b in backends}
        if len(self.backends) != len(backends):
            raise ValueError(f"backend names must be unique: {[b.name for b in backends]}")
        self.router, self.augmenter, self.lam = router, augmenter, float(lam)
        self.tolerance = None if tolerance is None else float(tolerance)
        check_decision(self.lam, self.tolerance)
        self.catalog, self.sampling = catalog, dict(sampling or {})
        self.default = default or next(iter(self.backends))
        if self.default not in self.backends:
            raise ValueError(f"default backend {self.default!r} is not one of {list(self.backends)}")
        self._available = None
        self.explore = explore or Exploration()
        self.policy_id = f"default:{self.default}"
        if router is not None:
            self._available = np.array([m in self.backends for m in router.models])
            if not self._available.any():
                raise ValueError(f"no backend is named after one of the router's models {router.models}; "
                                 f"backends: {list(self.backends)}")
            self.explore.check_support(int(self._available.sum()))
            if self.tolerance is not None and self.explore.kind == "softmax":
                raise ValueError("router.tolerance is a rule, not scores: softmax has nothing to weigh; "
                                 "explore with epsilon (and floor) instead")
            self.policy_id = router_policy_id(router_id or weights_id(router), self.explore, self.lam,
                                              self.tolerance)
        elif explore is not None and explore.stochastic:
            raise ValueError(f"explore: {explore.kind} needs a router (there is nothing to choose among)")
        # one generator for every routing call; its lock keeps draws whole when plans come from several threads
        self._rng, self._rng_lock = np.random.default_rng(self.explore.seed), threading.Lock()
        if augmenter is not None and hasattr(augmenter, "set_token_counter"):
            from fusion_lightning.thought.prompt import token_counter

            for name, b in self.backends.items():  # the demonstrations' budget in each model's own tokens
                augmenter.set_token_counter(name, token_counter(b))
        # in-process models are not thread-safe; HTTP backends run their own pool
        self._locks = {n: threading.Lock() for n, b in self.backends.items() if not isinstance(b, OpenAICompatibleBackend)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FusedPipeline:
        if hasattr(cfg, "_metadata"):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        unknown = sorted(set(cfg) - set(PIPELINE_KEYS))
        if unknown:
            raise ValueError(f"unknown pipeline key(s) {unknown}; valid: {list(PIPELINE_KEYS)}")
        backends = [build_backend(b) for b in cfg.get("backends") or []]
        router, lam, explore, router_id, tolerance = None, 0.0, None, None, None
        if cfg.get("router"):
            from fusion_lightning.query.router import Router

            r = _section(cfg, "router", ROUTER_KEYS)
            explore = Exploration.from_config(r)  # settings first: a typo fails before the checkpoint loads
            lam, tolerance = float(r.get("lam") or 0.0), r.get("tolerance")
            check_decision(lam, None if tolerance is None else float(tolerance))
            router = Router.load(r["ckpt"])
            router_id = checkpoint_id(r["ckpt"])
        augmenter = None
        if cfg.get("thought"):
            from fusion_lightning.thought.prompt import TemplateAugmenter

            t = _section(cfg, "thought", THOUGHT_KEYS)
            augmenter = TemplateAugmenter.load(t["library"], t.get("retriever_ckpt"), k=int(t.get("k") or 3),
                                               task_filter=bool(t.get("task_filter", True)),
                                               mode=t.get("mode") or "auto",
                                               budget_tokens=t.get("budget_tokens", 1024), selection=t.get("selection"))
        catalog = ModelCatalog.from_json_file(cfg["catalog"]) if cfg.get("catalog") else None
        return cls(backends, router, augmenter, cfg.get("default"), lam, catalog, cfg.get("sampling"), explore,
                   router_id, tolerance)

    @property
    def stages(self) -> list[str]:
        return [s for s, on in (("router", self.router), ("thought", self.augmenter)) if on is not None]

    def route(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None) -> list[str]:
        """The backend per query, drawn from the routing policy (explore: none = the router's best model
        among those with a backend), else the default."""
        return self._route(queries, tasks).models

    def choice_probabilities(self, queries: Sequence[str],
                             tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """[N, M] the policy's probability of each of the router's models (columns: `router.models`;
        0 for those without a backend) per query: what the logged propensities are drawn from."""
        if self.router is None:
            raise ValueError("a pipeline without a router has no choice probabilities (the default answers)")
        given = list(tasks) if tasks is not None else [None] * len(queries)
        result = self.router.route(list(queries), tasks=given if tasks else None, lam=self.lam)
        return choice_probabilities(self._decision_scores(result), self._available, self.explore)

    def _decision_scores(self, result) -> np.ndarray:
        """[N, M] what the policy ranks: the router's scores (λ), or under `tolerance` 1 for the rule's
        choice among the available backends and 0 elsewhere (its argmax is that choice, so epsilon and
        floor explore around it)."""
        if self.tolerance is None:
            return result.scores
        pick = tolerance_decision(result.perf, result.cost, self.tolerance, self._available)
        scores = np.zeros_like(result.scores)
        scores[np.arange(len(pick)), pick] = 1.0
        return scores

    def _route(self, queries: Sequence[str], tasks: Sequence[str | None] | None) -> _Routing:
        """The policy's draw per query, its probability, and the task the router routed it under."""
        given = list(tasks) if tasks is not None else [None] * len(queries)
        n = len(queries)
        if self.router is None or not queries:
            return _Routing([self.default] * n, given, [1.0] * n, [False] * n)
        result = self.router.route(list(queries), tasks=given if tasks else None, lam=self.lam)
        scores = self._decision_scores(result)
        probs = choice_probabilities(scores, self._available, self.explore)
        best = np.where(self._available[None, :], scores, -np.inf).argmax(axis=1)
        if self.explore.stochastic:
            with self._rng_lock:
                picked = sample_choices(probs, self._rng)
        else:
            picked = best
        return _Routing([result.candidates[i] for i in picked.tolist()], list(result.tasks or given),
                        probs[np.arange(n), picked].tolist(), (picked != best).tolist())

    def call_cost(self, model: str, input_tokens: int | None, output_tokens: int | None) -> float | None:
        """USD for one call, when the catalog has this model's prices."""
        if self.catalog is None or model not in self.catalog:
            return None
        return self.catalog[model].call_cost(input_tokens, output_tokens)

    def prompts(self, queries: Sequence[str], tasks: Sequence[str | None], metrics: Sequence[str | None],
                models: Sequence[str | None] | None = None) -> list[str]:
        """The thought stage's prompts, each written for the backend that answers it (`models[i]`; None:
        the augmenter's default settings), else the zero-shot prompt."""
        if self.augmenter is None:
            return [zero_shot_prompt(q, m) for q, m in zip(queries, metrics, strict=True)]
        models = list(models) if models is not None else [None] * len(queries)
        out: list[str] = [""] * len(queries)
        for name in dict.fromkeys(models):
            idx = [i for i, m in enumerate(models) if m == name]
            got = self.augmenter.prompts([queries[i] for i in idx], [tasks[i] for i in idx],
                                         [metrics[i] for i in idx], model=name)
            for i, p in zip(idx, got, strict=True):
                out[i] = p
        return out

    def _rewrites(self, model: str, task: str | None) -> bool:
        """Whether the thought stage changes `model`'s prompt for a query of `task` (mode none: it does not)."""
        if self.augmenter is None:
            return False
        rewrites = getattr(self.augmenter, "rewrites", None)
        return rewrites is None or rewrites(model, task)

    def plan(self, queries: Sequence[str] | None = None, tasks: Sequence[str | None] | None = None,
             metrics: Sequence[str | None] | None = None, *,
             conversations: Sequence[Sequence[Mapping[str, Any]]] | None = None,
             models: Sequence[str | None] | None = None) -> list[Plan]:
        """Everything before generation, for a batch: the backend (routed together in one call, or
        `models[i]` when given) and the prompt. `conversations` (chat message lists, as a server
        receives them) replace `queries`: the last user message is the query; it is rewritten only by
        the thought stage or when a metric asks for an answer format. The thought stage writes for the
        task routed under: the request's, else the one the router inferred."""
        if conversations is not None:
            queries = [_last_user(c) for c in conversations]
        if queries is None:
            raise ValueError("give queries or conversations")
        n = len(queries)
        tasks = list(tasks) if tasks is not None else [None] * n
        metrics = list(metrics) if metrics is not None else [None] * n
        models = list(models) if models is not None else [None] * n
        if not (len(tasks) == len(metrics) == len(models) == n):
            raise ValueError(f"{n} queries but {len(tasks)} tasks, {len(metrics)} metrics, {len(models)} models")
        for m in models:
            if m is not None and m not in self.backends:
                raise ValueError(f"unknown model {m!r}; backends: {list(self.backends)}")
        chosen, known = list(models), list(tasks)
        propensity, explored = [1.0] * n, [False] * n
        policy: list[str | None] = [None if m is None else f"direct:{m}" for m in models]
        todo = [i for i in range(n) if models[i] is None]
        routing = self._route([queries[i] for i in todo], [tasks[i] for i in todo])
        for j, i in enumerate(todo):
            chosen[i], known[i] = routing.models[j], routing.tasks[j]
            propensity[i], explored[i], policy[i] = routing.propensity[j], routing.explored[j], self.policy_id
        # the thought stage reads the task routed under: a request without one gets the task the router's
        # classifier inferred (its per-task mode, its task's examples), as the routing itself did
        texts = self.prompts(queries, known, metrics, chosen)
        prompts: list[str | list[dict]] = list(texts)
        if conversations is not None:
            for i, conv in enumerate(conversations):
                msgs = [dict(m) for m in conv]
                if self._rewrites(chosen[i], known[i]) or metrics[i]:
                    j = max(k for k, m in enumerate(msgs) if m.get("role") == "user")
                    msgs[j]["content"] = texts[i]
                prompts[i] = msgs
        source = ["request" if t else "router" if k else None for t, k in zip(tasks, known, strict=True)]
        return [Plan(queries[i], known[i], source[i], chosen[i], prompts[i], propensity[i], policy[i], explored[i])
                for i in range(n)]

    def run(self, queries: Sequence[str] | None = None, tasks: Sequence[str | None] | None = None,
            metrics: Sequence[str | None] | None = None, ground_truths: Sequence[str | None] | None = None, *,
            conversations: Sequence[Sequence[Mapping[str, Any]]] | None = None, model: str | None = None,
            **sampling: Any) -> list[PipelineOutput]:
        """Answer a batch (see `plan`); `model` forces one backend (no routing)."""
        n = len(conversations if conversations is not None else queries or [])
        plans = self.plan(queries, tasks, metrics, conversations=conversations, models=[model] * n)
        queries = [p.query for p in plans]
        tasks = list(tasks) if tasks is not None else [None] * n
        metrics = list(metrics) if metrics is not None else [None] * n
        golds = list(ground_truths) if ground_truths is not None else [None] * n
        if len(golds) != n:
            raise ValueError(f"{n} queries but {len(golds)} ground truths")
        chosen, prompts = [p.model for p in plans], [p.prompt for p in plans]
        logged = [(p.propensity, p.policy) for p in plans]
        merged = {**self.sampling, **sampling}
        outputs: list[PipelineOutput | None] = [None] * n
        for name in dict.fromkeys(chosen):
            idx = [i for i in range(n) if chosen[i] == name]
            lock = self._locks.get(name)
            if lock:
                with lock:
                    gens = self.backends[name].generate([prompts[i] for i in idx], **merged)
            else:
                gens = self.backends[name].generate([prompts[i] for i in idx], **merged)
            for i, g in zip(idx, gens, strict=True):
                cost = self.call_cost(name, g.input_tokens, g.output_tokens)
                sc = score(g.text, golds[i], metrics[i]) if golds[i] is not None and metrics[i] and not g.error else None
                outputs[i] = PipelineOutput(queries[i], tasks[i], name, prompts[i], g.text, g.input_tokens,
                                            g.output_tokens, g.latency_s, cost, sc, g.error, *logged[i])
        return outputs  # type: ignore[return-value]
