"""Per-task answer scorers (LLMFusionBench's metrics), each `(response, ground_truth) -> float in [0, 1]`.

    from fusion_lightning.scoring import score, get_scorer
    score("... #### 1,234", "... #### 1234", "GSM8K")  # 1.0

Metric names as logs write them ("GSM8K", "MATH", "f1_score", ...) resolve through `ALIASES`.
"""

from __future__ import annotations

from collections.abc import Callable

from fusion_lightning.scoring.code import SandboxLimits, code_eval, extract_code, run_program, sandbox_report
from fusion_lightning.scoring.numeric import gsm8k, math_equiv
from fusion_lightning.scoring.text import cem, commongen_coverage, em_mc, f1, normalize_answer

Scorer = Callable[[str, str], float]

SCORERS: dict[str, Scorer] = {
    "cem": cem,  # normalised gold contained (as whole words) in the normalised response
    "em_mc": em_mc,  # multiple-choice letter: the last "(X)", else "answer is X"
    "gsm8k": gsm8k,  # final number (after ####, else \boxed{}, else last) == gold number
    "math": math_equiv,  # last \boxed{} equivalent to the gold (normalised string or sympy)
    "f1": f1,  # SQuAD token F1, max over gold aliases
    "code_eval": code_eval,  # pass@1 of the response's code on the gold tests, sandboxed
    "commongen_coverage": commongen_coverage,  # fraction of gold concepts used in the response
}

# Metric names found in logs (LLMFusionBench, LLMRouter, RouteLLM) -> scorer name.
ALIASES: dict[str, str] = {
    "GSM8K": "gsm8k", "MATH": "math", "f1_score": "f1", "pass@1": "code_eval", "em": "em_mc",
}


def metric_names() -> list[str]:
    """Every name `get_scorer` accepts."""
    return sorted(set(SCORERS) | set(ALIASES))


def resolve_metric(metric: str) -> str | None:
    """The scorer name for a metric as written in a log (exact, alias, then case-insensitive); None if unknown."""
    if not isinstance(metric, str):
        return None
    for name in (metric, metric.strip()):
        if name in SCORERS:
            return name
        if name in ALIASES:
            return ALIASES[name]
    folded = {k.lower(): v for k, v in {**{s: s for s in SCORERS}, **ALIASES}.items()}
    return folded.get(metric.strip().lower())


def get_scorer(metric: str) -> Scorer:
    """The scorer for a metric name; a ValueError naming the valid metrics for an unknown one."""
    name = resolve_metric(metric)
    if name is None:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(metric_names())}")
    return SCORERS[name]


def score(response: str | None, ground_truth, metric: str) -> float:
    """Score one response; 0.0 for a missing response. Always a float in [0, 1]."""
    scorer = get_scorer(metric)
    if response is None:
        return 0.0
    return min(1.0, max(0.0, float(scorer(response, ground_truth))))


__all__ = ["ALIASES", "SCORERS", "SandboxLimits", "cem", "code_eval", "commongen_coverage", "em_mc",
           "extract_code", "f1", "get_scorer", "gsm8k", "math_equiv", "metric_names", "normalize_answer",
           "resolve_metric", "run_program", "sandbox_report", "score"]
