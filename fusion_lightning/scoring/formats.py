"""The answer format each scorer expects, as an instruction appended to a prompt.

One place for "how should the model write its final answer so that our scorer reads it": the
zero-shot, few-shot and template-augmented prompts of the thought level and the fused pipeline all
end with `answer_instruction(metric)`, so `(letter)` for multiple choice, `\\boxed{}` for MATH, `####`
for GSM8K and a code fence for code — the format the scorer parses, not a generic tag.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

from fusion_lightning.scoring import resolve_metric

INSTRUCTIONS: dict[str, str] = {
    "gsm8k": "Solve the problem step by step, then give the final number on the last line as '#### <number>'.",
    "math": "Solve the problem step by step, then give the final answer in \\boxed{}.",
    # No literal letter in the example: a small model copies an example letter and scores by chance.
    "em_mc": "Choose one of the options. End with the letter of the correct option in parentheses, "
             "as in 'The answer is (letter)'.",
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


def lettered_choices(choices: Any) -> list[tuple[str, str, str]]:
    """(letter, stored label, option text) per option, from a list of option texts (lettered A, B, ...), a
    {"text": [...], "label"/"labels": [...]} dict, or either one as the Python-literal string LLMRouter's
    query files store. Labels "1".."N" (a few ARC questions) become "A".. so `em_mc` can read them.
    Raises ValueError on anything else, so a question is never sent without its options."""
    if isinstance(choices, str):
        try:
            choices = ast.literal_eval(choices)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"choices is not a list or a {{'text', 'label'}} dict ({e.__class__.__name__})") from None
    if isinstance(choices, Mapping):
        texts, labels = choices.get("text"), choices.get("label", choices.get("labels"))
    elif isinstance(choices, Sequence) and not isinstance(choices, str):
        texts, labels = choices, None
    else:
        raise ValueError(f"choices must be a list or a {{'text', 'label'}} dict, got {type(choices).__name__}")
    if not isinstance(texts, Sequence) or isinstance(texts, str) or not texts:
        raise ValueError("choices has no option texts")
    letters = [chr(ord("A") + i) for i in range(len(texts))]
    labels = list(labels) if labels is not None else letters
    if labels == [str(i + 1) for i in range(len(texts))]:
        pass  # numbered options: lettered in order
    elif len(labels) != len(texts) or not all(isinstance(x, str) and len(x) == 1 and x.isupper() for x in labels):
        raise ValueError(f"choices' labels {labels!r} are not one capital letter (or 1..N) per option")
    else:
        letters = labels
    return [(letter, str(label), str(text).strip()) for letter, label, text in zip(letters, labels, texts, strict=True)]


def format_choices(choices: Any) -> str:
    """Multiple-choice options as "(A) text" lines, the letters `em_mc` reads back (see `lettered_choices`)."""
    return _option_lines(lettered_choices(choices))


def _option_lines(options: list[tuple[str, str, str]]) -> str:
    return "\n".join(f"({letter}) {text}" for letter, _, text in options)


def with_choices(query: str, choices: Any, ground_truth: str | None = None) -> tuple[str, str | None]:
    """(the query with its options below it, the gold answer in the options' letters): a gold "3" of
    numbered options is "C"."""
    options = lettered_choices(choices)
    gold = next((letter for letter, label, _ in options if label == str(ground_truth).strip()), ground_truth)
    return f"{query.rstrip()}\n\n{_option_lines(options)}", gold
