"""The documentation agrees with the code: the config tables are those of `recipes/`, the pages name only recipes
and config options that exist, the README draft's links resolve, and the site builds with `mkdocs build --strict`
(a broken link, a page missing from the nav or a docstring warning fails it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_lightning.config import group_options, list_recipes, recipes_dir, router_names

pytestmark = pytest.mark.integration  # starts processes or servers (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the short README: the draft until it replaces README.md, then README.md itself
README_DRAFT = DOCS / "README_draft.md" if (DOCS / "README_draft.md").exists() else ROOT / "README.md"
EXAMPLES = {"router_linear", "myformat"}  # the names the "adding a router / a reader" page makes up


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_tables", DOCS / "gen_config_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str, heading: str) -> list[str]:
    """The first cells of the table under `heading` (Markdown), backticks stripped."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            rows.append(line.split("|")[1].strip().strip("`"))
    return rows


def test_config_tables_list_exactly_the_recipes_and_options_of_recipes_dir():
    gen = _generator()
    text = gen.config_tables()
    recipes = list_recipes()
    derived = {f"router_{n}" for n in router_names()}  # a router YAML without a recipe file gets one
    assert set(recipes) == {p.stem for p in (recipes_dir() / "recipe").glob("*.yaml")} | derived
    assert _rows(text, "## Recipes") == sorted(recipes)
    for name, desc in recipes.items():
        assert f"| `{name}` |" in text and gen.cell(desc) in text, name
    groups = gen.groups(recipes_dir())
    assert {"data", "model", "datamodule", "trainer", "strategy", "logger", "callbacks"} <= set(groups)
    table = text.split("## Config groups", 1)[1].split("###", 1)[0]
    assert re.findall(r"^\| \[`(\w+)`\]", table, re.M) == groups
    for g in groups:  # a group fit.yaml picks from other choices (debug_recipe) lists bare option names
        auto = f"Not set by hand: `recipes/fit.yaml` applies `{g}/" in text
        assert _rows(text, f"### {g}\n") == [o if auto else f"{g}={o}" for o in group_options(g)], g
    assert "Not set by hand: `recipes/fit.yaml` applies `debug_recipe/${debug}_${recipe}.yaml`" in text


def test_the_config_page_is_generated_at_build_time():
    """No hand-kept copy to drift: the hook writes reference/config.md; a copy in docs/ must equal the generated one."""
    hooks = (DOCS / "hooks.py").read_text(encoding="utf-8")
    assert "config_tables()" in hooks and "hooks.py" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    committed = DOCS / "reference" / "config.md"
    if committed.exists():
        assert committed.read_text(encoding="utf-8") == _generator().config_tables()


GROUP_PICK = re.compile(r"(?<![\w.\-/])\+?(?P<group>[a-z_]+)=(?P<value>[a-z][a-z0-9_]*(?:\|[a-z][a-z0-9_]*)*)")


def test_pages_name_only_recipes_and_options_that_exist():
    """`recipe=NAME` and `GROUP=OPTION` in the hand-written pages (and the README draft) must exist in recipes/:
    the README's hand-kept config table drifted from the tree before the docs existed."""
    choices = {"recipe": set(list_recipes())}
    choices.update({p.name: set(group_options(p.name)) for p in recipes_dir().iterdir() if p.is_dir()})
    pages = sorted(DOCS.rglob("*.md"))
    assert len(pages) > 20
    wrong = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in GROUP_PICK.finditer(text):
            group = m.group("group")
            if group not in choices:
                continue
            for value in m.group("value").split("|"):
                if value not in choices[group] and value not in EXAMPLES:
                    wrong.append(f"{page.relative_to(ROOT)}: {group}={value} (choose from: "
                                 f"{', '.join(sorted(choices[group]))})")
    assert not wrong, "pages name recipes or config options that recipes/ lacks:\n  " + "\n  ".join(wrong)


def test_readme_draft_is_short_and_its_links_resolve_from_the_repository_root():
    """docs/README_draft.md becomes README.md: its relative links are read from the repository root, and its
    Quickstart is the Getting started page's."""
    text = README_DRAFT.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) > 20
    missing = [link for link in links if not link.startswith(("http://", "https://", "#"))
               and not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, missing
    quickstart = re.compile(r"^## [^\n]*Quickstart.*?```bash\n(.*?)```", re.S | re.M)
    getting_started = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    assert quickstart.search(text).group(1) == quickstart.search(getting_started).group(1)


def test_the_site_builds_with_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]'): the site build is not checked")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    config_page = (tmp_path / "site" / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    for name in list_recipes():
        assert f"<code>{name}</code>" in config_page, name
    assert not (tmp_path / "site" / "README_draft").exists() and not (tmp_path / "site" / "hooks.py").exists()
