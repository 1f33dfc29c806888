"""A seeded synthetic multi-LLM log in the shape of LLMFusionBench (the FusionFactory benchmark).

Why it exists: the Quickstart and the tests need a default log that is generated offline in seconds
yet exercises the real code paths. It has LLMFusionBench's columns and quirks (cost in micro-dollars,
embeddings as "tensor([...])" strings only on the first row of each query block, a `_think` model
variant), its 14 tasks in 6 domains, ~20 open LLMs from 7B to 671B whose skills differ by domain and
by a sub-topic word in the query text (so no model wins everywhere and a per-query router beats the
best model per task), and responses whose final answers agree with their scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa

from fusion_lightning.data.schema import TASK_DOMAINS, ModelCatalog, ModelInfo

COLUMNS = ("task_name", "task_id", "task_description", "task_description_embedding", "query",
           "query_embedding", "ground_truth", "metric", "llm", "input_price", "output_price",
           "input_tokens_num", "output_tokens_num", "performance", "cost", "response",
           "llm_description", "llm_judge")
DOMAINS = ("math", "code", "commonsense", "world_knowledge", "reading", "popular")

# name, metric, mean difficulty, sub-topic words (each appears in its queries' text), description
_TASKS: list[tuple[str, str, float, tuple[str, ...], str]] = [
    ("gsm8k", "GSM8K", -0.8, ("apples", "dollars", "cookies", "miles", "pencils"),
     "Grade-school math word problems solved in a few arithmetic steps; the answer is a number after '####'."),
    ("math", "MATH", 0.6, ("algebra", "geometry", "probability", "arithmetic", "number theory"),
     "Competition mathematics problems whose final answer is written in \\boxed{}."),
    ("mbpp", "code_eval", -0.2, ("list", "string", "integer", "sort"),
     "Basic Python programming problems checked by running assert-based unit tests."),
    ("human_eval", "code_eval", 0.2, ("list", "string", "integer", "sort"),
     "Hand-written Python function-completion problems checked by unit tests."),
    ("commonsense_qa", "em_mc", -0.4, ("kitchen", "office", "school", "garage", "park"),
     "Five-way multiple-choice questions that need everyday commonsense knowledge."),
    ("arc_challenge", "em_mc", 0.0, ("physics", "biology", "chemistry", "geology", "astronomy"),
     "Grade-school science multiple-choice questions that retrieval alone cannot answer."),
    ("hellaswag", "em_mc", -0.5, ("cooking", "football", "cleaning", "music", "gardening"),
     "Choose the most plausible continuation of an everyday scene."),
    ("openbook_qa", "em_mc", -0.2, ("energy", "animals", "plants", "weather", "magnets"),
     "Elementary science multiple-choice questions that combine a core fact with commonsense."),
    ("natural_qa", "f1_score", 0.9, ("history", "film", "music", "sports", "science"),
     "Open-domain questions from real search queries, answered with a short span."),
    ("trivia_qa", "f1_score", 0.4, ("geography", "literature", "painting", "politics", "olympics"),
     "Trivia questions answered with a short span, scored by token F1."),
    ("squad", "f1_score", -0.8, ("architecture", "medicine", "economics", "religion", "engineering"),
     "Reading comprehension: answer a question with a span of the given passage."),
    ("boolq", "cem", -0.8, ("geography", "law", "biology", "sports", "television"),
     "Yes/no questions about a short passage."),
    ("mmlu", "em_mc", 0.2, ("high school physics", "world history", "professional law", "college medicine",
                            "philosophy"),
     "Multiple-choice exam questions across 57 academic and professional subjects."),
    ("gpqa", "em_mc", 1.6, ("quantum mechanics", "organic chemistry", "molecular biology", "astrophysics"),
     "Graduate-level, Google-proof multiple-choice science questions."),
]
SYNTHETIC_TASKS: dict[str, tuple[str, str]] = {t[0]: (TASK_DOMAINS[t[0]], t[1]) for t in _TASKS}

# name, params (B), input/output USD per M tokens, skill bonus per DOMAINS, sentences of reasoning,
# strengths, weaknesses.
_PROFILES: list[tuple[str, float, float, float, tuple[float, ...], int, str, str]] = [
    ("qwen2.5-7b-instruct", 7.6, 0.10, 0.20, (0.6, 0.3, 0.0, -0.4, 0.1, 0.1), 1, "math and coding for its size", "factual recall"),
    ("llama-3.1-8b-instruct", 8.0, 0.10, 0.20, (-0.2, -0.1, 0.4, 0.3, 0.3, 0.0), 1, "commonsense and reading", "multi-step math"),
    ("qwen2.5-coder-32b-instruct", 32.5, 0.40, 0.80, (0.2, 1.4, -0.4, -0.6, -0.2, -0.2), 2, "code generation", "world knowledge and commonsense"),
    ("llama-3.1-70b-instruct", 70.0, 0.80, 1.00, (0.0, 0.1, 0.3, 0.5, 0.3, 0.2), 3, "world knowledge and reading", "competition math"),
    ("deepseek-r1-distill-qwen-32b", 32.8, 0.40, 0.90, (1.5, 0.4, -0.3, -0.8, -0.2, 0.2), 8, "long step-by-step math reasoning", "factual recall"),
    ("deepseek-v3", 671.0, 1.50, 2.00, (0.2, 0.2, 0.3, -0.2, 0.0, 0.4), 4, "broad reasoning and exam questions", "obscure trivia"),
    ("mistral-7b-instruct-v0.3", 7.2, 0.10, 0.15, (-0.5, -0.4, 0.2, 0.1, 0.2, -0.2), 1, "short commonsense answers", "math and code"),
    ("gemma-2-9b-it", 9.2, 0.12, 0.25, (0.0, -0.2, 0.3, 0.1, 0.5, 0.2), 1, "reading comprehension", "code"),
    ("qwen2.5-72b-instruct", 72.7, 0.80, 1.20, (0.7, 0.6, 0.1, -0.1, 0.2, 0.5), 3, "math, code and exam questions", "trivia"),
    ("mixtral-8x22b-instruct-v0.1", 141.0, 1.00, 1.20, (-0.1, 0.1, 0.2, 0.6, 0.2, 0.1), 2, "world knowledge", "competition math"),
    ("qwen2.5-7b-instruct_think", 7.6, 0.10, 0.20, (1.0, 0.4, 0.0, -0.4, 0.1, 0.2), 6, "math when prompted to reason at length", "factual recall"),
    ("mistral-nemo-12b-instruct", 12.2, 0.15, 0.30, (-0.1, 0.0, 0.2, 0.3, 0.2, 0.0), 1, "multilingual world knowledge", "code"),
    ("phi-3-medium-4k-instruct", 14.0, 0.15, 0.30, (0.4, 0.1, 0.5, -0.6, 0.3, 0.3), 2, "reasoning and commonsense", "factual recall"),
    ("gemma-2-27b-it", 27.2, 0.30, 0.60, (0.1, 0.0, 0.3, 0.2, 0.4, 0.2), 2, "reading and commonsense", "code"),
    ("mixtral-8x7b-instruct-v0.1", 46.7, 0.45, 0.60, (-0.3, 0.0, 0.1, 0.3, 0.1, 0.0), 2, "balanced general answers", "math"),
    ("granite-34b-code-instruct", 34.0, 0.40, 0.80, (-0.2, 1.1, -0.5, -0.7, -0.3, -0.4), 2, "code", "everything but code"),
    ("llama-3.1-nemotron-51b-instruct", 51.5, 0.55, 0.90, (0.3, 0.1, 0.3, 0.2, 0.2, 0.3), 3, "helpful general answers", "specialised code"),
    ("llama3-chatqa-1.5-70b", 70.6, 0.80, 1.00, (-0.4, -0.5, 0.2, 0.4, 1.0, 0.0), 2, "question answering over a passage", "code and math"),
    ("llama-3.3-nemotron-super-49b-v1", 49.9, 0.55, 0.90, (0.9, 0.3, 0.2, -0.1, 0.1, 0.4), 5, "math reasoning", "trivia"),
    ("llama-3.1-405b-instruct", 405.0, 1.40, 1.80, (0.0, 0.1, 0.2, 0.5, 0.3, 0.3), 3, "world knowledge and long context", "price"),
]


def _describe(p: tuple) -> str:
    name, size, pin, pout, _, _, good, bad = p
    return (f"{name} is an open LLM with {size:g}B parameters, strong at {good} and weaker at {bad}; it "
            f"costs ${pin:.2f} per million input tokens and ${pout:.2f} per million output tokens.")


SYNTHETIC_MODELS: list[ModelInfo] = [
    ModelInfo(p[0], p[1], p[2], p[3], _describe(p), p[0][: -len("_think")] if p[0].endswith("_think") else None)
    for p in _PROFILES
]


def synthetic_catalog() -> ModelCatalog:
    """The catalog of all synthetic models (sizes, prices, descriptions)."""
    return ModelCatalog({m.name: ModelInfo(**vars(m)) for m in SYNTHETIC_MODELS}, source="synthetic")


# The fixed "world": model skills do not depend on the generation seed, so logs drawn with different
# seeds describe the same models (train on seed 0, test on seed 1).
_A = 1.5  # logit slope
_SKILL = np.array([[0.25 * math.log(p[1] / 7) + b for b in p[4]] for p in _PROFILES])  # (models, domains)
_SUB_OFF = np.random.default_rng(20_240_601).normal(0.0, 0.6, (len(_PROFILES), len(_TASKS), 5))
_JUDGE_SHIFT = 0.6 * _SKILL.mean(1)
_VERBOSITY = np.array([p[5] for p in _PROFILES])
_TASK_DOM = np.array([DOMAINS.index(TASK_DOMAINS[t[0]]) for t in _TASKS])
_V = 3  # response-length variants per (domain, model)
_CHUNK = 2_000


def _split(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


_FIRST = _split("Alice Boris Clara Diego Elena Farid Greta Hugo Irene Jonas Keiko Lars Maya Nikhil Olga Pablo "
                "Quinn Rosa Sven Tara Umar Vera Wes Ximena Yusuf Zoe")
_LAST = _split("Abbott Brandt Castillo Dubois Eriksen Fischer Gupta Haddad Ivanova Jensen Kowalski Lindqvist "
               "Moreau Nakamura Okafor Petrov Quintero Rossi Sato Tanaka Ueda Varga Weber Xu Yilmaz Zhou")
_OBJ = _split("lamp kettle ladder mirror candle blanket bicycle umbrella clock bottle basket helmet compass "
              "lantern pillow drum rope sponge bucket jar spoon brush kite shovel hammer notebook backpack scarf "
              "glove teapot")
_ADJ = _split("red heavy wooden metal small large old new wet hot cold bright hollow round plastic glass broken "
              "folded striped shiny")
_VERBS = _split("moves toward|falls onto|floats above|slides under|rolls past|sticks to|leans against|rests on|"
                "hides behind|bounces off|points at|hangs over", "|")
_NOUNS = _split("table window floor door wall shelf stove sink roof chair fence box carpet counter drawer bench "
                "cabinet staircase balcony desk")
_CITIES = _split("Lisbon Oslo Nairobi Lima Hanoi Quito Dakar Perth Kyoto Porto Tunis Riga Accra Cusco Bergen "
                 "Graz Austin Busan Cordoba Valencia")
_OFFSETS = [o for o in range(-9, 10) if o]
_LETTERS = "ABCDE"

# --- query generators: (rng, sub-topic) -> (query, ground truth, gold value, 3 wrong values, partial) ---
Gen = Callable[[random.Random, str], tuple[str, str, str, list[str], "str | None"]]


def _wrong_ints(r: random.Random, g: int) -> list[str]:
    return [str(g + o) for o in r.sample(_OFFSETS, 3)]


def _gsm8k(r: random.Random, sub: str):
    name, a, b, c = r.choice(_FIRST), r.randint(5, 90), r.randint(2, 15), r.randint(2, 9)
    d = r.randint(1, a)
    g = a + b * c - d
    q = (f"{name} has {a} {sub}. Every day for {c} days {name} gets {b} more {sub}, and then gives {d} {sub} "
         f"to a friend. How many {sub} does {name} have now?")
    gt = f"{name} gets {b} * {c} = {b * c} more {sub}. {a} + {b * c} - {d} = {g}.\n#### {g}"
    return q, gt, str(g), _wrong_ints(r, g), None


def _math(r: random.Random, sub: str):
    if sub == "algebra":
        x, a, b = r.randint(-30, 30), r.randint(2, 19), r.randint(-99, 99)
        g, q = x, f"Algebra: solve for $x$ in ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}$."
    elif sub == "geometry":
        a, b = 2 * r.randint(1, 120), r.randint(2, 240)
        g, q = a * b // 2, f"Geometry: a right triangle has legs of length {a} and {b}. What is its area?"
    elif sub == "probability":
        n, k, who, what = r.randint(5, 60), r.randint(2, 4), r.choice(_FIRST), r.choice(_OBJ)
        g = math.comb(n, k)
        q = (f"Probability: {who} picks {k} of {n} distinct {what}s at random. How many equally likely "
             f"outcomes are there?")
    elif sub == "arithmetic":
        a, b, c = r.randint(11, 999), r.randint(11, 99), r.randint(1, 999)
        g, q = a * b - c, f"Arithmetic: compute ${a} \\times {b} - {c}$."
    else:
        a, b = r.randint(100, 99_999), r.randint(3, 97)
        g, q = a % b, f"Number theory: what is the remainder when {a} is divided by {b}?"
    return q, f"The answer is $\\boxed{{{g}}}$.", str(g), _wrong_ints(r, g), None


# sub-topic -> [(function name, description, argument kind, correct body, buggy body)]
_CODE = {
    "list": [("sum_squares", "find the sum of the squares of the values in a list", "ints",
              "return sum(v * v for v in x)", "return sum(v * 2 for v in x)"),
             ("count_even", "count the even values in a list", "ints",
              "return sum(1 for v in x if v % 2 == 0)", "return sum(1 for v in x if v % 2)")],
    "string": [("count_vowels", "count the vowels in a string", "word",
                "return sum(c in 'aeiou' for c in x.lower())", "return sum(c in 'aei' for c in x)"),
               ("reverse_words", "reverse the order of the words in a string", "words",
                "return ' '.join(x.split()[::-1])", "return x[::-1]")],
    "integer": [("triangular", "compute the n-th triangular number for a positive integer n", "pos",
                 "return x * (x + 1) // 2", "return x * (x - 1) // 2"),
                ("digit_sum", "return the sum of the digits of a positive integer", "pos",
                 "return sum(int(c) for c in str(x))", "return len(str(x))")],
    "sort": [("sort_desc", "sort the given values in descending order", "ints",
              "return sorted(x, reverse=True)", "return sorted(x)"),
             ("second_smallest", "find the second smallest of the given distinct values after a sort", "distinct",
              "return sorted(x)[1]", "return sorted(x)[0]")],
}
_CODE_FN: dict[str, Callable] = {}
for _kinds in _CODE.values():
    for _fname, _, _, _ok, _ in _kinds:
        _ns: dict = {}
        exec(f"def {_fname}(x):\n    {_ok}\n", _ns)  # constant source: the reference solutions
        _CODE_FN[_fname] = _ns[_fname]


def _code_arg(r: random.Random, kind: str):
    if kind == "ints":
        return [r.randint(-9, 30) for _ in range(r.randint(2, 6))]
    if kind == "distinct":
        return r.sample(range(-20, 60), r.randint(3, 6))
    if kind == "word":
        return r.choice(_OBJ) + r.choice(_ADJ)
    if kind == "words":
        return " ".join(r.choice(_OBJ + _ADJ) for _ in range(r.randint(2, 4)))
    return r.randint(1, 5000)


def _code(style: str) -> Gen:
    def gen(r: random.Random, sub: str):
        fname, desc, kind, ok, bug = r.choice(_CODE[sub])
        args = [_code_arg(r, kind) for _ in range(3)]
        tests = [f"assert {fname}({a!r}) == {_CODE_FN[fname](a)!r}" for a in args]
        if style == "mbpp":
            q = f"Write a python function to {desc}.\nYour code should pass these tests:\n" + "\n".join(tests)
        else:
            ex = "".join(f"    >>> {fname}({a!r})\n    {_CODE_FN[fname](a)!r}\n" for a in args[:2])
            q = f'Complete the following python function.\n\ndef {fname}(x):\n    """{desc.capitalize()}.\n{ex}    """\n'
        code = [f"```python\ndef {fname}(x):\n    {body}\n```" for body in (ok, bug, bug, "return None")]
        return q, repr(tests), code[0], code[1:], None

    return gen


_MC_STEMS = {
    "commonsense_qa": "Where in the {sub} would someone most likely keep a {adj} {obj}?",
    "arc_challenge": "In a {sub} lesson, students observe a {adj} {obj}. Which statement best explains what they see?",
    "hellaswag": "A video about {sub} shows a person holding a {adj} {obj}. What happens next?",
    "openbook_qa": "Using what you know about {sub}, which is most likely true of a {adj} {obj}?",
    "mmlu": "Question about {sub}: which of the following statements about the {adj} {obj} is correct?",
    "gpqa": "Graduate-level {sub} question: a {adj} {obj} is studied under controlled conditions. "
            "Which outcome is expected?",
}


def _mc(task: str, n_opts: int) -> Gen:
    def gen(r: random.Random, sub: str):
        opts: list[str] = []
        while len(opts) < n_opts:
            o = f"It {r.choice(_VERBS)} the {r.choice(_NOUNS)}"
            if o not in opts:
                opts.append(o)
        gold = r.randrange(n_opts)
        q = _MC_STEMS[task].format(sub=sub, adj=r.choice(_ADJ), obj=r.choice(_OBJ)) + "".join(
            f" ({_LETTERS[i]}) {o}" for i, o in enumerate(opts))
        wrong = r.sample([c for c in _LETTERS[:n_opts] if c != _LETTERS[gold]], 3)
        return q, _LETTERS[gold], _LETTERS[gold], wrong, None

    return gen


def _person(r: random.Random, k: int, avoid: list[str] | None = None) -> list[str]:
    first = r.choice([f for f in _FIRST if not avoid or f != avoid[0]])
    last = r.choice([s for s in _LAST if not avoid or s != avoid[-1]])
    return [first, f"{r.choice(_LETTERS)}.", last] if k == 3 else [first, last]


def _f1(task: str) -> Gen:
    def gen(r: random.Random, sub: str):
        gold = _person(r, 3 if r.random() < 0.4 else 2)
        wrong = [" ".join(_person(r, len(gold), gold)) for _ in range(3)]
        partial = " ".join(gold[:-1] + [r.choice([s for s in _LAST if s != gold[-1]])])
        city, year, adj, obj = r.choice(_CITIES), r.randint(1850, 2020), r.choice(_ADJ), r.choice(_OBJ)
        if task == "natural_qa":
            q = f"who received the {year} {city} award in {sub} for the {adj} {obj}"
        elif task == "trivia_qa":
            q = f"Which figure from {city}, famous in {sub}, is remembered for the {adj} {obj} of {year}?"
        else:
            q = (f"Passage: {' '.join(gold)} founded the {city} institute of {sub} in {year}. The institute became "
                 f"known for its {adj} {obj}, and {wrong[0]} joined it in {year + r.randint(1, 30)}.\n"
                 f"Question: Who founded the {city} institute of {sub}?")
        return q, " ".join(gold), " ".join(gold), wrong, partial

    return gen


def _boolq(r: random.Random, sub: str):
    city, obj, adj, year = r.choice(_CITIES), r.choice(_OBJ), r.choice(_ADJ), r.randint(1900, 2023)
    yes = r.random() < 0.6
    adj2 = adj if yes else r.choice([a for a in _ADJ if a != adj])
    q = (f"Passage: A {year} report on {sub} in {city} described the town's {obj} as {adj}.\n"
         f"Question: was the {obj} in {city} {adj2}?")
    gold, other = ("yes", "no") if yes else ("no", "yes")
    return q, gold, gold, [other] * 3, None


_GEN: dict[str, Gen] = {"gsm8k": _gsm8k, "math": _math, "mbpp": _code("mbpp"), "human_eval": _code("human_eval"),
                        "natural_qa": _f1("natural_qa"), "trivia_qa": _f1("trivia_qa"), "squad": _f1("squad"),
                        "boolq": _boolq, **{t: _mc(t, 5 if t == "commonsense_qa" else 4) for t in _MC_STEMS}}
_FINAL = {"GSM8K": "The final answer is {v}.\n#### {v}", "MATH": "Therefore the answer is $\\boxed{{{v}}}$.",
          "em_mc": "The answer is ({v}).", "code_eval": "{v}", "f1_score": "The answer is {v}.", "cem": "Answer: {v}."}
_STEPS = {
    "math": ["Let's solve this step by step.", "First, I write down the quantities given in the problem.",
             "Next, I set up the calculation.", "I carry out the arithmetic carefully.", "Then I simplify the result.",
             "Let me double-check each intermediate value.", "Wait, let me re-read the question to be sure.",
             "The numbers are consistent with the question."],
    "code": ["Here is a Python solution.", "I first consider edge cases such as empty input.",
             "The function makes a single pass over its input.", "I keep the implementation short and readable.",
             "Let me trace the examples from the prompt.", "The running time is linear in the input size."],
    "commonsense": ["Let's consider each option in turn.", "I eliminate the options that are implausible.",
                    "Everyday experience suggests what usually happens.", "Two options remain, and one fits better.",
                    "Let me check the wording of the question again."],
    "world_knowledge": ["Let me recall the relevant facts.", "I think about who is associated with this event.",
                        "The date and the place narrow it down.", "I am fairly confident about the name."],
    "reading": ["I read the passage carefully.", "The relevant sentence is near the start of the passage.",
                "The question asks about a detail stated in the text.", "Let me match the question to the passage."],
    "popular": ["Let's analyse the question.", "I recall the underlying principle from the subject.",
                "I rule out the distractors one by one.", "The remaining option is consistent with the theory.",
                "Let me verify this against a known example."],
}


def _progress(starts: range, show: bool) -> Iterable[int]:
    if not show:
        return starts
    from rich.progress import track

    return track(starts, description="synthetic log", total=len(starts))


def _tensor_str(v: np.ndarray) -> str:
    return "tensor([" + ", ".join(f"{x:.4f}" for x in v) + "])"


def _words_to_tokens(words: np.ndarray) -> np.ndarray:
    """Deterministic token count: round(words * 1.3), halves up, in integer arithmetic."""
    return (13 * words.astype(np.int64) + 5) // 10


def generate_llmfusionbench(n_queries: int = 600, seed: int = 0, models: int | None = None,
                            with_responses: bool = True, embed_strings: bool = False,
                            show_progress: bool = False) -> pa.Table:
    """A synthetic LLMFusionBench log: one block of `models` consecutive rows per query.

    Same arguments give an identical table. `models=N` keeps the first N of SYNTHETIC_MODELS.
    """
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    n_models = len(SYNTHETIC_MODELS) if models is None else models
    if not 1 <= n_models <= len(SYNTHETIC_MODELS):
        raise ValueError(f"models must be in 1..{len(SYNTHETIC_MODELS)}, got {models}")
    Q, M, T = n_queries, n_models, len(_TASKS)
    rng = np.random.default_rng(seed)
    task = rng.permutation(np.arange(Q) % T)
    sub = (rng.random(Q) * np.array([len(t[3]) for t in _TASKS])[task]).astype(np.int64)
    diff = rng.normal(np.array([t[2] for t in _TASKS])[task], 0.9)
    dom = _TASK_DOM[task]
    logit = _A * (_SKILL[:M][:, dom].T + _SUB_OFF[:M][:, task, sub].T - diff[:, None])  # (Q, M)
    correct = rng.random((Q, M)) < 1.0 / (1.0 + np.exp(-logit))
    is_f1 = np.array([t[1] == "f1_score" for t in _TASKS])[task]
    partial = ~correct & (rng.random((Q, M)) < 0.35) & is_f1[:, None]
    kind = np.where(correct, 0, np.where(partial, 4, rng.integers(1, 4, (Q, M))))  # 0 gold, 1-3 wrong, 4 partial
    variant = rng.integers(0, _V, (Q, M))
    judge_level = np.digitize(rng.normal(0.0, 1.0, (Q, M)) + _JUDGE_SHIFT[:M], [-0.6, 0.1, 0.8])

    # Texts, per query (seeded Python RNG: fast scalar draws), no duplicate query text within a task.
    r = random.Random(seed)
    queries, truths, finals = [""] * Q, [""] * Q, [""] * (5 * Q)
    partial_val = np.zeros(Q)
    seen: list[set[str]] = [set() for _ in range(T)]
    for start in _progress(range(0, Q, _CHUNK), show_progress):
        for i in range(start, min(start + _CHUNK, Q)):
            t = int(task[i])
            name, metric, _, subs, _ = _TASKS[t]
            for _attempt in range(20):
                q, gt, ok, bad, part = _GEN[name](r, subs[sub[i]])
                if q not in seen[t]:
                    break
            else:
                q += f" (variant {i})"
            seen[t].add(q)
            queries[i], truths[i] = q, gt
            fmt = _FINAL[metric]
            finals[5 * i: 5 * i + 5] = [fmt.format(v=v) for v in (ok, *bad, part or bad[0])]
            if part:
                n = len(ok.split())
                partial_val[i] = round((n - 1) / n, 2)

    perf = np.where(correct, 1.0, np.where(partial, partial_val[:, None], 0.0))
    judge = np.where(perf > 0, np.array([0.3, 0.6, 0.8, 1.0])[judge_level], 0.0)
    openers, op_words = [], []
    for d in DOMAINS:
        pool = _STEPS[d]
        for m in range(M):
            for v in range(_V):
                s = " ".join(pool[(m + v + j) % len(pool)] for j in range(_VERBOSITY[m] + v))
                openers.append(s)
                op_words.append(len(s.split()))
    op_idx = ((dom[:, None] * M + np.arange(M)) * _V + variant).ravel()
    fin_idx = (np.arange(Q)[:, None] * 5 + kind).ravel()
    fin_words = np.fromiter((len(f.split()) for f in finals), np.int64, 5 * Q)
    out_tok = _words_to_tokens(np.array(op_words)[op_idx] + fin_words[fin_idx])
    in_tok = np.repeat(_words_to_tokens(np.fromiter((len(q.split()) for q in queries), np.int64, Q)), M)
    if with_responses:
        resp = np.array(openers, dtype=object)[op_idx] + "\n" + np.array(finals, dtype=object)[fin_idx]
        response = pa.array(resp, pa.string())
    else:
        response = pa.nulls(Q * M, pa.string())

    q_rows, m_rows, t_rows = np.repeat(np.arange(Q), M), np.tile(np.arange(M), Q), np.repeat(task, M)
    profs = SYNTHETIC_MODELS[:M]
    in_price = np.array([p.input_price for p in profs])[m_rows]
    out_price = np.array([p.output_price for p in profs])[m_rows]
    if embed_strings:
        qe, te = [None] * (Q * M), [None] * (Q * M)
        qe[::M] = [_tensor_str(v) for v in rng.normal(0.0, 0.3, (Q, 8))]
        task_vecs = [_tensor_str(v) for v in np.random.default_rng(7).normal(0.0, 0.3, (T, 8))]
        te[::M] = [task_vecs[t] for t in task]
        q_emb, t_emb = pa.array(qe, pa.string()), pa.array(te, pa.string())
    else:
        q_emb = t_emb = pa.nulls(Q * M, pa.string())

    def take(values: list, rows: np.ndarray) -> pa.Array:
        return pa.array(values, pa.string()).take(pa.array(rows))

    cols = {
        "task_name": take([t[0] for t in _TASKS], t_rows),
        "task_id": pa.array(t_rows.astype(np.int64)),
        "task_description": take([t[4] for t in _TASKS], t_rows),
        "task_description_embedding": t_emb,
        "query": take(queries, q_rows),
        "query_embedding": q_emb,
        "ground_truth": take(truths, q_rows),
        "metric": take([t[1] for t in _TASKS], t_rows),
        "llm": take([p.name for p in profs], m_rows),
        "input_price": pa.array(in_price, pa.float64()),
        "output_price": pa.array(out_price, pa.float64()),
        "input_tokens_num": pa.array(in_tok, pa.int64()),
        "output_tokens_num": pa.array(out_tok, pa.int64()),
        "performance": pa.array(perf.ravel(), pa.float64()),
        "cost": pa.array(in_tok * in_price + out_tok * out_price, pa.float64()),  # micro-dollars
        "response": response,
        "llm_description": take([p.description for p in profs], m_rows),
        "llm_judge": pa.array(judge.ravel(), pa.float64()),
    }
    return pa.table(cols)
