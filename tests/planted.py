"""A small log with a planted routing rule, written in LLMRouter's format so it goes through the real
reader, validation, splits and `fit`.

Rule: `alpha` is right on arithmetic, `beta` on geography, `gamma` is a decent generalist (the best
single model), `delta` is cheap and weak. A router that reads the query must beat best single.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

MODELS = {  # name -> (P(correct) on arithmetic, geography, poetry), price per M tokens
    "alpha": ((0.95, 0.05, 0.30), 0.2),
    "beta": ((0.05, 0.95, 0.30), 1.0),
    "gamma": ((0.60, 0.60, 0.75), 0.6),
    "delta": ((0.20, 0.20, 0.20), 0.05),
}
TASKS = ("arithmetic", "geography", "poetry")
_WORDS = {
    "arithmetic": ["sum", "add", "multiply", "numbers", "total", "plus", "product", "digits"],
    "geography": ["river", "capital", "country", "mountain", "continent", "ocean", "border", "city"],
    "poetry": ["poem", "rhyme", "verse", "stanza", "sonnet", "metaphor", "haiku", "lyric"],
}


def write_planted_logs(folder: Path, n_per_task: int = 80, seed: int = 0) -> Path:
    """Write scores_train/test.json, queries_train/test.jsonl and llm_candidates.json; return the folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    catalog = {m: {"size": f"{7 * (i + 1)}B", "feature": f"{m} model", "input_price": price, "output_price": price}
               for i, (m, (_, price)) in enumerate(MODELS.items())}
    (folder / "llm_candidates.json").write_text(json.dumps(catalog))
    for split, n in (("train", n_per_task), ("test", n_per_task // 2)):
        scores, queries = [], []
        for t_i, task in enumerate(TASKS):
            for i in range(n):
                words = rng.choice(_WORDS[task], size=4, replace=True)
                q = f"{split} {task} question {i}: " + " ".join(words) + f" #{rng.integers(1_000_000)}"
                s = {m: float(rng.random() < p[t_i]) for m, (p, _) in MODELS.items()}
                scores.append({"question": q, "scores": s})
                queries.append({"task_name": task, "query": q, "ground_truth": "x", "metric": "em_mc"})
        (folder / f"scores_{split}.json").write_text(json.dumps(scores))
        (folder / f"queries_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n")
    return folder


def planted_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """Hydra overrides that run a recipe on the planted log with the fast hashing encoder."""
    folder = write_planted_logs(tmp_path / "planted")
    return ["data=llmrouter", f"data.path={folder}", "datamodule.encoder=hashing",
            f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", *extra]


def fit_planted_router(tmp_path: Path, epochs: int = 20) -> Path:
    """A `router_mlp` trained on the planted log (hashing encoder, no logger or callbacks): its best checkpoint."""
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit

    summary = fit(compose_recipe("router_mlp", planted_overrides(tmp_path, f"trainer.max_epochs={epochs}",
                                                                 "logger=none", "callbacks=none")))
    return tmp_path / "run" / summary["artifacts"]["best_checkpoint"]


# a rule *inside* each task: the per-task lookup cannot see it, a router that reads the query can
SUBTOPICS = {  # task -> {sub-topic: its words}
    "math": {"arithmetic": ["sum", "add", "plus", "total"], "geometry": ["triangle", "angle", "circle", "radius"]},
    "geo": {"rivers": ["river", "delta", "stream", "basin"], "capitals": ["capital", "city", "parliament", "mayor"]},
}
SUB_MODELS = {  # name -> P(correct) per sub-topic, price per M tokens
    "alpha": ({"arithmetic": 0.95, "geometry": 0.10, "rivers": 0.95, "capitals": 0.10}, 0.3),
    "beta": ({"arithmetic": 0.10, "geometry": 0.95, "rivers": 0.10, "capitals": 0.95}, 0.3),
    "gamma": ({"arithmetic": 0.55, "geometry": 0.55, "rivers": 0.55, "capitals": 0.55}, 0.3),
}


def write_subtopic_logs(folder: Path, n_per_subtopic: int = 120, seed: int = 0, price: float | None = None,
                        models: dict | None = None) -> Path:
    """LLMRouter-format logs where which model is right depends on the sub-topic *within* each task
    (alpha on arithmetic and rivers, beta on geometry and capitals): task-best is stuck near 0.5,
    a router that reads the query reaches ~0.95. `price` overrides every model's price (0: no costs);
    `models` replaces SUB_MODELS (e.g. a weaker planted signal)."""
    models = SUB_MODELS if models is None else models
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    catalog = {m: {"size": "7B", "feature": f"{m} model", "input_price": p if price is None else price,
                   "output_price": p if price is None else price} for m, (_, p) in models.items()}
    (folder / "llm_candidates.json").write_text(json.dumps(catalog))
    for split, n in (("train", n_per_subtopic), ("test", n_per_subtopic // 2)):
        scores, queries = [], []
        for task, subs in SUBTOPICS.items():
            for sub, words in subs.items():
                for i in range(n):
                    q = f"{split} {task} {i}: " + " ".join(rng.choice(words, size=4)) + f" #{rng.integers(1_000_000)}"
                    scores.append({"question": q, "scores": {m: float(rng.random() < p[sub])
                                                             for m, (p, _) in models.items()}})
                    queries.append({"task_name": task, "query": q, "ground_truth": "x", "metric": "em_mc"})
        (folder / f"scores_{split}.json").write_text(json.dumps(scores))
        (folder / f"queries_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n")
    return folder


# a rule only the *answers* show: which of the cheap model's answers are right (the cascade's scorer)
CASCADE_MODELS = {"cheap": (0.5, 0.1), "strong": (0.85, 10.0)}  # name -> P(correct), price per M tokens


def write_cascade_logs(folder: Path, n: int = 400, seed: int = 0) -> Path:
    """A RouteLLM-format CSV (prompt, <model>, <model>_response) and its catalog: `cheap` is right on
    half the queries and its answer says so (a confident "verified" answer when right, a hedged one when
    wrong); `strong` is right on 85% with answers that read the same either way. The queries carry no
    signal, so a router that reads only the query stays at the best single model (strong); a cascade
    that reads the cheap answer accepts its right ones and escalates the rest: ~0.92 at about half
    strong's cost."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    catalog = {m: {"params_b": 7.0 * (i + 1), "input_price": price, "output_price": price}
               for i, (m, (_, price)) in enumerate(CASCADE_MODELS.items())}
    (folder / "catalog.json").write_text(json.dumps(catalog))
    words = ["apples", "trains", "coins", "boxes", "pages", "miles", "cups", "seeds"]
    rows = []
    for i in range(n):
        q = f"Question {i}: how many {' '.join(rng.choice(words, size=3))} are left? #{rng.integers(1_000_000)}"
        ok = {m: bool(rng.random() < p) for m, (p, _) in CASCADE_MODELS.items()}
        a = int(rng.integers(100))
        cheap = (f"Counting step by step gives {a}, verified twice: the answer is {a}." if ok["cheap"]
                 else f"Hmm, I am not sure, maybe around {a}? It could also be something else.")
        strong = f"Working through it carefully, the answer is {a}."
        rows.append([q, ok["cheap"], ok["strong"], cheap, strong])
    with open(folder / "planted_responses.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "cheap", "strong", "cheap_response", "strong_response"])
        w.writerows(rows)
    return folder
