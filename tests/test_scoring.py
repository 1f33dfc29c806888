"""Scorers: each metric on its hard cases, the code sandbox's containment, the registry, re-scoring."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from fusion_lightning.data.arrow import as_objects
from fusion_lightning.data.datamodule import load_from_config
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.readers.common import canonical_table
from fusion_lightning.data.rescore import rescore_table
from fusion_lightning.data.source import SOURCE_DEFAULTS
from fusion_lightning.scoring import ALIASES, SCORERS, get_scorer, metric_names, score
from fusion_lightning.scoring.code import SandboxLimits, code_eval, extract_code, run_program, sandbox_report
from fusion_lightning.scoring.latex import equivalent, last_boxed
from fusion_lightning.scoring.numeric import gsm8k, gsm8k_answer, math_equiv
from fusion_lightning.scoring.text import cem, choice_letter, commongen_coverage, em_mc, f1, normalize_answer

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_mb=512)

# ------------------------------------------------------------------------------------------------ text


def test_cem_normalises_case_punctuation_articles_and_needs_whole_words():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert cem("I think it is the Eiffel Tower in Paris.", "eiffel tower") == 1.0
    assert cem("An apple a day", "APPLE") == 1.0
    assert cem("It happened in 1990.", "1") == 0.0  # not a substring match
    assert cem("a category error", "cat") == 0.0
    assert cem("yes, it was", "['no', 'Yes']") == 1.0  # any alias
    assert cem("", "paris") == 0.0


def test_em_mc_last_parenthesised_letter_wins_over_earlier_options():
    text = "(A) is tempting and (B) is wrong too. After checking, the answer is (C)."
    assert choice_letter(text) == "C"
    assert em_mc(text, "C") == 1.0
    assert em_mc(text, "(C)") == 1.0
    assert em_mc(text, "A") == 0.0
    assert em_mc("Option (A) fails, so I pick (D) then reconsider: (B)", "B") == 1.0


def test_em_mc_answer_phrase_fallback_and_bare_letter():
    assert em_mc("After elimination, the answer is C.", "C") == 1.0
    assert em_mc("Answer: **B**", "(B)") == 1.0
    assert em_mc("The correct answer is option D", "D") == 1.0
    assert em_mc("B.", "B") == 1.0
    assert em_mc("the answer is a bit unclear", "A") == 0.0  # lowercase "a" is a word, not a choice
    assert em_mc("I cannot decide.", "A") == 0.0
    assert em_mc("(C)", None) == 0.0


def test_f1_tokens_and_aliases_in_every_form():
    assert f1("Barack Obama", "barack obama") == 1.0
    assert f1("Obama", "Barack Obama") == pytest.approx(2 / 3)
    assert f1("Paris", ["London", "Paris"]) == 1.0
    assert f1("Paris", '["London", "Paris"]') == 1.0
    assert f1("Paris", "['London', 'Paris']") == 1.0
    assert f1("Let me think about it.\nThe answer is Sammy Davis Jr.", "Sammy Davis, Jr") == 1.0
    assert f1("nothing alike", "Paris") == 0.0


def test_commongen_coverage_counts_concepts_with_inflections():
    gold = "dog, frisbee, catch, run, "
    assert commongen_coverage("The dog runs to catch the frisbee.", gold) == 1.0
    assert commongen_coverage("A dog is running.", gold) == 0.5
    # irregular forms count since the echo fix (they scored 0.25 here before: a lemmatiser's coverage counts them)
    assert commongen_coverage("The dog caught it.", gold) == 0.5
    assert commongen_coverage("A dog ran and caught the frisbee.", gold) == 1.0
    assert commongen_coverage("Dogs catch frisbees and run.", gold) == 1.0  # no article: inflections make it text
    assert commongen_coverage("dancing and carrying", "dance, carry") == 1.0
    assert commongen_coverage("Two leaves fell on the firemen's knives.", "leaf, fireman, knife, fall") == 1.0
    assert commongen_coverage("The <b>dog</b> sat.", "dog, sit") == 1.0  # markup does not glue words together
    assert commongen_coverage("anything", "") == 0.0


@pytest.mark.parametrize("echo", [
    "dog, frisbee, catch, run",
    "Dog, Frisbee, Catch, Run.",
    "dog\nfrisbee\ncatch\nrun",
    "1. dog\n2. frisbee\n3. catch\n4. run",
    "- dog\n- frisbee\n- catch\n- run",
    "dog frisbee catch run",
    "dog, frisbee, catch and run",
    "Concepts: dog, frisbee, catch, run",
    # the real log's echo (SmolLM2 scored 0.81 with it): the list, then a comment about it
    "dog, frisbee, catch, run\n\nThis sentence is a complete sentence with every given concept.",
    "dog, frisbee, catch, run. This uses every given concept.",
])
def test_commongen_coverage_gives_an_echoed_concept_list_nothing(echo):
    assert commongen_coverage(echo, "dog, frisbee, catch, run") == 0.0


def test_commongen_coverage_counts_only_the_sentence_of_a_partial_answer():
    gold = "dog, frisbee, catch, run, park, boy"
    # a sentence that turns into a list of more than MAX_LIST_RUN items: only the sentence counts
    assert commongen_coverage("The dog runs in the park, frisbee, catch, boy, ball", gold) == pytest.approx(3 / 6)
    # the real log: a sentence opening that turns into the list ('The game of "roast, sand, ...') keeps 1 concept
    assert commongen_coverage('The game of "roast, sand, vest, stick, pit, road, cube', "roast, sand, vest, stick, pit, road, "
                              "cube") == pytest.approx(1 / 7)
    # "The concepts are X, Y, Z, ..." embeds only its first concept in a clause once more than MAX_LIST_RUN
    # items follow; with fewer it reads like any sentence that ends in a short list ("A chef cooks with a
    # knife, pan and stove.") and counts in full - the price of crediting those
    assert commongen_coverage("The concepts are dog, frisbee, catch, run, park and boy.", gold) == pytest.approx(1 / 6)
    assert commongen_coverage("The concepts are dog, frisbee, catch and run.", "dog, frisbee, catch, run") == 1.0
    # a short list inside a sentence (running text after it) counts; so do article-led items
    assert commongen_coverage("An athlete, chef, bride and officer dance at the party.",
                              "athlete, chef, bride, officer, dance, party") == 1.0
    assert commongen_coverage("A boy, a dog and a frisbee.", gold) == pytest.approx(3 / 6)
    # a run of more than MAX_LIST_RUN bare items is a list even with a clause after it (park and boy count)
    assert commongen_coverage("dog, frisbee, catch, run, park and the boy laughs", gold) == pytest.approx(2 / 6)


def test_commongen_coverage_counts_a_short_list_that_ends_a_sentence():
    # up to MAX_LIST_RUN bare items after running text in the same sentence are the sentence's objects
    # (they scored 0.5, 0.5 and 1/3 when only a run with running text after it counted)
    assert commongen_coverage("A man walks his dog, cat and bird.", "dog, cat, bird, walk") == 1.0
    assert commongen_coverage("A chef cooks with a knife, pan and stove.", "chef, knife, pan, stove") == 1.0
    assert commongen_coverage("I like dogs, cats, birds", "dog, cat, bird") == 1.0
    # still no running text, no credit: the list alone, or alone in its chunk after a colon or sentence end
    assert commongen_coverage("cat and bird", "dog, cat, bird, walk") == 0.0
    assert commongen_coverage("A man walks. Dog, cat, bird.", "dog, cat, bird, walk") == 0.25
    assert commongen_coverage("Here they are: dog, cat, bird.", "dog, cat, bird, walk") == 0.0


# --------------------------------------------------------------------------------------------- numeric


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("She makes 9 * $2 = $18 every day.", "... #### 18", 1.0),
    ("The total is $1,234.", "#### 1234", 1.0),
    ("so the answer is 1234", "#### 1,234", 1.0),
    ("It costs $18.00.", "#### 18", 1.0),
    ("That is 18.0", "#### 18", 1.0),
    ("The temperature drops to 2 - 8 = -6 degrees.", "#### -6", 1.0),
    ("16-3 = 13 left", "#### 13", 1.0),  # "-3" in "16-3" is not a negative number
    ("It takes 5/2 hours", "#### 2.5", 1.0),
    ("The answer is 0.5", "#### 5", 0.0),  # digits alone do not match
    ("#### 7 packs and 2 extra glue sticks", "#### 7", 1.0),  # the number after the last ####
    ("#### 3\nSo wait, #### 4\nThat uses 9 eggs.", "#### 4", 1.0),
    ("Therefore $\\boxed{42}$ and 7 more words 8", "#### 42", 1.0),
    ("no number here", "#### 4", 0.0),
])
def test_gsm8k_final_number(response, gold, expected):
    assert gsm8k(response, gold) == expected


def test_gsm8k_answer_precedence():
    assert gsm8k_answer("x 1 #### 2 then 3") == "2"
    assert gsm8k_answer("\\boxed{5} then 6") == "5"
    assert gsm8k_answer("1 then 6.") == "6"


def test_boxed_extraction_balanced_and_nested():
    assert last_boxed("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{7} and a broken \\boxed{8") == "7"
    assert last_boxed("none") is None


@pytest.mark.parametrize(("pred", "gold"), [
    ("\\frac{2}{4}", "\\frac{1}{2}"), ("0.5", "\\dfrac12"), ("\\tfrac{3}{4}", "0.75"), ("2\\sqrt{2}", "\\sqrt{8}"),
    ("10\\text{ cm}", "10"), ("90^\\circ", "90"), ("\\$5.00", "5"), ("x = 5", "5"), ("50\\%", "50"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("x^2+2x+1", "(x+1)^2"), ("\\pi/2", "\\frac{\\pi}{2}"), ("1,000", "1000"),
    ("\\text{(C)}", "C"), ("2^{10}", "1024"), ("\\sqrt[3]{8}", "2"),
])
def test_math_equivalent_answers(pred, gold):
    assert equivalent(pred, gold)


@pytest.mark.parametrize(("pred", "gold"), [
    ("\\frac{1}{3}", "0.33"), ("(1,2)", "[1,2]"), ("-\\infty", "\\infty"), ("x", "y"), ("3", "4"), ("", ""),
])
def test_math_different_answers(pred, gold):
    assert not equivalent(pred, gold)


def test_math_scorer_reads_boxed_in_response_and_gold():
    gold = "We compute ... so the answer is $\\boxed{\\frac12}$."
    assert math_equiv("Thus $\\boxed{\\boxed{\\frac{2}{4}}}$.", gold) == 1.0
    assert math_equiv("So \\boxed{0.5} is it", "\\frac{1}{2}") == 1.0  # plain gold
    assert math_equiv("The final answer is $\\frac{1}{2}$.", gold) == 1.0  # no box: the "answer is" phrase
    assert math_equiv("\\boxed{\\frac{1}{3}}", gold) == 0.0


@pytest.mark.parametrize("junk", [
    "\\boxed{", "\\frac{1}{", "}}}{{{", "\\sqrt[", "^^^", "\\unknown{3}", "__import__('os').system('true')",
    "9^{9^{9^{9}}}", "1/0", "x" * 5000, "\\pi.evalf()", "\\infty.n()", "\\boxed{\\frac{\\frac{\\frac{1}{0}}{0}}{0}}", None,
])
def test_math_never_crashes_or_hangs_on_junk(junk):
    start = time.perf_counter()
    assert math_equiv(junk, "\\boxed{1}") in (0.0, 1.0)
    assert math_equiv("\\boxed{1}", junk) in (0.0, 1.0)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------------ code_eval

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "['assert add(1, 2) == 3', 'assert add(-1, 1) == 0']"


def test_extract_code_prefers_the_last_python_block():
    resp = "Here:\n```js\nconsole.log(1)\n```\n```python\nx = 1\n```\nand\n```python\nx = 2\n```"
    assert extract_code(resp).strip() == "x = 2"
    assert extract_code("```\ny = 3\n```").strip() == "y = 3"
    assert extract_code("z = 4") == "z = 4"


def test_code_eval_passes_correct_code_with_asserts_in_every_form():
    resp = f"Sure!\n```python\n{ADD}```\nThis adds."
    assert code_eval(resp, ADD_TESTS, limits=FAST) == 1.0
    assert code_eval(ADD, ["assert add(1, 2) == 3"], limits=FAST) == 1.0
    assert code_eval(ADD, "assert add(1, 2) == 3\nassert add(2, 2) == 4", limits=FAST) == 1.0
    assert code_eval(ADD + "if __name__ == '__main__':\n    print(input())\n", ADD_TESTS, limits=FAST) == 1.0
    with_numpy = "import numpy as np\n\ndef add(a, b):\n    return int(np.add(a, b))\n"  # imports ctypes inside
    assert code_eval(with_numpy, ADD_TESTS, limits=SandboxLimits(timeout_s=20)) == 1.0


def test_code_eval_humaneval_check_is_called_on_the_entry_point():
    tests = "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n"
    helper_first = "def helper(x):\n    return x\n\ndef add(a, b):\n    return helper(a) + b\n"
    assert code_eval(helper_first, tests, limits=FAST) == 1.0
    assert code_eval("def add(a, b):\n    return a - b\n", tests, limits=FAST) == 0.0


@pytest.mark.parametrize(("name", "code"), [
    ("wrong answer", "def add(a, b):\n    return a * b\n"),
    ("raises", "def add(a, b):\n    raise ValueError('no')\n"),
    ("syntax error", "def add(a, b) return a + b"),
    ("exits early with status 0", "import sys\nsys.exit(0)\n" + ADD),
    ("os._exit(0) before the tests", "import os\nos._exit(0)\n" + ADD),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n" + ADD),
    ("subprocess", "import subprocess\nsubprocess.run(['true'])\n" + ADD),
    ("multiprocessing", "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n" + ADD),
    ("socket", "import socket\nsocket.socket().connect(('127.0.0.1', 9))\n" + ADD),
    ("socket error swallowed", "import socket\ntry:\n    socket.create_connection(('10.0.0.1', 80), 1)\n"
                               "except Exception:\n    pass\n" + ADD),
    ("memory hog", "x = bytearray(2 * 1024 ** 3)\n" + ADD),
    ("ctypes", "import ctypes\nctypes.CDLL(None).getpid()\n" + ADD),
])
def test_code_eval_misbehaving_code_scores_zero(name, code):
    assert code_eval(code, ADD_TESTS, limits=FAST) == 0.0, name


def test_code_eval_infinite_loop_and_sleep_time_out_quickly():
    limits = SandboxLimits(timeout_s=1.0, cpu_s=1)
    start = time.perf_counter()
    assert code_eval("while True:\n    pass\n" + ADD, ADD_TESTS, limits=limits) == 0.0
    assert code_eval("import time\ntime.sleep(60)\n" + ADD, ADD_TESTS, limits=limits) == 0.0
    assert time.perf_counter() - start < 8
    result = run_program("import time\ntime.sleep(60)", "", limits)
    assert result.timed_out and not result.passed


def test_code_eval_writes_outside_its_directory_fail_and_leave_nothing(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept Exception:\n    pass\n",
                 f"import os\nos.remove({str(victim)!r})\n",
                 f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')\n",
                 "import pathlib\npathlib.Path('../escaped_too.txt').write_text('x')\n"):
        assert code_eval(code + ADD, ADD_TESTS, limits=FAST) == 0.0, code
    assert not target.exists() and victim.read_text() == "keep me"
    # writing inside its own working directory is fine
    inside = "open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n"
    assert code_eval(inside + ADD, ADD_TESTS, limits=FAST) == 1.0


def test_sandbox_report_and_output_limits():
    rep = sandbox_report(FAST)
    assert rep["audit_hook"] and rep["timeout_s"] == FAST.timeout_s
    flood = run_program("print('x' * (64 * 1024 * 1024))", "", SandboxLimits(timeout_s=5, file_size_mb=1))
    assert not flood.passed


def _world_readable_python() -> str | None:
    exe = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if not exe or os.geteuid() != 0:
        return None
    p = Path(exe).resolve()
    ok = all(q.stat().st_mode & stat.S_IXOTH for q in p.parents) and p.stat().st_mode & stat.S_IROTH
    return exe if ok else None


def test_sandbox_drops_root_to_nobody_when_the_interpreter_allows():
    exe = _world_readable_python()
    if exe is None:
        pytest.skip("needs root and a world-readable system python3 to test the uid drop")
    limits = SandboxLimits(timeout_s=5, python=exe)
    assert sandbox_report(limits)["drops_to_uid"] not in (None, 0)
    result = run_program("import os\nprint(os.getuid())", "assert os.getuid() != 0", limits)
    assert result.passed and result.stdout.strip() not in ("", "0")


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_aliases_and_errors():
    assert set(SCORERS) == {"cem", "em_mc", "gsm8k", "math", "f1", "code_eval", "commongen_coverage"}
    for name in ("GSM8K", "MATH", "f1_score", "em_mc", "code_eval", "cem", "commongen_coverage"):
        assert get_scorer(name) is SCORERS[ALIASES.get(name, name)]
    assert get_scorer("gsm8k") is get_scorer("GSM8K")
    with pytest.raises(ValueError, match="unknown metric 'bleu'; valid metrics: .*GSM8K.*code_eval"):
        get_scorer("bleu")
    assert "f1_score" in metric_names()
    assert score("#### 1,234", "#### 1234", "GSM8K") == 1.0
    assert score(None, "#### 1", "GSM8K") == 0.0


# ---------------------------------------------------------------------------------------- real flags


def test_gsm8k_scorer_agrees_with_routellm_recorded_flags(shared_data):
    d = shared_data("routellm_gsm8k")
    t = load_logs("routellm", d).table
    pairs = zip(t["response"].to_pylist(), as_objects(t["ground_truth"]), t["performance"].to_pylist(), strict=True)
    agree = [gsm8k(r, g) == flag for r, g, flag in pairs]
    assert len(agree) == 2638
    assert sum(agree) / len(agree) >= 0.97


# ------------------------------------------------------------------------------------------ rescoring


def _log(rows: list[tuple]) -> dict[str, list]:
    keys = ("response", "ground_truth", "metric", "performance")
    cols = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
    n = len(rows)
    return {"query": [f"q{i}" for i in range(n)], "task": ["t"] * n, "model": ["m"] * n, **cols}


def test_rescore_replaces_scores_where_it_can_and_counts_changes():
    rows = [
        ("#### 5", "#### 5", "GSM8K", 1.0),  # unchanged
        ("#### 5.00", "#### 5", "GSM8K", 0.0),  # changed 0 -> 1
        ("(B)", "A", "em_mc", 1.0),  # changed 1 -> 0
        (None, "A", "em_mc", 0.5),  # no response: kept
        ("(A)", None, "em_mc", 0.5),  # no gold: kept
        ("(A)", "A", None, 0.5),  # no metric: kept
        ("(A)", "A", "bleu", 0.25),  # unknown metric: kept, reported
        (ADD, ADD_TESTS, "code_eval", 0.0),  # changed 0 -> 1, in the sandbox
        (ADD, ADD_TESTS, "code_eval", 0.0),  # same job: scored once, changed
    ]
    table, counts, notes = rescore_table(canonical_table(_log(rows)), progress=False, code_limits=FAST)
    assert table["performance"].to_pylist() == [1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.25, 1.0, 1.0]
    assert counts == {"rescored_rows": 5, "rescore_changed": 4, "rescore_kept_rows": 4}
    assert "re-scored 5 rows" in notes[0] and "'bleu' (1 rows)" in notes[1]


def test_data_rescore_key_reaches_the_report(tmp_path):
    assert SOURCE_DEFAULTS["rescore"] is False
    rows = [("#### 5.00", "#### 5", "GSM8K", 0.0), ("#### 4", "#### 5", "GSM8K", 0.0)]
    f = tmp_path / "gsm8k_log.jsonl"
    with f.open("w") as fh:
        for i, (resp, gold, metric, perf) in enumerate(rows):
            for model in ("a-7b", "b-70b"):
                fh.write(json.dumps({"task_name": "gsm8k", "query": f"q{i}", "llm": model, "response": resp,
                                     "ground_truth": gold, "metric": metric, "performance": perf}) + "\n")
    cfg = {"format": "llmfusionbench", "path": str(f), "split": "query", "val_fraction": 0.0, "test_fraction": 0.5}
    plain = load_from_config(cfg)
    assert "rescored_rows" not in plain.report.counts
    logs = load_from_config({**cfg, "rescore": True})
    assert logs.report.counts["rescored_rows"] == 4 and logs.report.counts["rescore_changed"] == 2
    assert sorted(logs.table["performance"].to_pylist()) == [0.0, 0.0, 1.0, 1.0]
    assert any("data.rescore=true" in n for n in logs.report.notes)
