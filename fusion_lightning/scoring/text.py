"""Text-answer scorers: contains-exact-match, multiple-choice letter, token F1, CommonGen coverage.

All are pure functions `(response, ground_truth) -> float in [0, 1]` that never raise on odd input.
"""

from __future__ import annotations

import ast
import json
import re
import string
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”–—…")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def gold_aliases(ground_truth) -> list[str]:
    """The accepted answers: a list, a JSON / Python list string like "['a', 'b']", or one string."""
    if ground_truth is None:
        return []
    if isinstance(ground_truth, (list, tuple, set)):
        return [str(g) for g in ground_truth if g is not None]
    s = str(ground_truth).strip()
    if s.startswith("[") and s.endswith("]"):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(s)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, list):
                return [str(v) for v in value if v is not None]
    return [s]


def cem(response: str, ground_truth) -> float:
    """1.0 when a normalised gold answer (any alias) occurs in the normalised response as whole words.

    Whole words: "1" is not contained in "1990", "cat" not in "category" (a plain substring test
    would accept both). An alias that normalises to nothing matches only an empty response.
    """
    pred = f" {normalize_answer(response or '')} "
    for gold in gold_aliases(ground_truth):
        g = normalize_answer(gold)
        if (g and f" {g} " in pred) or (not g and not pred.strip()):
            return 1.0
    return 0.0


def _tokens_f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


_ANSWER_MARK = re.compile(r"(?i:\banswer)\s*(?:(?i:is)\b|[:：])\s*[:：]?[ \t]*")


def answer_span(response: str) -> str:
    """The marked final answer: the rest of the line after the last "answer is" / "answer:", when
    there is one and it is not empty; else the whole response."""
    text = response or ""
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        span = text[marks[-1].end():].split("\n", 1)[0].strip()
        if span:
            return span
    return text


def f1(response: str, ground_truth) -> float:
    """SQuAD token F1 between the normalised answer and the best-matching gold alias.

    The answer is the span after the last "the answer is" / "Answer:" marker when the response
    has one (see `answer_span`), else the whole response, so a long explanation around a correct
    short answer is not penalised for its length.
    """
    pred = normalize_answer(answer_span(response)).split()
    aliases = gold_aliases(ground_truth)
    return max((_tokens_f1(pred, normalize_answer(g).split()) for g in aliases), default=0.0)


# ------------------------------------------------------------------------------------- multiple choice

_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
# "answer is C", "Answer: (C)", "the correct answer is: **C**", "final answer: C." ...
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[*_`'\"\[]*\s*(?:(?i:option|choice)\s+)?([A-Z])(?![A-Za-z])"
)
_BARE_LETTER = re.compile(r"^\W*([A-Z])\W*$")


def gold_letter(ground_truth) -> str | None:
    """'C', '(C)', 'c', 'C. Paris' -> 'C'."""
    m = re.match(r"^\s*\(?([A-Za-z])(?:\)|\.|:|\s|$)", str(ground_truth or ""))
    return m.group(1).upper() if m else None


def choice_letter(response: str) -> str | None:
    """The chosen option letter, by precedence:

    1. the LAST parenthesised capital letter `(X)` anywhere in the response (so an option quoted
       earlier, e.g. "(A) is wrong ... so (C)", never wins over the final one);
    2. else the last "answer is X" / "Answer: X" / "answer is option X" phrase (any case for the
       words; the letter is a capital, possibly bold, quoted or bracketed);
    3. else a response that is a single letter with punctuation around it ("C", "C.", "**C**").
    """
    text = response or ""
    found = _PAREN_LETTER.findall(text)
    if found:
        return found[-1]
    found = _ANSWER_PHRASE.findall(text)
    if found:
        return found[-1]
    m = _BARE_LETTER.match(text.strip())
    return m.group(1) if m else None


def em_mc(response: str, ground_truth) -> float:
    """Multiple-choice exact match of the chosen letter (see `choice_letter`) against the gold letter."""
    gold = gold_letter(ground_truth)
    return float(gold is not None and choice_letter(response) == gold)


# ------------------------------------------------------------------------------------------- CommonGen

_SUFFIXES = ("s", "es", "ed", "d", "ing", "er", "ers", "ly")


def concepts(ground_truth) -> list[str]:
    """CommonGen concepts: a list (or list string), else comma-separated words; blanks dropped."""
    items = gold_aliases(ground_truth)
    if len(items) == 1:
        items = items[0].split(",") if "," in items[0] else items[0].split()
    return [c for c in (normalize_answer(i) for i in items) if c]


def _word_matches(concept: str, words: set[str]) -> bool:
    if concept in words:
        return True
    stems = {concept}
    if concept.endswith("e"):
        stems.add(concept[:-1])  # dance -> danc(ing/ed/er)
    if concept.endswith("y"):
        stems.add(concept[:-1] + "i")  # carry -> carri(es/ed)
    if len(concept) >= 3 and concept[-1] not in "aeiouwxy" and concept[-2] in "aeiou":
        stems.add(concept + concept[-1])  # run -> runn(ing/er), hit -> hitt(ing)
    return any(w.startswith(s) and w[len(s):] in _SUFFIXES for w in words for s in stems)


def coverage(response: str, concept_list: Iterable[str]) -> float:
    """Fraction of concepts whose every word occurs in the response (simple suffix matching)."""
    words = set(normalize_answer(response or "").split())
    cs = list(concept_list)
    if not cs:
        return 0.0
    hit = sum(all(_word_matches(w, words) for w in c.split()) for c in cs)
    return hit / len(cs)


def commongen_coverage(response: str, ground_truth) -> float:
    """Fraction of the gold's comma-separated concept words that appear in the response.

    A concept appears when the response has the word itself or a regular inflection of it
    (+s/es/ed/d/ing/er/ers/ly, with e-dropping, y->i and consonant doubling: dance -> dancing,
    carry -> carries, run -> running). No lemmatiser: irregular forms (catch -> caught) do not count.
    """
    return coverage(response, concepts(ground_truth))
