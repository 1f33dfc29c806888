"""LLM-as-judge with the FusionFactory rubric, parsed strictly.

The judge sees the question, the reference answer and the response and must end with one line
`Score: <s>` where s is one of the rubric values. Anything else (no score line, two different score
lines, a value off the rubric) is *missing* (None), never 0: a judge that failed to answer says
nothing about the response.

A judge calls a backend, so it lives with the serving clients; `fusion_lightning.scoring` stays pure
functions of (response, ground truth).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fusion_lightning.serving.base import Backend

RUBRIC_VALUES = (0.0, 0.3, 0.6, 0.8, 1.0)

JUDGE_PROMPT = """You are grading a model's answer against the reference answer.

Rubric:
- 0: the final answer is wrong, missing, or does not answer the question.
- 0.3: the final answer is correct but the reasoning is absent or mostly wrong.
- 0.6: the final answer is correct and the reasoning is partly right but has gaps or errors.
- 0.8: the final answer is correct and the reasoning is sound with minor issues.
- 1.0: the final answer is correct and the reasoning is complete, clear and correct.

Question:
{query}

Reference answer:
{ground_truth}

Model's answer:
{response}

Explain briefly, then end with exactly one line of the form "Score: X" where X is one of 0, 0.3, 0.6, 0.8, 1.0."""

_SCORE_LINE = re.compile(r"^\s*\**\s*score\s*\**\s*[:=]\s*\**\s*([0-9]*\.?[0-9]+)\s*\**\s*\.?\s*$", re.I | re.M)


def judge_prompt(query: str, ground_truth: str | None, response: str) -> str:
    return JUDGE_PROMPT.format(query=query.strip(), ground_truth=(ground_truth or "").strip(), response=response.strip())


def parse_judgement(text: str | None) -> float | None:
    """The rubric score of a judge's answer, or None when it cannot be read unambiguously.

    Accepted: lines `Score: X` (markdown bold allowed) with X a rubric value; when several such
    lines appear they must agree. A bare answer that is just a rubric value is accepted too.
    """
    if not text:
        return None
    found = [float(m) for m in _SCORE_LINE.findall(text)]
    if not found:
        bare = text.strip().rstrip(".")
        try:
            found = [float(bare)]
        except ValueError:
            return None
    values = {v for v in found}
    if len(values) != 1:
        return None
    v = values.pop()
    match = [r for r in RUBRIC_VALUES if abs(r - v) < 1e-9]
    return match[0] if match else None


@dataclass
class JudgeResult:
    scores: list[float | None]  # rubric value per response, None = missing (unparseable or failed call)
    raw: list[str]  # the judge's answers, for inspection
    unparseable: int  # judge answered but not in the rubric's format
    failed: int  # judge call failed (backend error)


def judge_responses(judge: Backend, queries: Sequence[str], ground_truths: Sequence[str | None],
                    responses: Sequence[str | None], **sampling) -> JudgeResult:
    """Judge each (query, ground truth, response); empty/missing responses get 0 without a call."""
    n = len(queries)
    if not (len(ground_truths) == len(responses) == n):
        raise ValueError(f"judge_responses: {n} queries, {len(ground_truths)} ground truths, {len(responses)} responses")
    todo = [i for i in range(n) if responses[i] and responses[i].strip()]
    scores: list[float | None] = [0.0] * n  # no answer is a wrong answer (rubric 0), judged without a call
    raw = [""] * n
    unparseable = failed = 0
    gens = judge.generate([judge_prompt(queries[i], ground_truths[i], responses[i] or "") for i in todo],
                          **{"max_new_tokens": 256, **sampling})
    for i, g in zip(todo, gens, strict=True):
        raw[i] = g.text
        if g.error:
            scores[i], failed = None, failed + 1
            continue
        scores[i] = parse_judgement(g.text)
        unparseable += scores[i] is None
    return JudgeResult(scores, raw, unparseable, failed)
