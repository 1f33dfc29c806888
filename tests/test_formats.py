"""The answer-format instruction of each metric asks for exactly what that metric's scorer reads."""

import pytest

from fusion_lightning.scoring import SCORERS, score
from fusion_lightning.scoring.formats import (
    GENERIC,
    INSTRUCTIONS,
    answer_instruction,
    format_choices,
    with_choices,
    zero_shot_prompt,
)
from fusion_lightning.scoring.text import choice_letter


def test_every_scorer_has_an_instruction():
    assert set(INSTRUCTIONS) == set(SCORERS)


def test_log_metric_names_resolve_to_their_instruction():
    assert "####" in answer_instruction("GSM8K")
    assert "\\boxed{}" in answer_instruction("MATH")
    assert "(letter)" in answer_instruction("em")
    # no example letter to copy: a model that repeats the instruction verbatim picks no option
    assert choice_letter(answer_instruction("em")) is None
    assert "```python" in answer_instruction("pass@1")
    assert answer_instruction("no-such-metric") == GENERIC
    assert answer_instruction(None) == GENERIC


def test_answers_written_as_instructed_score_full_marks():
    # a response that follows each instruction literally is read correctly by that metric's scorer
    assert score("12 + 30 = 42\n#### 42", "#### 42", "GSM8K") == 1.0
    assert score("so x = 1/2, giving \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "MATH") == 1.0
    assert score("B is wrong because ... The answer is (C)", "C", "em") == 1.0


def test_zero_shot_prompt_is_query_then_instruction():
    p = zero_shot_prompt("  What is 6 * 7?  ", "GSM8K")
    assert p.startswith("What is 6 * 7?\n\n") and p.endswith(answer_instruction("GSM8K"))


@pytest.mark.parametrize("choices", [
    "{'text': ['1', '2', '3'], 'labels': ['A', 'B', 'C']}",  # LLMRouter's logic-grid rows
    "{'label': ['A', 'B', 'C'], 'text': ['1', '2', '3']}",  # its CommonsenseQA / ARC rows
    "['1', '2', '3']",  # its MMLU / GPQA rows
    ["1", "2", "3"],
    {"text": ["1", "2", "3"], "label": ["A", "B", "C"]},
])
def test_choices_in_every_stored_form_become_lettered_lines(choices):
    assert format_choices(choices) == "(A) 1\n(B) 2\n(C) 3"


def test_a_question_with_its_choices_reads_back_by_letter():
    q, gold = with_choices("Which house?  ", {"text": ["first", "second"], "label": ["A", "B"]}, "B")
    assert q == "Which house?\n\n(A) first\n(B) second" and gold == "B"
    assert score(f"The options are {q} ... The answer is (B)", "B", "em_mc") == 1.0


def test_numbered_options_are_lettered_and_so_is_their_gold():
    # a few of LLMRouter's ARC questions number their options 1..4 and their gold is "3"
    q, gold = with_choices("Pick.", "{'text': ['w', 'x', 'y', 'z'], 'label': ['1', '2', '3', '4']}", "3")
    assert q.endswith("(A) w\n(B) x\n(C) y\n(D) z") and gold == "C"
    assert score("The answer is (C)", gold, "em_mc") == 1.0


@pytest.mark.parametrize("bad, why", [("not a literal (", "not a list"), ("[]", "no option texts"), (3, "got int"),
                                      ({"text": ["x", "y"], "label": ["A"]}, "labels"),
                                      ({"text": ["x"], "label": ["a1"]}, "labels"),
                                      ({"text": ["x", "y"], "label": ["2", "1"]}, "labels")])
def test_bad_choices_are_refused_with_the_reason(bad, why):
    with pytest.raises(ValueError, match=why):
        format_choices(bad)
