"""`key=value` command lines for the non-training commands (collect, serve, evaluate).

The same grammar as `fit` (Hydra's override parser: `backends=[{type:local,model:DIR}]`,
`judge={type:openai_compatible,...}`, dotted keys `data.path=DIR`), checked against the command's
defaults so a typo is a one-line error listing the valid keys. `config=FILE.yaml` loads a base
config first; the keys a command names in `file_keys` read a `.yaml`/`.json` file given as their
value; `data=NAME` picks a log source from the `data` config group exactly as recipes do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from fusion_lightning.config import ConfigError, compose_config, group_options


def data_group(name: str) -> dict[str, Any]:
    """The `data` config group entry NAME, resolved, exactly as recipes compose it."""
    if name not in group_options("data"):
        raise ConfigError(f"unknown data {name!r}; choose from: {', '.join(group_options('data'))}")
    return OmegaConf.to_container(compose_config("data_only", [f"data={name}"]).data, resolve=True)


def _load_file(path: str, key: str) -> Any:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
        return json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{key}={path}: cannot read {p}: {e}") from None


def _is_file_name(v: Any) -> bool:
    return isinstance(v, str) and v.lower().endswith((".yaml", ".yml", ".json"))


def parse_args(argv: list[str], defaults: dict[str, Any], file_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """`key=value` overrides over `defaults` -> a plain dict; ConfigError (one line) on any problem.

    Keys whose default is a dict accept new sub-keys (free-form sections like `data`); every other
    unknown key is an error. A `file_keys` key given a .yaml/.json file name gets that file's content.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    cfg = copy.deepcopy(defaults)
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if a])
    except HydraException as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    pairs = [(o.key_or_group.lstrip("+"), o.value()) for o in overrides]
    for key, value in [p for p in pairs if p[0] == "config"]:
        base = _load_file(str(value), key)
        if not isinstance(base, dict):
            raise ConfigError(f"config={value}: expected a mapping of keys at the top level")
        pairs = [(k, v) for k, v in base.items()] + pairs
    # a group pick (data=NAME) comes before its keys (data.path=...), whatever the argument order
    pairs.sort(key=lambda kv: 0 if kv[0] == "data" and isinstance(kv[1], str) and not _is_file_name(kv[1]) else 1)
    for key, value in pairs:
        if key == "config":
            continue
        head, *rest = key.split(".")
        if head not in cfg:
            raise ConfigError(f"unknown key {head!r}; valid keys: {', '.join(sorted(cfg))}")
        if head == "data" and not rest and isinstance(value, str) and not _is_file_name(value):
            cfg["data"] = {**data_group(value)}  # data=NAME picks a source
            continue
        if key in file_keys and _is_file_name(value):
            value = _load_file(value, key)
        if not rest:
            cfg[head] = value
            continue
        node = cfg[head]
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {head!r} is not a section (it holds {node!r})")
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = value
    return cfg
