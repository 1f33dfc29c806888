"""Summarise a query's best responses into an abstract thought template.

A template has three parts — the core task type, the reasoning chain in 1–3 sentences, and the
required answer format. `LLMSummariser` asks any serving backend for them as one JSON object and
parses the answer strictly; a malformed answer is retried with the parse error quoted back (a new
request, so a cached bad answer is not replayed), then recorded as a failure with its query id and
never stored. `RuleSummariser` needs no LLM: it abstracts the top response's own sentences (numbers
and quoted names become placeholders); the benchmark and the default demo use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fusion_lightning.data.select import Example
from fusion_lightning.scoring.formats import answer_instruction
from fusion_lightning.serving import Backend

PARTS = ("task_type", "reasoning", "answer_format")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\\])")
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```\s*$", re.S)

PROMPT = """You distil worked solutions into a reusable, abstract thought template.

Question:
{question}

Correct solutions from different models:
{solutions}

Write a template that would help solve *similar* questions, without this question's specific
numbers, names or answer. Reply with only a JSON object with exactly these string fields:
  "task_type": the core task type in a few words,
  "reasoning": the general reasoning chain in 1 to 3 sentences,
  "answer_format": how the final answer must be written."""

RETRY = "\n\nYour previous reply was rejected ({error}). Reply again with only the JSON object."


class MalformedTemplate(ValueError):
    """A summariser answer that is not a valid template (the message says why)."""


@dataclass(frozen=True)
class TemplateParts:
    task_type: str
    reasoning: str
    answer_format: str

    @property
    def text(self) -> str:
        return f"Task type: {self.task_type}\nReasoning: {self.reasoning}\nAnswer format: {self.answer_format}"


@dataclass
class Summary:
    """One query's outcome: `parts` on success, else `error` (the last reason) — never both."""

    query_id: str
    parts: TemplateParts | None
    error: str | None = None
    attempts: int = 1


class Summariser(Protocol):
    name: str

    def summarise(self, groups: Sequence[list[Example]],
                  metrics: Sequence[str | None] | None = None) -> list[Summary]: ...


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if s.strip()]


def parse_template(answer: str) -> TemplateParts:
    """Strict: one JSON object (optionally in a ```json fence) with exactly the three non-empty
    string fields, the reasoning in 1–3 sentences."""
    text = answer.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedTemplate(f"not JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(obj, dict):
        raise MalformedTemplate(f"expected a JSON object, got {type(obj).__name__}")
    missing, extra = [p for p in PARTS if p not in obj], sorted(set(obj) - set(PARTS))
    if missing or extra:
        raise MalformedTemplate(f"fields must be exactly {list(PARTS)}; missing {missing}, unexpected {extra}")
    for p in PARTS:
        if not isinstance(obj[p], str) or not obj[p].strip():
            raise MalformedTemplate(f"field {p!r} must be a non-empty string")
    n = len(sentences(obj["reasoning"]))
    if not 1 <= n <= 3:
        raise MalformedTemplate(f"'reasoning' must be 1-3 sentences, got {n}")
    return TemplateParts(*(" ".join(obj[p].split()) for p in PARTS))


def summary_prompt(group: Sequence[Example]) -> str:
    solutions = "\n\n".join(f"[{i}] {e.response.strip()}" for i, e in enumerate(group, start=1))
    return PROMPT.format(question=group[0].query.strip(), solutions=solutions)


class LLMSummariser:
    """Templates from any `Backend` (local HF model or OpenAI-compatible server)."""

    def __init__(self, backend: Backend, retries: int = 2, max_new_tokens: int = 256):
        if retries < 0:
            raise ValueError(f"summariser retries must be >= 0, got {retries}")
        self.backend, self.retries, self.max_new_tokens = backend, retries, max_new_tokens
        self.name = f"llm:{backend.name}"

    def summarise(self, groups: Sequence[list[Example]],
                  metrics: Sequence[str | None] | None = None) -> list[Summary]:
        base = [summary_prompt(g) for g in groups]
        out = [Summary(g[0].query_id, None, "not attempted", 0) for g in groups]
        todo = list(range(len(groups)))
        for attempt in range(self.retries + 1):
            if not todo:
                break
            prompts = [base[i] + (RETRY.format(error=out[i].error) if attempt else "") for i in todo]
            gens = self.backend.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.0)
            retry = []
            for i, g in zip(todo, gens, strict=True):
                out[i].attempts = attempt + 1
                if g.error:  # the backend already retried transport errors: a failure, not a retry
                    out[i].error = f"backend error: {g.error}"
                    continue
                try:
                    out[i].parts, out[i].error = parse_template(g.text), None
                except MalformedTemplate as e:
                    out[i].error = f"malformed: {e}"
                    retry.append(i)
            todo = retry
        return out


_NUM = re.compile(r"(?<![\w.])[-+]?\$?\d[\d,]*(?:\.\d+)?%?")
_QUOTED = re.compile(r"'[^']{1,40}'|\"[^\"]{1,40}\"")
_FINAL = (("####", "the final number on the last line as '#### <number>'"),
          ("\\boxed", "the final answer in \\boxed{}"),
          ("The answer is (", "the letter of the correct option in parentheses, as 'The answer is (letter)'"),
          ("```", "a complete solution in one code block"))


def _abstract(sentence: str) -> str:
    return _QUOTED.sub("<name>", _NUM.sub("<n>", sentence))


class RuleSummariser:
    """No LLM: task type from the task (and its description), reasoning = the first 1–3 reasoning
    sentences of the top response with numbers/quoted names abstracted, answer format from the
    response's final-answer marker, else the metric's instruction."""

    name = "rule"

    def __init__(self, task_descriptions: dict[str, str] | None = None, max_sentences: int = 3):
        self.task_descriptions, self.max_sentences = task_descriptions or {}, max_sentences

    def parts(self, group: Sequence[Example], metric: str | None = None) -> TemplateParts:
        top = group[0]
        body = top.response.split("```")[0] if "```" in top.response else top.response
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith(("####", "The answer is"))]
        picked = [_abstract(s) for s in sentences(" ".join(lines))][: self.max_sentences]
        reasoning = " ".join(picked) or f"Work through the {top.task} question step by step."
        fmt = next((f for marker, f in _FINAL if marker in top.response), None)
        desc = self.task_descriptions.get(top.task)
        task_type = f"{top.task} ({desc.rstrip('.')})" if desc else top.task
        return TemplateParts(task_type, reasoning, fmt or answer_instruction(metric))

    def summarise(self, groups: Sequence[list[Example]],
                  metrics: Sequence[str | None] | None = None) -> list[Summary]:
        metrics = list(metrics) if metrics is not None else [None] * len(groups)
        return [Summary(g[0].query_id, self.parts(g, m)) for g, m in zip(groups, metrics, strict=True)]


def build_summariser(cfg: dict[str, Any] | None, task_descriptions: dict[str, str] | None = None) -> Summariser:
    """`None`/`{"type": "rule"}` -> RuleSummariser; a backend config (`type: local|openai_compatible`,
    plus `retries`, `max_new_tokens`) -> LLMSummariser over `build_backend`."""
    cfg = dict(cfg or {"type": "rule"})
    if cfg.get("type", "rule") == "rule":
        return RuleSummariser(task_descriptions)
    from fusion_lightning.serving import build_backend

    retries, max_new = int(cfg.pop("retries", 2)), int(cfg.pop("max_new_tokens", 256))
    if cfg.get("type") == "openai_compatible":
        cfg.setdefault("errors", "return")  # a failed query is recorded, the build goes on
    return LLMSummariser(build_backend(cfg), retries=retries, max_new_tokens=max_new)
