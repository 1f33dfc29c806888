"""The offline model zoo: names and aliases resolve to the cache, fetch builds atomically, every loader
(LocalBackend, students) goes through it. A fake cache dir here; real models in test_zoo_slow.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tiny_lm import build_tiny_lm

from fusion_lightning import zoo
from fusion_lightning.serving import build_backend
from fusion_lightning.zoo.__main__ import main as zoo_main


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "students"


def test_names_and_aliases_resolve_to_the_cache_dir(cache: Path) -> None:
    (cache / "gemma-3-270m").mkdir(parents=True)
    (cache / "gemma-3-270m" / "config.json").write_text("{}")
    (cache / "smollm2-135m-instruct").mkdir()
    (cache / "smollm2-135m-instruct" / "config.json").write_text("{}")
    assert zoo.resolve("gemma-3-270m") == str(cache / "gemma-3-270m")
    assert zoo.resolve("smollm2-135m") == zoo.resolve("smollm2-135m-instruct") == str(cache / "smollm2-135m-instruct")
    assert zoo.resolve("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"  # any other name: unchanged
    assert zoo.is_cached("gemma-3-270m") and not zoo.is_cached("tiny-llama")
    with pytest.raises(ValueError, match="not a zoo model"):
        zoo.cache_dir("gpt-5")


def test_a_local_directory_of_the_same_name_wins(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma-3-270m").mkdir()
    assert zoo.resolve("gemma-3-270m") == "gemma-3-270m"


def test_fetch_builds_once_atomically_and_says_so(cache: Path, monkeypatch, capsys) -> None:
    calls = []

    def build(out: Path) -> Path:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    fake = dataclasses.replace(zoo.ZOO["gemma-3-270m"], build=build)
    monkeypatch.setitem(zoo.ZOO, "gemma-3-270m", fake)
    path = zoo.fetch("gemma-3-270m")
    assert path == cache / "gemma-3-270m" and (path / "config.json").exists()
    assert calls[0].name.startswith("gemma-3-270m.tmp")  # built beside, then renamed: never half-built
    assert "zoo: preparing gemma-3-270m" in capsys.readouterr().err
    zoo.fetch("gemma-3-270m")
    assert len(calls) == 1  # cached

    def broken(out: Path) -> Path:
        out.mkdir(parents=True)
        raise RuntimeError("download failed")

    monkeypatch.setitem(zoo.ZOO, "smollm2-135m-instruct", dataclasses.replace(fake, name="smollm2-135m-instruct",
                                                                            build=broken))
    with pytest.raises(RuntimeError, match="download failed"):
        zoo.fetch("smollm2-135m")
    assert not list(cache.glob("smollm2-135m-instruct*"))  # nothing half-built is left


def test_local_backend_loads_a_zoo_name_from_the_cache(cache: Path) -> None:
    build_tiny_lm(cache / "gemma-3-270m")  # a tiny model standing in for the cached conversion
    backend = build_backend({"type": "local", "model": "gemma-3-270m", "device": "cpu", "progress": False})
    assert backend.name == "gemma-3-270m" and backend.model_path == str(cache / "gemma-3-270m")
    assert backend.generate(["What is 2 plus 2?"], max_new_tokens=3)[0].output_tokens > 0


def test_cli_list_and_fetch(cache: Path, capsys) -> None:
    (cache / "gemma-3-270m").mkdir(parents=True)
    (cache / "gemma-3-270m" / "config.json").write_text("{}")
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith(("name", "cache"))}
    assert set(lines) == {"smollm2-135m-instruct", "gemma-3-270m", "tiny-llama"}
    assert " no " in lines["smollm2-135m-instruct"] and "alias smollm2-135m" in lines["smollm2-135m-instruct"]
    assert " 0 MB " in lines["gemma-3-270m"]  # cached (a 2-byte config here)
    assert zoo_main(["fetch", "gemma-3-270m"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "gemma-3-270m")
    assert zoo_main(["fetch", "nope"]) == 1 and "not a zoo model" in capsys.readouterr().err
    assert zoo_main([]) == 2


def test_a_base_model_of_the_zoo_gets_the_completion_format(cache: Path, tmp_path: Path) -> None:
    build_tiny_lm(cache / "gemma-3-270m", chat_template=False)  # gemma is a base model: no chat template
    backend = build_backend({"type": "local", "model": "gemma-3-270m", "device": "cpu", "progress": False})
    assert backend.prompt_format == "completion" and backend.render("2+2?") == "2+2?\n\nAnswer:"
    other = build_backend({"type": "local", "model": str(build_tiny_lm(tmp_path / "x", chat_template=False)),
                           "device": "cpu", "progress": False})
    assert other.prompt_format == "chat"  # not a zoo model: the User/Assistant fallback
    tuned = build_backend({"type": "local", "model": str(tmp_path / "x"), "tokenizer": "gemma-3-270m",
                           "device": "cpu", "progress": False})
    assert tuned.prompt_format == "completion"  # a fine-tuned copy with the zoo model's tokenizer


def test_price_catalog_by_size_with_think_variants(capsys) -> None:
    import json

    cat = zoo.catalog(["smollm2-135m", "gemma-3-270m"])
    assert cat.names == ["smollm2-135m-instruct", "smollm2-135m-instruct_think", "gemma-3-270m", "gemma-3-270m_think"]
    small, big = cat["smollm2-135m-instruct"], cat["gemma-3-270m"]
    assert small.input_price == small.output_price == pytest.approx(0.1345 * zoo.USD_PER_M_TOKENS_PER_B)
    assert big.output_price / small.output_price == pytest.approx(268 / 134.5)
    assert cat["gemma-3-270m_think"].base_model == "gemma-3-270m"
    assert small.call_cost(1_000_000, 0) == pytest.approx(small.input_price)  # USD per million tokens
    assert zoo_main(["catalog", "tiny-llama"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"tiny-llama", "tiny-llama_think"}
    assert zoo_main(["catalog", "nope"]) == 1 and "not a zoo model" in capsys.readouterr().err


def test_a_cache_written_with_the_gguf_quantization_config_is_repaired(cache: Path) -> None:
    import json

    # caches from before the fix kept "quant_method: gguf" over fp32 weights: transformers then refused
    # to save a model loaded from them (the exported student)
    (cache / "gemma-3-270m").mkdir(parents=True)
    cfg = {"model_type": "gemma3_text", "quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    (cache / "gemma-3-270m" / "config.json").write_text(json.dumps(cfg))
    assert zoo.fetch("gemma-3-270m") == cache / "gemma-3-270m"
    assert json.loads((cache / "gemma-3-270m" / "config.json").read_text()) == {"model_type": "gemma3_text"}
