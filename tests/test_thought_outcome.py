"""Thought level, the retriever trained for what matters: positives weighted by their models' logged
score on the query (datamodule.objective=outcome) against source similarity alone, on a planted case
where the two disagree; outcome@k by hand; the recipe early-stops on val/outcome@3."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from thought_logs import make_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.thought.datamodule import TemplateDataModule
from fusion_lightning.thought.metrics import outcome_at_k
from fusion_lightning.thought.retriever import TemplateRetriever


def twin_logs(pairs: int = 80, seed: int = 0):
    """Every topic-word set is asked twice: as kind A ('ka', only `solver` answers right) and as kind B
    ('kb', only `echo` does). A question's nearest neighbour is its twin of the other kind, whose template
    comes from the model that fails on it; solver and echo answer in words no question has."""
    rng = np.random.default_rng(seed)
    topics, proof, echo = ([f"{w}{i}" for i in range(12)] for w in ("topic", "proof", "echo"))
    rows = []
    for i in range(pairs):
        split = "test" if i % 5 == 0 else ("val" if i % 5 == 1 else "train")
        words = " ".join(rng.choice(topics, 5, replace=False))
        for kind in "ab":
            q = f"ask k{kind} {words} id{i}{kind}"
            rows.append((q, "t", "solver", "Then " + " ".join(rng.choice(proof, 6)) + ".", float(kind == "a"), None,
                         0.01, split))
            rows.append((q, "t", "echo", "Then " + " ".join(rng.choice(echo, 6)) + ".", float(kind == "b"), None,
                         0.01, split))
    return make_logs(rows, ["solver", "echo"])


def _run(tmp_path, objective: str, seed: int = 0) -> tuple[TemplateDataModule, dict[str, float]]:
    L.seed_everything(seed, verbose=False)
    dm = TemplateDataModule(logs=twin_logs(), library_dir=str(tmp_path / objective), encoder="hashing", batch_size=16,
                            n_neighbors=3, own_positive=False, objective=objective, selection={"n": 1})
    dm.setup("fit")
    model = TemplateRetriever(mode="head", ks=(3,), temperature=0.1, head_lr=3e-2, **dm.model_kwargs())
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, datamodule=dm)
    return dm, trainer.test(model, datamodule=dm, verbose=False)[0]


def test_outcome_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, float("-inf")], [0.1, 0.9, 0.5, 0.2]])
    outcome = torch.tensor([[1.0, 0.0, float("nan"), 1.0], [float("nan"), float("nan"), float("nan"), 1.0]])
    m = outcome_at_k(scores, outcome, ks=(1, 2, 3))
    # row 0: top-1 {1} -> 1, top-2 {1, 0} -> 0.5, top-3 {1, 0, unknown} -> 0.5 (the excluded 4th never counts);
    # row 1: top-1 and top-2 unknown -> skipped, top-3 {unknown, unknown, 1} -> 1
    assert m["outcome@1"].item() == 1.0 and m["outcome@2"].item() == 0.5 and m["outcome@3"].item() == 0.75


def test_positives_are_weighted_by_their_models_score_on_the_query(tmp_path):
    dm = TemplateDataModule(logs=twin_logs(), library_dir=str(tmp_path / "lib"), encoder="hashing", n_neighbors=3,
                            own_positive=False, objective="outcome", selection={"n": 1})
    dm.setup("fit")
    tri = dm._train
    solver_made = np.array(["solver" in t.models for t in dm.library.templates])
    kind_a = np.array(["ask ka" in q for q in dm._texts])
    for k, row in enumerate(tri.rows):
        w = tri.weights[k].numpy()
        want = (solver_made[tri.positives[k]] == kind_a[row]).astype(float)  # the right model's templates only
        assert np.array_equal(w, want), (dm._texts[row], w, want)
        assert all((solver_made[tri[k][1]] == kind_a[row]) for _ in range(5))  # sampled positives: right model
    assert dm.skill([tri.rows[0]], [0]).shape == (1, 1)
    uniform = TemplateDataModule(logs=twin_logs(), library_dir=str(tmp_path / "lib"), encoder="hashing", n_neighbors=3,
                                 own_positive=False, objective="similarity", selection={"n": 1})
    uniform.setup("fit")
    assert uniform._train.weights is None and len(uniform._train) >= len(tri)
    with pytest.raises(ValueError, match="objective"):
        TemplateDataModule(logs=twin_logs(), objective="ndcg")


def test_outcome_objective_retrieves_what_helps_where_similarity_and_ndcg_do_not_see_it(tmp_path):
    _, sim = _run(tmp_path, "similarity")
    _, out = _run(tmp_path, "outcome")
    # the frozen lexical encoder sees no relation between questions and answer words: half its picks help
    assert 0.4 < out["test/frozen/outcome@3"] < 0.6
    # neighbours' templates as uniform positives pull each question towards its twin's (wrong-model) template
    assert sim["test/outcome@3"] < 0.75
    assert out["test/outcome@3"] > 0.95 and out["test/outcome@3"] > sim["test/outcome@3"] + 0.2
    # nDCG against source similarity does not tell the two apart
    assert abs(out["test/ndcg@3"] - sim["test/ndcg@3"]) < 0.05


def test_template_retriever_recipe_checkpoints_and_stops_on_val_outcome():
    cfg = compose_recipe("template_retriever", [])
    assert cfg.callbacks.model_checkpoint.monitor == cfg.callbacks.early_stopping.monitor == "val/outcome@3"
    assert cfg.callbacks.model_checkpoint.mode == "max" and cfg.datamodule.objective == "outcome"
