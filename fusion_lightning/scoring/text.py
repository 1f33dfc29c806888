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
# irregular forms of common verbs and nouns: "lemma form form ..." (a regular suffix rule covers the rest)
_IRREGULAR_TEXT = """
arise arose arisen; be am is are was were been; bear bore borne born; beat beaten; become became; begin began begun;
bend bent; bind bound; bite bit bitten; bleed bled; blow blew blown; break broke broken; breed bred; bring brought;
build built; burn burnt; buy bought; catch caught; choose chose chosen; cling clung; come came; creep crept;
deal dealt; dig dug; dive dove; do does did done; draw drew drawn; dream dreamt; drink drank drunk;
drive drove driven; eat ate eaten; fall fell fallen; feed fed; feel felt; fight fought; find found; flee fled;
fling flung; fly flew flown; forget forgot forgotten; freeze froze frozen; get got gotten; give gave given;
go goes went gone; grind ground; grow grew grown; hang hung; have has had; hear heard; hide hid hidden; hold held;
keep kept; kneel knelt; know knew known; lay laid; lead led; leap leapt; leave left; lend lent; lie lay lain;
light lit; lose lost; make made; mean meant; meet met; mow mown; pay paid; ride rode ridden; ring rang rung;
rise rose risen; run ran; say said; see saw seen; seek sought; sell sold; send sent; sew sewn; shake shook shaken;
shine shone; shoot shot; show shown; shrink shrank shrunk; sing sang sung; sink sank sunk; sit sat; slay slew;
sleep slept; slide slid; sling slung; smell smelt; speak spoke spoken; spend spent; spill spilt; spin spun;
spit spat; stand stood; steal stole stolen; stick stuck; sting stung; stink stank stunk; stride strode;
strike struck; swear swore sworn; sweep swept; swim swam swum; swing swung; take took taken; teach taught;
tear tore torn; tell told; think thought; throw threw thrown; tread trod; wake woke woken; wear wore worn;
weave wove woven; win won; wind wound; write wrote written;
child children; person people; mouse mice; goose geese; foot feet; tooth teeth; ox oxen; die dice; cactus cacti
"""
_IRREGULAR: dict[str, set[str]] = {
    forms[0]: set(forms[1:]) for forms in (item.split() for item in _IRREGULAR_TEXT.split(";")) if forms}
_LIST_GLUE = frozenset({"and", "or", "nor", "etc"})  # what joins a bare list's items
_CHUNK = re.compile(r"\n|[.!?:](?=\s|$)")  # a sentence, a line, or what follows a colon ("Concepts: ...")
_SEGMENT = re.compile(r"[,;|]")
_TOKEN = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
MAX_LIST_RUN = 3  # bare list items a sentence may hold before its next clause ("a chef, bride, officer and ...")


def concepts(ground_truth) -> list[str]:
    """CommonGen concepts: a list (or list string), else comma-separated words; blanks dropped."""
    items = gold_aliases(ground_truth)
    if len(items) == 1:
        items = items[0].split(",") if "," in items[0] else items[0].split()
    return [c for c in (normalize_answer(i) for i in items) if c]


def _stems(concept: str) -> set[str]:
    stems = {concept}
    if concept.endswith("e"):
        stems.add(concept[:-1])  # dance -> danc(ing/ed/er)
    if concept.endswith("ie"):
        stems.add(concept[:-2] + "y")  # tie -> ty(ing)
    if concept.endswith("y"):
        stems.add(concept[:-1] + "i")  # carry -> carri(es/ed)
    if concept.endswith("fe"):
        stems.add(concept[:-2] + "v")  # knife -> kniv(es)
    elif concept.endswith("f"):
        stems.add(concept[:-1] + "v")  # leaf -> leav(es)
    if len(concept) >= 3 and concept[-1] not in "aeiouwxy" and concept[-2] in "aeiou":
        stems.add(concept + concept[-1])  # run -> runn(ing/er), hit -> hitt(ing)
    if concept.endswith("c"):
        stems.add(concept + "k")  # picnic -> picnick(ing/ed)
    return stems


def _forms_match(concept: str, word: str) -> bool:
    """`word` is `concept` or one of its inflections: a regular suffix (with e-dropping, y -> i, f -> v,
    consonant doubling), -man -> -men, or a listed irregular form (run -> ran, catch -> caught, child -> children)."""
    word = re.sub(r"['’]s$", "", word)  # the dog's -> dog
    if word == concept or word in _IRREGULAR.get(concept, ()):
        return True
    if concept.endswith("man") and word == concept[:-3] + "men":  # fireman -> firemen
        return True
    return any(word.startswith(s) and word[len(s):] in _SUFFIXES for s in _stems(concept))


def _word_matches(concept: str, words: set[str]) -> bool:
    return any(_forms_match(concept, w) for w in words)


def running_text_words(response: str, concept_list: Iterable[str]) -> set[str]:
    """The words of `response` that stand in running text, not in a bare list of the concepts.

    The response is cut into chunks (lines, sentences, and what follows a colon) and each chunk into
    segments at commas and semicolons. A segment is running text when it has at least two words and one
    of them is neither a concept word as given, nor a number, nor list glue (and, or, nor, etc.):
    "The dog runs", "a chef", "dogs catch frisbees" (inflected forms are not the list's words) are;
    "frisbee", "1. dog", "catch and run", "dog frisbee catch" are not (bare items). A run of at most
    `MAX_LIST_RUN` bare items counts too when running text follows it in the same chunk, as a list does
    inside a sentence ("An athlete, chef, bride and officer dance"), or precedes it, as the list that ends
    a sentence ("A man walks his dog, cat and bird"); a longer run, or one alone in its chunk (an echoed
    concept list, with or without a comment after it, or after "Concepts:"), does not.
    """
    exact = {w for c in concept_list for w in c.split()}
    kept: set[str] = set()
    for chunk in _CHUNK.split((response or "").lower()):
        segments = [_TOKEN.findall(s) for s in _SEGMENT.split(chunk)]
        segments = [s for s in segments if s]
        running = [len(s) >= 2 and any(not (w.isdigit() or w in _LIST_GLUE or w in exact) for w in s)
                   for s in segments]
        bare: list[list[str]] = []
        for seg, is_text in zip(segments, running, strict=True):
            if not is_text:
                bare.append(seg)
                continue
            if len(bare) <= MAX_LIST_RUN:
                kept.update(w for b in bare for w in b)
            bare = []
            kept.update(seg)
        if any(running) and len(bare) <= MAX_LIST_RUN:  # the short list that ends a sentence
            kept.update(w for b in bare for w in b)
    return kept


def commongen_coverage(response: str, ground_truth) -> float:
    """Fraction of the gold's comma-separated concepts used in running text of the response.

    A concept counts when each of its words appears, as the word itself or an inflection of it
    (+s/es/ed/d/ing/er/ers/ly with e-dropping, y -> i, f -> v and consonant doubling: dance -> dancing,
    carry -> carries, run -> running, leaf -> leaves; a listed irregular form: run -> ran, catch -> caught,
    child -> children), among the response's running-text words (`running_text_words`). So a sentence
    scores its coverage, and an echo of the concept list (comma-, newline- or space-separated, numbered,
    or followed by a comment such as "This sentence uses every concept") scores 0 for the listed part.
    """
    cs = concepts(ground_truth)
    if not cs:
        return 0.0
    words = running_text_words(response, cs)
    return sum(all(_word_matches(w, words) for w in c.split()) for c in cs) / len(cs)
