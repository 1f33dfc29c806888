"""Numeric-answer scorers: GSM8K (final number) and MATH (last \\boxed{} answer, checked with sympy)."""

from __future__ import annotations

import math
import re

from fusion_lightning.scoring.latex import equivalent, last_boxed, normalize_math

# A number: optional sign (not a minus between operands, "16-3"), digits with an optional decimal
# part, optionally a fraction "5/2"; or a bare decimal ".5". Commas and "$" are removed first.
_NUMBER = re.compile(
    r"(?<![\w)\]}.])-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])\.\d+"
)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def numbers(text: str) -> list[str]:
    """The numbers in a text, in order, as written (after dropping `$` and thousands separators)."""
    text = _THOUSANDS.sub("", str(text).replace("\\$", " ").replace("$", " "))
    return _NUMBER.findall(text)


def number_value(token: str | None) -> float | None:
    """'18' -> 18.0, '18.00' -> 18.0, '-3' -> -3.0, '5/2' -> 2.5; None when not a number."""
    if token is None:
        return None
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den)
        return float(token)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def gsm8k_answer(response: str) -> str | None:
    """The final number of a response, by precedence:

    1. the first number after the LAST `####` (GSM8K's own answer marker; "#### 7 packs and 2
       extra" answers 7);
    2. else the last number inside the last `\\boxed{}`;
    3. else the last number in the response.
    """
    text = response or ""
    if "####" in text:
        found = numbers(text.rsplit("####", 1)[1])
        if found:
            return found[0]
    boxed = last_boxed(text)
    if boxed is not None:
        found = numbers(boxed)
        if found:
            return found[-1]
    found = numbers(text)
    return found[-1] if found else None


def gsm8k_gold(ground_truth: str) -> str | None:
    """The gold number: after the last `####` of a GSM8K solution, else the last number of the text."""
    text = str(ground_truth or "")
    if "####" in text:
        found = numbers(text.rsplit("####", 1)[1])
        if found:
            return found[0]
    found = numbers(text)
    return found[-1] if found else None


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def gsm8k(response: str, ground_truth: str) -> float:
    """1.0 when the response's final number (see `gsm8k_answer`) equals the gold number.

    Numbers compare by value: `1,234` == `1234`, `$18.00` == `18`, `-3` is negative, `5/2` == `2.5`
    (a fraction written as the final answer counts by its value; GSM8K golds are integers, so an
    unsimplified fraction like 10/5 matches 2). Units and trailing punctuation are ignored.
    """
    return float(numbers_equal(number_value(gsm8k_answer(response)), number_value(gsm8k_gold(ground_truth))))


# ------------------------------------------------------------------------------------------------ MATH

_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:is\b|[:：])\s*[:：]?\s*(.+)")


def math_answer(response: str) -> str | None:
    """The final answer of a MATH response: the last `\\boxed{...}` / `\\fbox{...}` (balanced braces);
    else what follows the last "answer is" / "answer:" (to the end of its line, `$` stripped); else
    the last number in the response."""
    text = response or ""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    if lines:
        ans = lines[-1].splitlines()[0].strip().rstrip(".")
        dollars = re.findall(r"\$([^$]+)\$", ans)
        return dollars[-1] if dollars else ans.strip("$ ")
    found = numbers(text)
    return found[-1] if found else None


def math_gold(ground_truth: str) -> str:
    """The gold answer: the last `\\boxed{}` of a MATH solution, else the whole text."""
    text = str(ground_truth or "")
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def math_equiv(response: str, ground_truth: str) -> float:
    """1.0 when the response's final answer (see `math_answer`) is equivalent to the gold answer.

    Equivalence (see `fusion_lightning.scoring.latex.equivalent`): equal after normalisation (no
    `$`, `\\left`/`\\right`, `\\text{}` wrappers, units, `^\\circ`, `\\%`; `\\dfrac`/`\\tfrac` ->
    `\\frac`), else equal as sympy expressions (`\\frac{2}{4}` == `\\frac12` == `0.5`,
    `2\\sqrt{2}` == `\\sqrt{8}`), tuple/interval elements pairwise. Never raises.
    """
    pred = math_answer(response)
    if pred is None:
        return 0.0
    return float(equivalent(pred, math_gold(ground_truth)))


__all__ = ["gsm8k", "gsm8k_answer", "gsm8k_gold", "math_answer", "math_equiv", "math_gold", "normalize_math",
           "number_value", "numbers"]
