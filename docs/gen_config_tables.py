"""The docs' config tables, generated from the config tree `recipes/` (never written by hand).

    python docs/gen_config_tables.py            # print docs/reference/config.md's content
    python docs/gen_config_tables.py --out F    # write it to F

The MkDocs hook (`docs/hooks.py`) puts this text at `reference/config.md` on every build, so the site's
tables are always those of the recipes/ it was built from; `tests/test_docs.py` checks them against
`fusion_lightning.config.list_recipes()` and `group_options()`. A recipe's row comes from its file's
`description:` and `override /model:` / `override /datamodule:` defaults; an option's line is the first
sentence of the comment its YAML file opens with.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

# the primary configs: one per key=value command
PRIMARY = ("fit", "templates", "collect", "serve", "evaluate", "route", "export", "compare", "submit")


def _config():
    """fusion_lightning.config, importable from a checkout without an install too."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import fusion_lightning.config as config

    return config


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipes, no raw HTML)."""
    text = " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("[", "\\[").replace("]", "\\]")


def describe(path: Path) -> str:
    """An option's line: the first sentence of its opening comment, else the class it instantiates."""
    text = first_sentence(_config().opening_comment(path))
    if text:
        return cell(text)
    node = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    targets = sorted(set(_targets(node)))
    if targets:
        return ", ".join(f"`{t}`" for t in targets)
    scalars = [f"`{k}: {str(v).lower() if isinstance(v, bool) else v}`" for k, v in node.items()
               if k != "defaults" and not isinstance(v, (dict, list))]
    return ", ".join(scalars) or "—"


def _targets(node: object) -> list[str]:
    """Every `_target_` in a YAML tree (the classes an option instantiates)."""
    if isinstance(node, dict):
        found = [str(node["_target_"])] if node.get("_target_") else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (one followed by a capital or the end)."""
    m = re.search(r"[.!?](?=\s+[A-Z`(]|$)", text)
    return text[: m.end()] if m else text


def fit_defaults(recipes: Path) -> dict[str, str]:
    """Group -> the option fit.yaml's defaults list picks (`???` where a choice is required)."""
    out = {}
    for entry in yaml.safe_load((recipes / "fit.yaml").read_text(encoding="utf-8")).get("defaults") or []:
        if isinstance(entry, dict):
            for k, v in entry.items():  # `optional GROUP: ...` too
                out[str(k).removeprefix("optional").strip()] = "null" if v is None else str(v)
    return out


def recipe_picks(path: Path, defaults: dict[str, str]) -> dict[str, str]:
    """The model and datamodule a recipe runs: its `override /GROUP:` entries, else fit.yaml's (a router YAML
    without a recipe file gets the recipe `router_<name>`, whose model is that YAML: config.py)."""
    picks = {g: defaults.get(g, "") for g in ("model", "datamodule")}
    if not path.is_file():
        return {**picks, "model": path.stem}
    for entry in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults") or []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                group = str(k).removeprefix("override").strip().lstrip("/")
                if group in picks:
                    picks[group] = str(v)
    return picks


def groups(recipes: Path) -> list[str]:
    """Every config group folder but `recipe/` (which has its own table)."""
    return sorted(p.name for p in recipes.iterdir() if p.is_dir() and p.name != "recipe" and any(p.glob("*.yaml")))


def config_tables() -> str:
    """The Markdown of docs/reference/config.md."""
    config = _config()
    recipes = config.recipes_dir()
    defaults = fit_defaults(recipes)
    out = [
        "# Config tree",
        "",
        "<!-- Generated from recipes/ by docs/gen_config_tables.py at every docs build: do not edit. -->",
        "",
        "Every run is composed by Hydra from the config tree `recipes/` (see [Running recipes](../recipes.md)). "
        "These tables are generated from that tree when the site is built, so they list exactly what "
        "`recipes/` holds; `python -m fusion_lightning.fit --help` prints the recipes too.",
        "",
        "## Recipes",
        "",
        "`python -m fusion_lightning.fit recipe=NAME`: each file in `recipes/recipe/` (package `_global_`) holds "
        "only what differs from `recipes/fit.yaml`. Model and DataModule are the config-group options the recipe picks.",
        "",
        "| recipe | model | datamodule | what it does |",
        "|---|---|---|---|",
    ]
    descriptions = config.list_recipes()
    for name, desc in descriptions.items():
        picks = recipe_picks(recipes / "recipe" / f"{name}.yaml", defaults)
        out.append(f"| `{name}` | `{picks['model']}` | `{picks['datamodule']}` | {cell(desc)} |")
    out += [
        "",
        "## Config groups",
        "",
        "Pick an option with `GROUP=OPTION` on the command line (`data=llmrouter`, `trainer=gpu`); "
        "`+GROUP=OPTION` adds a group the defaults list lacks (`+cluster=slurm`). "
        "The default is what `recipes/fit.yaml` picks (a recipe may override it).",
        "",
        "| group | folder | default | options |",
        "|---|---|---|---|",
    ]
    names = groups(recipes)
    for g in names:
        opts = ", ".join(f"`{o}`" for o in config.group_options(g))
        default = f"`{defaults[g]}`" if g in defaults else "—"
        out.append(f"| [`{g}`](#{g}) | `recipes/{g}/` | {default} | {opts} |")
    for g in names:
        auto = "${" in defaults.get(g, "")  # picked by fit.yaml from other choices, never on the command line
        out += ["", f"### {g}", ""]
        if auto:
            out += [f"Not set by hand: `recipes/fit.yaml` applies `{g}/{defaults[g]}.yaml` where it exists.", ""]
        out += ["| option | what it is |", "|---|---|"]
        for o in config.group_options(g):
            out.append(f"| `{o if auto else f'{g}={o}'}` | {describe(recipes / g / f'{o}.yaml')} |")
    out += [
        "",
        "## Primary configs",
        "",
        "The `key=value` commands compose these files (`--help` prints each; see "
        "[The key=value commands](../serving/commands.md)).",
        "",
        "| file | command |",
        "|---|---|",
    ]
    for name in PRIMARY:
        path = recipes / f"{name}.yaml"
        if path.is_file():
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("#").strip()
            out.append(f"| `recipes/{name}.yaml` | {cell(first)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the page here instead of printing it")
    args = p.parse_args(argv)
    text = config_tables()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
