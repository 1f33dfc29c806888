"""The cache folder (fusion_lightning/cache.py): `$FUSION_LIGHTNING_CACHE`, else `$XDG_CACHE_HOME/fusion_lightning`,
else `~/.cache/fusion_lightning`; the same from any working directory, in Python and in the recipes; one reader."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fusion_lightning.cache import cache_root
from fusion_lightning.config import compose_config, compose_recipe

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusion_lightning"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cache variable, no XDG_CACHE_HOME and a temporary home: the bottom of the rule, never the real ~/.cache."""
    monkeypatch.delenv("FUSION_LIGHTNING_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_variable_then_xdg_then_home(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_root() == home / ".cache" / "fusion_lightning"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fusion_lightning"
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"  # the variable wins over XDG
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", "~/fl")
    assert cache_root() == home / "fl"  # ~ expanded
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", "")  # empty: unset
    assert cache_root() == tmp_path / "xdg" / "fusion_lightning"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec: a relative path is ignored
    assert cache_root() == home / ".cache" / "fusion_lightning"


def test_a_relative_variable_is_made_absolute_where_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", "c")
    assert cache_root() == tmp_path / "c" and cache_root().is_absolute()


def _cache_keys(cfg) -> dict[str, str]:
    """The recipe keys that name cache folders, resolved now (in the current working directory)."""
    return {"embedding_cache": cfg.datamodule.embedding_cache, "out": cfg.get("out", "")}


def test_a_recipe_resolves_the_same_root_from_any_working_directory(home: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    want = str(home / ".cache" / "fusion_lightning" / "embeddings")
    monkeypatch.chdir(ROOT)
    at_root = compose_recipe("router_mlp").datamodule.embedding_cache
    embed_at_root = compose_recipe("embed").out
    elsewhere = tmp_path / "job"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert compose_recipe("router_mlp").datamodule.embedding_cache == at_root == want
    assert compose_recipe("router_cascade").datamodule.embedding_cache == want
    assert compose_recipe("embed").out == compose_recipe("layer_probe").out == embed_at_root == want
    backend = compose_config("templates", ["backend=openai_compatible", "backend.model=m"]).backend
    assert backend.cache_dir == str(home / ".cache" / "fusion_lightning" / "generations")
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", str(tmp_path / "mine"))  # read at each composition
    assert compose_recipe("router_mlp").datamodule.embedding_cache == str(tmp_path / "mine" / "embeddings")
    assert OmegaConf.create({"x": "${fl_cache:}"}).x == str(tmp_path / "mine")


def test_every_cache_in_the_package_lives_under_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fusion_lightning import zoo
    from fusion_lightning.data.onnx_encoder import onnx_cache_root
    from fusion_lightning.data.prefill_encoder import probe_pick_path
    from fusion_lightning.serving.openai_http import OpenAICompatibleBackend

    root = tmp_path / "root"
    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", str(root))
    assert zoo.cache_dir("tiny-llama") == root / "students" / "tiny-llama"
    assert onnx_cache_root() == root / "onnx"
    assert probe_pick_path("some-model").parent.parent == root / "layer_probe"
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", progress=False)
    assert Path(backend.cache.root) == root / "generations"
    assert OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", cache_dir=None).cache is None


def test_help_says_where_the_cache_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fusion_lightning.cli import usage

    monkeypatch.setenv("FUSION_LIGHTNING_CACHE", str(tmp_path / "c"))
    text = usage()
    assert f"cache: {tmp_path / 'c'}" in text and "$XDG_CACHE_HOME/fusion_lightning" in text


def test_an_old_cwd_cache_is_named_not_silently_ignored(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "old" / ".cache" / "fusion_lightning").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="fusion_lightning.cache"):
        cache_root()
        cache_root()
    hints = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(hints) == 1 and str(tmp_path / "old" / ".cache" / "fusion_lightning") in hints[0]  # once


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def test_only_the_cache_module_reads_the_variable_or_knows_the_default() -> None:
    """A string in code (docstrings aside) naming the variable, XDG_CACHE_HOME or the old cwd-relative default is
    a second rule in the making; recipes use `${fl_cache:...}`."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "cache.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and any(
                    s in n.value for s in ("FUSION_LIGHTNING_CACHE", "XDG_CACHE_HOME", ".cache/fusion_lightning")):
                offenders.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        if "FUSION_LIGHTNING_CACHE" in text or ".cache/fusion_lightning" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
