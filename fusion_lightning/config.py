"""Recipe discovery and Hydra composition, with one-line errors instead of tracebacks.

Recipes are YAML files in the top-level `recipes/` folder; the config groups `data/`, `model/`,
`trainer/`, `logger/` and `strategy/` live beside them in `recipes/`, and `callbacks/` is its own
top-level folder. Wheels carry a copy of both folders inside the package (`_configs/`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("data", "model", "student", "trainer", "logger", "strategy", "cluster", "callbacks")


class ConfigError(ValueError):
    """A recipe or override problem, phrased as one line that names the valid choices."""


def config_root() -> Path:
    """The folder holding `recipes/` and `callbacks/`: $FUSION_LIGHTNING_CONFIG_ROOT, the source tree, or the wheel copy."""
    env = os.environ.get("FUSION_LIGHTNING_CONFIG_ROOT")
    if env:
        return Path(env).resolve()
    src = Path(__file__).resolve().parent.parent
    if (src / "recipes").is_dir() and (src / "callbacks").is_dir():
        return src
    return Path(__file__).resolve().parent / "_configs"


def recipes_dir() -> Path:
    return config_root() / "recipes"


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description."""
    out = {}
    for p in sorted(recipes_dir().glob("*.yaml")):
        try:
            desc = (yaml.safe_load(p.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(unreadable YAML)"
        out[p.stem] = " ".join(str(desc).split())
    return out


def group_options(group: str) -> list[str]:
    root = config_root()
    folder = root / group if group == "callbacks" else root / "recipes" / group
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")


def _keys_at(recipe: str, dotted: str) -> list[str]:
    """Keys of the node `dotted` in the recipe as composed without overrides (for error messages)."""
    try:
        node = compose_recipe(recipe, ())
        for part in [p for p in dotted.split(".") if p]:
            node = node[part]
        return sorted(node.keys())
    except Exception:  # noqa: BLE001 - best effort: the message is still useful without the list
        return []


def _one_line(e: Exception, recipe: str) -> str:
    msg = str(e).strip()
    m = re.search(r"Could not override '([\w.]+)'", msg)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        keys = _keys_at(recipe, parent)
        where = f"under {parent!r}" if parent else "at the top level"
        return f"unknown config key {key!r} (use +{key}=... to add a new key); valid keys {where}: {', '.join(keys)}"
    m = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", msg)
    if m and m.group(1) in GROUPS:
        group, name = m.group(1), m.group(2)
        return f"unknown {group} {name!r}; choose from: {', '.join(group_options(group))}"
    first = msg.splitlines()[0] if msg else type(e).__name__
    return first


def compose_recipe(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `recipes/<recipe>.yaml` with Hydra overrides; raise ConfigError on any problem."""
    recipes = list_recipes()
    if recipe not in recipes:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from: {', '.join(recipes) or '(none found)'}")
    root = config_root()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root / "recipes"), version_base="1.3"):
            cfg = compose(config_name=recipe,
                          overrides=[*overrides, f"hydra.searchpath=[file://{root}]"],
                          return_hydra_config=False)
    except MissingConfigException as e:
        raise ConfigError(_one_line(e, recipe)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_one_line(e, recipe)) from None
    finally:
        GlobalHydra.instance().clear()
    with_recipe = OmegaConf.to_container(cfg, resolve=False)
    with_recipe["recipe"] = recipe
    cfg = OmegaConf.create(with_recipe)
    OmegaConf.set_struct(cfg, True)
    return cfg
