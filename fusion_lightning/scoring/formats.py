"""The answer format each scorer expects, as an instruction appended to a prompt.

One place for "how should the model write its final answer so that our scorer reads it": the
zero-shot, few-shot and template-augmented prompts of the thought level and the fused pipeline all
end with `answer_instruction(metric)`, so `(X)` for multiple choice, `\\boxed{}` for MATH, `####`
for GSM8K and a code fence for code — the format the scorer parses, not a generic tag.
"""

from __future__ import annotations

from fusion_lightning.scoring import resolve_metric

INSTRUCTIONS: dict[str, str] = {
    "gsm8k": "Solve the problem step by step, then give the final number on the last line as '#### <number>'.",
    "math": "Solve the problem step by step, then give the final answer in \\boxed{}.",
    "em_mc": "Think it through, then give the letter of the correct option on the last line as "
             "'The answer is (X)'.",
    "code_eval": "Write the complete Python solution in one ```python code block.",
    "f1": "Answer with the short answer phrase only, no explanation.",
    "cem": "Answer with the short answer only, no explanation.",
    "commongen_coverage": "Write one fluent sentence that uses every given concept.",
}

GENERIC = "Give your final answer on the last line."


def answer_instruction(metric: str | None) -> str:
    """The instruction for a metric as written in a log ("GSM8K", "em", ...); a generic line if unknown."""
    name = resolve_metric(metric) if metric else None
    return INSTRUCTIONS.get(name, GENERIC) if name else GENERIC


def zero_shot_prompt(query: str, metric: str | None) -> str:
    """The plain prompt: the query, then its answer-format instruction."""
    return f"{query.strip()}\n\n{answer_instruction(metric)}"
