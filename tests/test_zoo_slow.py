"""The zoo's real models load and answer (slow: the first run fetches and converts them, ~2 min for
Gemma-3-270M, then they load from the cache in ~10 s each)."""

from __future__ import annotations

import pytest

from fusion_lightning.serving.local import LocalBackend

pytestmark = pytest.mark.slow


def test_gemma_3_270m_is_a_base_model_that_adds() -> None:
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package (pip install gguf)")
    backend = LocalBackend("gemma-3-270m", device="cpu", progress=False)
    assert type(backend.model).__name__ == "Gemma3ForCausalLM" and not backend.has_chat_template
    assert 260e6 < sum(p.numel() for p in backend.model.parameters()) < 275e6
    enc = backend.tokenizer("Question: What is 12 + 7?\nAnswer:", return_tensors="pt")
    out = backend.model.generate(**enc, max_new_tokens=12, do_sample=False)  # a digit is a token
    assert "19" in backend.tokenizer.decode(out[0, enc["input_ids"].shape[1]:])


def test_smollm2_by_its_zoo_name_is_the_instruct_model() -> None:
    pytest.importorskip("gguf", reason="reading the GGUF file needs the gguf package (pip install gguf)")
    backend = LocalBackend("smollm2-135m-instruct", device="cpu", progress=False)
    assert backend.name == "smollm2-135m-instruct" and backend.has_chat_template
    assert 130e6 < sum(p.numel() for p in backend.model.parameters()) < 140e6
    out = backend.generate(["What is 2+2? Answer with a number."], max_new_tokens=24, temperature=0)[0]
    assert "4" in out.text
