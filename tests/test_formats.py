"""The answer-format instruction of each metric asks for exactly what that metric's scorer reads."""

from fusion_lightning.scoring import SCORERS, score
from fusion_lightning.scoring.formats import GENERIC, INSTRUCTIONS, answer_instruction, zero_shot_prompt


def test_every_scorer_has_an_instruction():
    assert set(INSTRUCTIONS) == set(SCORERS)


def test_log_metric_names_resolve_to_their_instruction():
    assert "####" in answer_instruction("GSM8K")
    assert "\\boxed{}" in answer_instruction("MATH")
    assert "(X)" in answer_instruction("em")
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
