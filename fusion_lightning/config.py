"""Recipe discovery and Hydra composition, with one-line errors instead of tracebacks.

All configuration lives under `recipes/` (the Hydra config root): the primary config `fit.yaml`,
the recipes as the config group `recipe/` (package `_global_`: a recipe holds only what differs
from `fit.yaml`), and the groups `data/`, `datamodule/`, `selection/`, `model/`, `student/`,
`trainer/`, `strategy/`, `logger/`, `callbacks/`, `cluster/`, `debug/` and `templates/`. The `fit`
command is a `@hydra.main` application over `fit.yaml`; `compose_recipe` composes the same config
for code and tests. Wheels carry a copy of `recipes/` inside the package (`_configs/`).
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fusion_lightning.data import source as _source  # noqa: F401  registers the data/base schema with Hydra


class ConfigError(ValueError):
    """A recipe or override problem, phrased as one line that names the valid choices."""


def run_dir_for(run_dir: str | None, runs_root: str, recipe: str) -> str:
    """hydra.run.dir: `run_dir` when given, else <runs_root>/<recipe>/<timestamp> (a suffix keeps runs
    started in the same second apart). Cached per arguments, so one process resolves it once."""
    if run_dir not in (None, "", "None", "null"):
        return str(run_dir)
    base = Path(str(runs_root)) / str(recipe) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}_{i}"), i + 1
    return str(path)


if not OmegaConf.has_resolver("fl_run_dir"):
    OmegaConf.register_new_resolver("fl_run_dir", run_dir_for, use_cache=True)


def config_root() -> Path:
    """The folder holding `recipes/`: $FUSION_LIGHTNING_CONFIG_ROOT, the source tree, or the wheel copy."""
    env = os.environ.get("FUSION_LIGHTNING_CONFIG_ROOT")
    if env:
        return Path(env).resolve()
    src = Path(__file__).resolve().parent.parent
    if (src / "recipes" / "fit.yaml").is_file():
        return src
    return Path(__file__).resolve().parent / "_configs"


def recipes_dir() -> Path:
    return config_root() / "recipes"


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description."""
    out = {}
    for p in sorted((recipes_dir() / "recipe").glob("*.yaml")):
        try:
            desc = (yaml.safe_load(p.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(unreadable YAML)"
        out[p.stem] = " ".join(str(desc).split())
    return out


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml") if p.stem != "base")


def _keys_at(config_name: str, base: list[str], dotted: str) -> list[str]:
    """Keys of the node `dotted` in the config composed with only `base` overrides (for error messages)."""
    try:
        node = compose_config(config_name, base)
        for part in [p for p in dotted.split(".") if p]:
            node = node[part]
        return sorted(node.keys())
    except Exception:  # noqa: BLE001 - best effort: the message is still useful without the list
        return []


def one_line(e: Exception, config_name: str = "fit", base: list[str] | None = None) -> str:
    """A Hydra / OmegaConf composition error as one line naming the valid keys or choices (of
    `config_name` composed with the `base` overrides, e.g. the recipe choice)."""
    msg = str(e).strip()
    cause = str(e.__cause__ or "").strip()
    if msg.startswith("Error merging override") and cause:  # a value of the wrong type, e.g. val_fraction=abc
        return f"{msg.removeprefix('Error merging override ')}: {cause.splitlines()[0]}"
    m = re.search(r"Could not override '([\w.]+)'", msg)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        keys = _keys_at(config_name, base or [], parent)
        where = f"under {parent!r}" if parent else "at the top level"
        return (f"unknown config key {key!r} (use +{key}=... to add a new key)"
                + (f"; valid keys {where}: {', '.join(keys)}" if keys else ""))
    m = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", msg)
    if m and (recipes_dir() / m.group(1)).is_dir():
        group, name = m.group(1), m.group(2)
        return f"unknown {group} {name!r}; choose from: {', '.join(group_options(group))}"
    return msg.splitlines()[0] if msg else type(e).__name__


def compose_config(config_name: str, overrides: list[str] | tuple[str, ...] = (),
                   base: list[str] | None = None) -> DictConfig:
    """Compose `recipes/<config_name>.yaml` with Hydra overrides (the hydra node resolved and dropped);
    ConfigError on any problem. The one composer behind `fit`, `templates build` and the tests."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves as in a @hydra.main app
            run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(one_line(e, config_name, base)) from None
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        del cfg["hydra"]
        if "run_dir" in cfg:
            cfg.run_dir = run_dir
    OmegaConf.set_struct(cfg, True)
    return cfg


def compose_recipe(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `python -m fusion_lightning.fit recipe=RECIPE OVERRIDES...` runs, with `recipe` set to
    its name and `run_dir` to its run dir (given, or <runs_root>/<recipe>/<timestamp>)."""
    recipes = list_recipes()
    if recipe not in recipes:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from: {', '.join(recipes) or '(none found)'}")
    cfg = compose_config("fit", [f"recipe={recipe}", *overrides], base=[f"recipe={recipe}"])
    with open_dict(cfg):
        cfg.recipe = recipe
    return cfg
