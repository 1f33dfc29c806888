"""Thought level, retrieval: metrics, exact top-k with task filter, trained retriever vs frozen on planted
relevance, prompt assembly / TemplateAugmenter, and the template_retriever recipe smoke run."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from thought_logs import planted_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.scoring.formats import answer_instruction
from fusion_lightning.thought.datamodule import TemplateDataModule
from fusion_lightning.thought.metrics import bm25_scores, retrieval_metrics
from fusion_lightning.thought.prompt import TemplateAugmenter, few_shot_prompt, template_prompt
from fusion_lightning.thought.retriever import TemplateIndex, TemplateRetriever


def test_retrieval_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1, float("-inf")]])
    relevant = torch.tensor([[False, True, True, True]])  # the -inf one is excluded from the index
    gains = torch.tensor([[0.0, 1.0, 0.5, 1.0]])
    m = retrieval_metrics(scores, relevant, gains, ks=(2,))
    assert m["mrr"].item() == 0.5
    assert abs(m["recall@2"].item() - 0.5) < 1e-6  # 1 of the 2 indexable relevant in the top 2
    ideal = 1.0 + 0.5 / np.log2(3)
    assert abs(m["ndcg@2"].item() - (1.0 / np.log2(3)) / ideal) < 1e-5
    bm = bm25_scores(["apple pie"], ["apple pie recipe", "car engine", "pie"])
    assert bm[0, 0] > bm[0, 2] > bm[0, 1] == 0


def test_index_exact_top_k_with_task_filter():
    g = torch.Generator().manual_seed(0)
    vecs = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=1)
    tasks = ["a" if i % 2 else "b" for i in range(500)]
    q = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=1)
    index = TemplateIndex(vecs, tasks)
    s, i = index.search(q, 5, batch_size=3)
    ref = torch.topk(q @ vecs.T, 5, dim=1)
    assert torch.equal(i, ref.indices) and torch.allclose(s, ref.values)
    _, i = index.search(q, 5, tasks=["a", "b", None, "unknown", "a", "a", "b"])
    assert all(tasks[j] == "a" for j in i[0].tolist()) and all(tasks[j] == "b" for j in i[1].tolist())
    assert torch.equal(i[2], ref.indices[2]) and torch.equal(i[3], ref.indices[3])  # no/unknown task: all


def test_library_is_built_once_in_prepare_data_and_loaded_in_setup_on_every_rank(tmp_path, monkeypatch):
    kw = dict(library_dir=str(tmp_path / "lib"), encoder="hashing", embedding_cache=str(tmp_path / "emb"))
    rank0 = TemplateDataModule(logs=planted_logs(), **kw)
    rank0.prepare_data()  # Lightning: local rank 0 only, before setup anywhere
    assert (tmp_path / "lib" / "library.json").is_file() and list((tmp_path / "emb").rglob("shard-*.npz"))

    def no_second_build(*a, **k):
        raise AssertionError("the library was built (summarised) again")

    monkeypatch.setattr("fusion_lightning.thought.datamodule.build_library", no_second_build)
    rank1 = TemplateDataModule(logs=planted_logs(), **kw)
    rank1.setup("fit")  # every rank: loads the library and reads the cached query vectors
    rank0.setup("fit")
    assert [t.id for t in rank1.library.templates] == [t.id for t in rank0.library.templates]
    assert np.array_equal(rank1._qv, rank0._qv)


def _planted_run(tmp_path, dm_kw=None, model_kw=None):
    L.seed_everything(0, verbose=False)
    dm = TemplateDataModule(logs=planted_logs(), library_dir=str(tmp_path / "lib"), encoder="hashing",
                            task_filter=False, batch_size=16, n_neighbors=2, **(dm_kw or {}))
    dm.setup("fit")
    model = TemplateRetriever(mode="head", ks=(3,), temperature=0.1, head_lr=3e-2, **(model_kw or {}),
                              **dm.model_kwargs())
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    return dm, model, trainer, metrics


def test_trained_retriever_beats_frozen_on_planted_relevance(tmp_path):
    dm, model, trainer, m = _planted_run(tmp_path)
    assert len(dm.library) > 100 and dm.summary()["test_eval_queries"] == 32
    # queries and templates share no words: the frozen lexical encoder is at chance (1 in 4 tasks)
    assert m["test/frozen/ndcg@3"] < 0.45 and m["test/bm25/ndcg@3"] < 0.45
    assert m["test/ndcg@3"] > m["test/frozen/ndcg@3"] + 0.3 and m["test/mrr"] > m["test/frozen/mrr"] + 0.3

    ckpt = tmp_path / "r.ckpt"
    trainer.save_checkpoint(ckpt)
    aug = TemplateAugmenter.load(tmp_path / "lib", retriever_ckpt=ckpt, k=3, task_filter=False)
    query = "ask q2w1 q2w3 q2w5 q2w7 q2w0"
    assert [t.task for t in aug.retrieve([query])[0]] == ["task2"] * 3
    prompt = aug.prompts([query], ["task2"], ["GSM8K"])[0]
    assert prompt.count("Thought template:") == 3 and prompt.endswith(answer_instruction("GSM8K"))
    assert prompt.index("Use the most relevant template") < prompt.index(query)
    frozen = TemplateAugmenter.load(tmp_path / "lib", k=2, task_filter=True)
    assert {t.task for t in frozen.retrieve([query], ["task1"])[0]} == {"task1"}  # the task filter


def test_distillation_and_resampled_hard_negatives_also_learn_the_planted_map(tmp_path):
    _, _, _, m = _planted_run(tmp_path, {"n_hard": 2, "hard_band": (2, 20)}, {"distill_weight": 1.0})
    assert m["test/ndcg@3"] > m["test/frozen/ndcg@3"] + 0.3 and m["test/mrr"] > m["test/frozen/mrr"] + 0.3


def test_hard_negative_pools_and_teacher_gains_follow_the_eval_definition(tmp_path):
    dm = TemplateDataModule(logs=planted_logs(n_per_task=20), library_dir=str(tmp_path / "lib"), encoder="hashing",
                            task_filter=False, batch_size=8, n_neighbors=2, n_hard=3, hard_band=(2, 10))
    dm.setup("fit")
    tri, srcs, qv = dm._train, dm._sources, dm._qv
    own_of = {i: {j for j, s in enumerate(srcs) if i in s} for i in tri.rows}
    torch.manual_seed(0)
    for k in range(len(tri)):
        row, pos, hard, pos_set = tri[k]
        assert pos_set == set(tri.positives[k])
        assert pos in pos_set and len(hard) == 4  # 1 other-task + n_hard same-task
        assert dm._t_tasks[hard[0]] != dm._q_tasks[row]
        for j in hard[1:]:
            assert dm._t_tasks[j] == dm._q_tasks[row] and j not in pos_set and j not in own_of[row]
    assert len({tuple(tri[0][2][1:]) for _ in range(10)}) > 1  # resampled at every draw
    batch = dm._collate_train([tri[k] for k in range(4)])
    rows = [tri.rows[k] for k in range(4)]
    cols = [dm.index_texts.index(t) for t in batch["positive"] + batch["negatives"]]
    for r, i in enumerate(rows):
        for c, j in enumerate(cols):
            others = [x for x in srcs[j] if x != i]
            want = max(0.0, max(float(qv[i] @ qv[x]) for x in others)) if others and \
                dm._t_tasks[j] == dm._q_tasks[i] else 0.0
            assert abs(batch["gains"][r, c].item() - want) < 1e-5
            assert batch["own"][r, c].item() == (i in srcs[j])
    assert all(own_of[r] <= set(p) for r, p in zip(tri.rows, tri.positives, strict=True))  # own_positive=True


def test_prompt_builders():
    p = template_prompt("What is 2+3?", [("What is 1+1?", "Task type: sum")], "em_mc")
    assert "Question: What is 1+1?\nThought template:\nTask type: sum" in p and p.endswith(answer_instruction("em_mc"))
    assert template_prompt("Q?", [], "GSM8K") == "Q?\n\n" + answer_instruction("GSM8K")
    f = few_shot_prompt("Q?", [("A?", "a #### 1"), ("B?", "b #### 2")], "GSM8K")
    assert f.count("Solution:") == 2 and f.endswith(answer_instruction("GSM8K"))


def test_template_retriever_recipe_smoke(tmp_path):
    cfg = compose_recipe("template_retriever", [
        "datamodule.encoder=hashing", "model.mode=head", f"run_dir={tmp_path / 'run'}",
        "data.synthetic.n_queries=200", "data.synthetic.models=4", "trainer.max_epochs=1", "trainer.accelerator=cpu"])
    summary = fit(cfg)
    for k in ("test/ndcg@3", "test/frozen/ndcg@3", "test/bm25/ndcg@3", "test/recall@3", "test/mrr", "val/ndcg@3",
              "val/outcome@3", "test/outcome@3", "test/frozen/outcome@3", "test/bm25/outcome@3"):
        assert 0.0 <= summary["metrics"][k] <= 1.0, k
    assert summary["data"]["templates"] > 0 and (tmp_path / "run" / "summary.json").is_file()
    assert summary["artifacts"]["template_library"] == "library"
    assert (tmp_path / "run" / "library" / "library.json").is_file()


def test_finetuning_a_weightless_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="model.mode=head"):
        TemplateRetriever(encoder="hashing", mode="finetune")
