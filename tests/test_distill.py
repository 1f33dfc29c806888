"""Model level: top-k selection, response-only SFT labels, packing, LoRA student, distill_top_k recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.readers.common import SourceData, canonical_table
from fusion_lightning.data.schema import ModelCatalog, ModelInfo
from fusion_lightning.data.select import SelectionConfig, select_responses
from fusion_lightning.fit import fit
from fusion_lightning.model.sft import (
    IGNORE,
    PLAIN_PROMPT,
    LengthGroupedSampler,
    TruncationStats,
    collate,
    pack,
    tokenize_example,
)
from fusion_lightning.model.student import Student
from fusion_lightning.zoo import resolve

# query -> rows of (model, response, performance, judge, cost)
LOG = {
    "q1": [("a", "ans a", 1.0, 0.6, 3.0), ("b", "ans b", 1.0, 1.0, 5.0), ("c", "ans c", 1.0, 1.0, 1.0),
           ("d", "wrong d", 0.0, 0.0, 0.1)],
    "q2": [("a", "wrong", 0.0, 0.0, 1.0), ("b", "wrong too", 0.0, 0.0, 1.0), ("c", None, 1.0, 1.0, 1.0),
           ("d", "nope", 0.0, 0.0, 1.0)],  # c answered right but its response is missing
    "q3": [("a", "same", 1.0, 0.8, 1.0), ("b", " same ", 1.0, 0.8, 2.0), ("c", "partly", 0.5, 0.3, 1.0),
           ("d", "zero", 0.0, 0.0, 1.0)],
}


def _logs():
    cols: dict[str, list] = {k: [] for k in ("query", "task", "model", "response", "performance", "judge", "cost",
                                            "ground_truth", "split", "_file", "_row")}
    for q, rows in LOG.items():
        for m, r, p, j, c in rows:
            for k, v in zip(("query", "task", "model", "response", "performance", "judge", "cost", "ground_truth",
                             "split", "_file", "_row"), (q, "t", m, r, p, j, c, f"gold {q}", "train", "mem", 1),
                            strict=True):
                cols[k].append(v)
    cat = ModelCatalog({m: ModelInfo(m) for m in "abcd"})
    return load_logs("mem", source=SourceData(canonical_table(cols), cat), split="files", val_fraction=0)


def _picked(cfg: SelectionConfig) -> dict[str, list[str]]:
    examples, _ = select_responses(_logs(), cfg)
    out: dict[str, list[str]] = {}
    for e in examples:
        out.setdefault(e.query, []).append(e.source)
    return out


def test_selection_strategies_rank_ties_and_stop_at_wrong_answers() -> None:
    # performance ties on q1 -> shorter (equal) -> cheaper: c (1.0) before a (3.0) before b (5.0)
    assert _picked(SelectionConfig("performance", k=5))["q1"] == ["c", "a", "b"]
    assert _picked(SelectionConfig("judge", k=2))["q1"] == ["c", "b"]  # judge 1.0 twice: cheaper first
    assert _picked(SelectionConfig("hybrid", k=5))["q1"] == ["c", "b", "a"]
    assert _picked(SelectionConfig("cost_aware", k=1, lam=0.5))["q1"] == ["c"]
    # q2: all logged responses wrong (the right one has no text) -> nothing; q3: duplicate answer dropped
    picked = _picked(SelectionConfig("performance", k=5))
    assert "q2" not in picked and picked["q3"] == ["a", "c"]
    assert _picked(SelectionConfig("performance", k=5, dedupe=False))["q3"] == ["a", "b", "c"]
    assert _picked(SelectionConfig("performance", k=5, stop_at_zero=False))["q2"] == ["d", "a", "b"]  # shorter first


def test_selection_pool_gold_min_judge_and_report() -> None:
    assert _picked(SelectionConfig("performance", k=5, pool=["a", "d"])) == {"q1": ["a"], "q3": ["a"]}
    with pytest.raises(ValueError, match="not in the log"):
        _picked(SelectionConfig(pool=["zz"]))
    examples, report = select_responses(_logs(), SelectionConfig("hybrid", k=1, include_gold=True))
    gold = [e for e in examples if e.source == "gold"]
    assert len(gold) == 3 and gold[0].response.startswith("gold ")
    assert report.no_usable_response == 0 and report.per_source["gold"] == 3
    _, report = select_responses(_logs(), SelectionConfig("hybrid", k=5, min_judge=0.9))
    assert report.examples == 2 and report.no_usable_response == 2 and report.no_usable_by_task == {"t": 2}
    with pytest.raises(ValueError, match="choose from"):
        select_responses(_logs(), SelectionConfig("best"))


@pytest.fixture(scope="module")
def tiny() -> tuple[str, object]:
    path = resolve("tiny-llama")
    return path, AutoTokenizer.from_pretrained(path)


def test_only_response_tokens_are_supervised_with_chat_and_plain_formats(tiny) -> None:
    path, tok = tiny
    stats = TruncationStats()
    ex = tokenize_example(tok, "What is 2+2?", "#### 4", 128, stats)
    sup = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    assert tok.decode(sup) == "#### 4<|end|>\n"
    assert tok.decode(ex.input_ids[:len(ex.input_ids) - len(sup)]).endswith("<|assistant|>\n")
    plain = AutoTokenizer.from_pretrained(path)
    plain.chat_template = None
    ex = tokenize_example(plain, "What is 2+2?", "#### 4", 128, stats)
    sup = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    assert plain.decode(sup) == "#### 4<|end|>"
    assert plain.decode(ex.input_ids).startswith(PLAIN_PROMPT.format(query="What is 2+2?"))
    assert stats.examples == 2 and stats.response_truncated == stats.prompt_truncated == 0


def test_truncation_keeps_supervised_tokens_and_is_counted(tiny) -> None:
    _, tok = tiny
    stats = TruncationStats()
    long_q, long_a = "word " * 200, "answer " * 200
    ex = tokenize_example(tok, long_q, long_a, 64, stats)
    assert len(ex.input_ids) == 64 and ex.supervised >= 32
    assert stats.response_truncated == 1 and stats.prompt_truncated == 1
    masked = [ex.__class__([1, 2, 3], [IGNORE] * 3)]
    with pytest.raises(ValueError, match="no supervised token"):
        collate([masked], pad_id=0)


def test_packed_examples_do_not_attend_to_each_other(tiny) -> None:
    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    stats = TruncationStats()
    exs = [tokenize_example(tok, f"question {i} " * (i + 1), f"answer {i} " * (2 + i), 128, stats) for i in range(3)]
    packed = pack(exs, 128)
    assert len(packed) == 1  # all three fit in one sequence
    with torch.no_grad():
        batch = collate(packed, tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]
        start = 0
        for e in packed[0]:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(logits[start:start + len(e.input_ids)], alone, atol=1e-4, rtol=1e-4)
            start += len(e.input_ids)


def test_per_example_packed_attention_matches_the_dense_block_mask(tiny) -> None:
    """The Student's `sdpa_packed` path (one causal SDPA per example) gives the dense block-diagonal
    mask's loss and gradients, and never spans examples."""
    path, tok = tiny
    stats = TruncationStats()
    exs = [tokenize_example(tok, f"question {i} " * (i + 1), f"answer {i} " * (2 + 3 * i), 96, stats)
           for i in range(5)]
    packed = pack(exs, 96)
    assert len(packed) >= 2 and any(len(seq) > 1 for seq in packed)
    batch = collate(packed, tok.pad_token_id)
    assert batch["attention_mask"].ndim == 4
    torch.manual_seed(0)
    student = Student(str(path)).eval()  # "sdpa" loads as sdpa_packed
    assert student.model.config._attn_implementation == "sdpa_packed"
    dense = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    dense.load_state_dict(student.model.state_dict())
    out_p, out_d = student(**batch), dense(**batch)
    sup = batch["labels"] != IGNORE
    torch.testing.assert_close(out_p.logits[sup], out_d.logits[sup], atol=1e-4, rtol=1e-4)
    out_p.loss.backward()
    out_d.loss.backward()
    g_p = dict(student.model.named_parameters())
    for n, p in dense.named_parameters():
        torch.testing.assert_close(g_p[n].grad, p.grad, atol=1e-4, rtol=1e-3)


def test_length_grouping_reduces_padding() -> None:
    lengths = [int(x) for x in torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=0)
    batches = list(iter(sampler))
    assert sorted(i for b in batches for i in b) == list(range(400)) and len(batches) == len(sampler)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    naive = [list(range(i, min(i + 8, 400))) for i in range(0, 400, 8)]
    assert padding(batches) < 0.2 * padding(naive)


def test_lora_student_learns_and_checkpoints_only_adapters(tiny, tmp_path: Path) -> None:
    path, tok = tiny
    student = Student(path, lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, lr=1e-2)
    stats = TruncationStats()
    batch = collate([[tokenize_example(tok, "What is 2+2?", "#### 4", 64, stats)]] * 4, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    first = student._loss(batch).item()
    for _ in range(25):
        opt.zero_grad()
        student._loss(batch).backward()
        opt.step()
    assert student._loss(batch).item() < first - 1.5  # memorising one answer: a clear drop within 25 steps
    ckpt: dict = {"state_dict": student.state_dict()}
    student.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert set(ckpt["state_dict"]) == student.trainable_names()
    with pytest.raises(ValueError, match="adapter weight"):
        Student(path, lora={"r": 4, "target_modules": "all-linear"}).on_load_checkpoint({"state_dict": {}})


def test_student_trains_in_train_mode_so_dropout_and_checkpointing_apply(tiny) -> None:
    # from_pretrained hands back an eval-mode model and Lightning keeps module modes as it finds them
    path, tok = tiny
    student = Student(path, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.5, "target_modules": "all-linear"},
                      gradient_checkpointing=True)
    assert all(m.training for m in student.modules())
    batch = collate([[tokenize_example(tok, "What is 2+2?", "#### 4", 64, TruncationStats())]] * 2, tok.pad_token_id)
    torch.manual_seed(0)
    for name, p in student.named_parameters():
        if "lora_B" in name:  # LoRA's B starts at zero, which would hide dropout on its input
            torch.nn.init.normal_(p, std=0.5)
    assert student._loss(batch).item() != student._loss(batch).item()  # LoRA dropout is live
    student.eval()
    assert student._loss(batch).item() == student._loss(batch).item()


def test_distill_top_k_recipe_end_to_end(tmp_path: Path) -> None:
    cfg = compose_recipe("distill_top_k", ["data.synthetic.n_queries=120", "data.synthetic.models=4",
                                           "trainer.max_epochs=2", "model.lr=5e-3", f"run_dir={tmp_path}",
                                           "datamodule.max_length=128", "logger=none",
                                           "callbacks.student_eval.max_queries=6",
                                           "callbacks.student_eval.max_new_tokens=24"])
    summary = fit(cfg)
    d, m = summary["data"], summary["metrics"]
    # generation-based evaluation: student vs base zero-shot, per task, scored by the task scorers
    assert 0 <= m["test/student/perf"] <= 1 and 0 <= m["test/base/perf"] <= 1
    assert any(k.startswith("test/student/perf/") for k in m)
    table = (tmp_path / summary["artifacts"]["student_eval_md"]).read_text()
    assert table.startswith("| task | queries | base (zero-shot) | student |") and "| all | 6 |" in table
    assert d["train_examples"] > 0 and d["train_supervised_tokens"] > 0
    assert m["test/loss"] < 6.0  # well below the untrained tiny model's ~6.9 (ln 1024)
    ckpt = torch.load(tmp_path / summary["artifacts"]["best_checkpoint"], map_location="cpu", weights_only=True)
    assert all("lora_" in k for k in ckpt["state_dict"])
    assert (tmp_path / summary["artifacts"]["selection_report"]).exists()


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    summary = fit(compose_recipe("distill_top_k", ["data.synthetic.n_queries=60", "data.synthetic.models=3",
                                                   "trainer.max_epochs=1", "model.lr=5e-3", f"run_dir={tmp}",
                                                   "datamodule.max_length=96", "logger=none",
                                                   "callbacks.student_eval=null"]))
    return tmp / summary["artifacts"]["best_checkpoint"]


def _logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_export_merged_and_adapter_reload_with_the_same_logits(lora_ckpt: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from fusion_lightning.export import main as export_main

    ckpt = torch.load(lora_ckpt, map_location="cpu", weights_only=True)
    student = Student(**ckpt["hyper_parameters"])
    student.load_state_dict(ckpt["state_dict"], strict=False)
    ids = torch.tensor([[4, 205, 885, 286, 285, 381, 17, 24]])
    want = _logits_of(student.model, ids)
    assert export_main([f"ckpt={lora_ckpt}", f"out={tmp_path / 'merged'}", "merge=true"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits_of(merged, ids), want, atol=1e-4, rtol=1e-4)
    # the previous release's spelling (a bare --merge switch) exports the same merged model
    assert export_main(["--ckpt", str(lora_ckpt), "--out", str(tmp_path / "merged_old"), "--merge"]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_old")
    torch.testing.assert_close(_logits_of(again, ids), _logits_of(merged, ids), atol=0, rtol=0)
    assert export_main([f"ckpt={lora_ckpt}", f"out={tmp_path / 'split'}"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "split")
    adapted = PeftModel.from_pretrained(base, tmp_path / "split" / "adapter")
    torch.testing.assert_close(_logits_of(adapted, ids), want, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template


def test_resume_from_last_checkpoint_reaches_the_same_final_loss(tmp_path: Path) -> None:
    base = ["data.synthetic.n_queries=60", "data.synthetic.models=3", "model.lr=5e-3", "datamodule.max_length=96",
            "logger=none", "callbacks.early_stopping=null", "trainer.max_epochs=3", "callbacks.student_eval=null"]
    full = fit(compose_recipe("distill_top_k", [*base, f"run_dir={tmp_path / 'full'}"]))
    # interrupted after the first epoch (the schedule still plans 3 epochs), then resumed from last.ckpt
    fit(compose_recipe("distill_top_k", [*base, f"run_dir={tmp_path / 'part'}",
                                         "+callbacks.stop._target_=interrupt.StopAfterEpoch"]))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = fit(compose_recipe("distill_top_k", [*base, f"run_dir={tmp_path / 'part'}", f"ckpt_path={last}"]))
    assert resumed["metrics"]["test/loss"] == pytest.approx(full["metrics"]["test/loss"], rel=1e-5)
    assert resumed["metrics"]["train/loss"] == pytest.approx(full["metrics"]["train/loss"], rel=1e-5)
