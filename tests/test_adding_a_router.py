"""docs/adding.md, followed as written: a router is its class and its model YAML (plus tests). The class and
YAML below are the page's own code blocks; the recipe, the bench rows, the config tables and `fit --help`
must follow without touching anything else."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
from pathlib import Path

import pytest
from planted import planted_overrides

from fusion_lightning.config import compose_recipe, list_recipes, recipes_dir, router_names
from fusion_lightning.fit import fit
from fusion_lightning.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "adding.md").read_text(encoding="utf-8")


def _block(lang: str, contains: str) -> str:
    """The page's fenced `lang` block that contains `contains`."""
    for body in re.findall(rf"```{lang}\n(.*?)```", PAGE, re.S):
        if contains in body:
            return body
    raise AssertionError(f"docs/adding.md has no ```{lang} block with {contains!r}")


@pytest.fixture
def toy_root(tmp_path: Path, monkeypatch) -> Path:
    """A copy of recipes/ with the page's router added: the class file and the model YAML, nothing else."""
    root = tmp_path / "root"
    shutil.copytree(recipes_dir(), root / "recipes")
    pkg = tmp_path / "pkg" / "fusion_lightning_toy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "linear.py").write_text(_block("python", "class LinearRouter"))
    yaml_text = _block("yaml", "LinearRouter").replace("fusion_lightning.query.routers.linear", "fusion_lightning_toy.linear")
    (root / "recipes" / "model" / "router_linear.yaml").write_text(yaml_text)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("FUSION_LIGHTNING_CONFIG_ROOT", str(root))
    return root


def test_the_page_says_where_the_class_goes():
    assert "_target_: fusion_lightning.query.routers.linear.LinearRouter" in _block("yaml", "LinearRouter")
    assert "fusion_lightning/query/routers/" in PAGE


def test_a_router_is_its_class_and_its_yaml(toy_root: Path, tmp_path: Path, capsys) -> None:
    added = {p.relative_to(toy_root).as_posix() for p in (toy_root / "recipes").rglob("*")} - {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*")}
    assert added == {"recipes/model/router_linear.yaml"}  # no recipe file, no list edited
    assert "linear" in router_names()
    desc = list_recipes()["router_linear"]
    assert desc.startswith("Query-level fusion - A linear router")
    assert fit_main(["--help"]) == 0 and "router_linear" in capsys.readouterr().out
    # the bench rows and the docs tables come from the same registry
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        report = importlib.reload(importlib.import_module("_routers_report"))
        assert "linear" in report.ROUTER_ORDER
    finally:
        sys.path.remove(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("gen_config_tables", ROOT / "docs" / "gen_config_tables.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert "| `router_linear` | `router_linear` |" in gen.config_tables()
    # and it trains through the derived recipe: the page's test, as written there
    m = fit(compose_recipe("router_linear", planted_overrides(
        tmp_path, "trainer.max_epochs=15", "model.lr=0.01", "callbacks=none", "logger=none")))["metrics"]
    assert m["test/perf"] >= m["test/best_single/perf"] + 0.1, m
