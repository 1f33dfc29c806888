"""Recipe discovery and Hydra composition, with one-line errors instead of tracebacks.

All configuration lives under `recipes/` (the Hydra config root): the primary config `fit.yaml`,
the recipes as the config group `recipe/` (package `_global_`: a recipe holds only what differs
from `fit.yaml`), and the groups `data/`, `datamodule/`, `selection/`, `model/`, `student/`,
`trainer/`, `strategy/`, `logger/`, `callbacks/`, `cluster/`, `debug/` and `templates/`. The `fit`
command is a `@hydra.main` application over `fit.yaml`; `compose_recipe` composes the same config
for code and tests. The other `key=value` commands compose their own primary configs
(`templates.yaml`, `collect.yaml`, `serve.yaml`, `evaluate.yaml`, `route.yaml`, `export.yaml`,
`compare.yaml`, `submit.yaml`; `compose_command` adds `config=FILE` and file keys; `legacy_flags` reads
the old `--flag` spellings of route, export, compare and submit for one release). Wheels carry a copy
of `recipes/` inside the package (`_configs/`). Two resolvers are registered here, for every
composition: `${fl_run_dir:...}` (the run dir) and `${fl_cache:SUBDIR}` (a folder of the cache,
`fusion_lightning.cache`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fusion_lightning.cache import cache_root
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


def cache_path(sub: str = "") -> str:
    """`${fl_cache:SUBDIR}` in a recipe: `<cache root>/SUBDIR` (fusion_lightning.cache), absolute, so a
    recipe composed in any working directory, a SLURM job's or a notebook's, finds the same cache. Not
    cached: a test or a job that sets `FUSION_LIGHTNING_CACHE` is seen at the next composition."""
    return str(cache_root() / sub) if sub else str(cache_root())


if not OmegaConf.has_resolver("fl_run_dir"):
    OmegaConf.register_new_resolver("fl_run_dir", run_dir_for, use_cache=True)
if not OmegaConf.has_resolver("fl_cache"):
    OmegaConf.register_new_resolver("fl_cache", cache_path)


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


def router_names() -> list[str]:
    """The routers, the one list of them: every `recipes/model/router_<name>.yaml`. Recipes, `bench/routers.py`
    and the docs tables read it, so a router is its class plus that YAML."""
    return [p.stem.removeprefix("router_") for p in sorted((recipes_dir() / "model").glob("router_*.yaml"))]


def opening_comment(path: Path) -> str:
    """The comment block a YAML file opens with (Hydra's `# @package` line skipped), as one line: a config
    option's description (the derived router recipes and the docs' config tables read it)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        s = s.lstrip("#").strip()
        if not s.startswith("@package"):
            lines.append(s)
    return " ".join(" ".join(lines).split())


def _router_recipes() -> dict[str, str]:
    """`router_<name>` for each router YAML without a recipe file of its own -> its description: the recipe
    such a router gets (`model=router_<name>` on `fit.yaml`'s defaults), registered with Hydra's ConfigStore."""
    own = {p.stem for p in (recipes_dir() / "recipe").glob("*.yaml")}
    out = {}
    for name in router_names():
        if f"router_{name}" not in own:
            path = recipes_dir() / "model" / f"router_{name}.yaml"
            out[f"router_{name}"] = f"Query-level fusion - {opening_comment(path) or name}"
    return out


def register_router_recipes() -> None:
    """Store the derived router recipes with Hydra (called before every composition: the config root may change)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for recipe, desc in _router_recipes().items():
        cs.store(group="recipe", name=recipe, package="_global_",
                 node={"defaults": [{"override /model": recipe}], "description": desc})


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description: the files of `recipes/recipe/`, and a derived recipe for each
    router YAML without one (`_router_recipes`)."""
    out = {}
    for p in sorted((recipes_dir() / "recipe").glob("*.yaml")):
        try:
            desc = (yaml.safe_load(p.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(unreadable YAML)"
        out[p.stem] = " ".join(str(desc).split())
    return dict(sorted({**out, **_router_recipes()}.items()))


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
    m = re.match(r"In '([^']+)': \w+ raised while composing config:\n(.+)", msg)
    if m:  # a value in a config file (a recipe, a config= file) that its schema rejects
        key = re.search(r"full_key: (\S+)", msg)
        return f"{m.group(1)}: {key.group(1) + ': ' if key else ''}{m.group(2).strip()}"
    m = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", msg)
    if m and (recipes_dir() / m.group(1)).is_dir():
        group, name = m.group(1), m.group(2)
        return f"unknown {group} {name!r}; choose from: {', '.join(group_options(group))}"
    return msg.splitlines()[0] if msg else type(e).__name__


def debug_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides with the debug groups checked. `debug_recipe` follows `debug` and the recipe
    (fit.yaml: `debug_recipe/<debug>_<recipe>.yaml`, optional): set by hand it could name another recipe's
    cuts or, misspelt, be skipped without a word, so it is refused. `debug=null` and `~debug` are the
    default (no debug) and are dropped: Hydra refuses the first, and the second would leave `${debug}` in
    that interpolation unresolved."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~").split(".")[0] == "debug_recipe":
            raise ConfigError(f"{o}: debug_recipe is not set by hand; debug=fast applies the recipe's own cuts "
                              "(recipes/debug_recipe/fast_<recipe>.yaml)")
        if o == "~debug" or (key.lstrip("+") == "debug" and value in ("null", "none", "None")):
            continue
        out.append(o)
    return out


def compose_config(config_name: str, overrides: list[str] | tuple[str, ...] = (),
                   base: list[str] | None = None) -> DictConfig:
    """Compose `recipes/<config_name>.yaml` with Hydra overrides (the hydra node resolved and dropped);
    ConfigError on any problem. The one composer behind `fit`, `templates build` and the tests."""
    if config_name == "fit":
        overrides = debug_overrides(overrides)
    GlobalHydra.instance().clear()
    register_router_recipes()
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


# --- the key=value commands (collect, serve, evaluate) ------------------------------------------------

FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _is_file_name(v: object) -> bool:
    return isinstance(v, str) and v.lower().endswith(FILE_SUFFIXES)


def read_config_file(path: str, key: str) -> object:
    """A .yaml/.yml/.json file's content; ConfigError naming `key=path` when it cannot be read."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
        return json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{key}={path}: cannot read {p}: {' '.join(str(e).split())}") from None


def primary_config(config_name: str) -> dict:
    """`recipes/<config_name>.yaml` as plain YAML (its defaults list and keys, not composed)."""
    return yaml.safe_load((recipes_dir() / f"{config_name}.yaml").read_text(encoding="utf-8")) or {}


def _check_file_keys(mapping: dict, ref: dict, where: str, prefix: str, free: set[str]) -> None:
    """Every key of a config= file must be a key of the composed defaults (free-form sections aside)."""
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if not isinstance(ref, dict) or k not in ref:
            scope = f"under {prefix[:-1]!r}" if prefix else "at the top level"
            valid = ", ".join(sorted(ref)) if isinstance(ref, dict) else ""
            raise ConfigError(f"{where}: unknown config key {key!r}" + (f"; valid keys {scope}: {valid}" if valid else ""))
        if isinstance(v, dict) and isinstance(ref[k], dict) and ref[k] and key not in free:
            _check_file_keys(v, ref[k], where, f"{key}.", free)


def _parses(parser: object, arg: str) -> bool:
    try:
        parser.parse_overrides([arg])  # type: ignore[attr-defined]
        return True
    except HydraException:
        return False


def compose_command(config_name: str, argv: list[str] | tuple[str, ...],
                    file_keys: tuple[str, ...] = ()) -> dict:
    """`recipes/<config_name>.yaml` composed with a command's `key=value` arguments -> a plain dict
    (resolved); ConfigError (one line) on any problem. The composer of collect, serve and evaluate.

    Everything is Hydra's composition and override grammar (group picks such as `data=NAME`, dotted
    keys, `+key=` for new keys, the same one-line errors as `fit`), plus three things a command needs:

    - `config=FILE` (.yaml/.json, repeatable): a base config under the command line. The file's mapping
      is checked against the composed defaults (an unknown key is an error naming the file), then
      stored in Hydra's ConfigStore and appended to the defaults list (`+_config_fileN@_global_=file`),
      so Hydra merges it over the defaults and applies the command-line overrides after it: the
      command line wins, and a group pick in the file (`data: llmrouter`) is a group pick. (Merging the
      file into a composed config and re-applying the overrides by hand would re-implement Hydra's
      override semantics; a searchpath would need a config group folder around the file.)
    - `file_keys`: such a key given a .yaml/.yml/.json file name gets the file's content.
    - free-form sections, the top-level keys whose default is `{}` (`sampling`, `routers`, a judge)
      and the file keys: Hydra's struct mode would reject their new sub-keys, so their overrides are
      parsed by Hydra's parser but applied after composition, in order, replacing the value
      (`routers=[CKPT]`, `backends=backends.yaml`) or adding to it (`sampling.temperature=0.2`).
    """
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser

    primary = primary_config(config_name)
    groups = {k for d in primary.get("defaults") or [] if isinstance(d, dict) for k in d}
    free = {k for k, v in primary.items() if v == {}}
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([a for a in argv if a])
    except HydraException as e:
        bad = next((a for a in argv if a and not _parses(parser, a)), None)
        hint = (f"{bad!r}: {str(e).strip().splitlines()[0]}; a value holding '=', ',' or spaces needs quotes, e.g. "
                f"{bad.split('=', 1)[0]}='{bad.split('=', 1)[-1]}'") if bad and "=" in bad else str(e).strip().splitlines()[0]
        raise ConfigError(hint) from None
    free |= set(file_keys)
    files = [str(o.value()) for o in parsed if o.key_or_group == "config"]
    late = [o for o in parsed if o.key_or_group.split(".")[0] in free]
    cli = [o.input_line for o in parsed if o.key_or_group != "config" and o.key_or_group.split(".")[0] not in free]
    picks = [o.input_line for o in parsed if o.key_or_group in groups and not o.is_delete()]

    file_picks, file_nodes = [], []
    for path in files:
        mapping = read_config_file(path, "config")
        if not isinstance(mapping, dict):
            raise ConfigError(f"config={path}: expected a mapping of keys at the top level")
        file_picks += [f"{k}={v}" for k, v in mapping.items() if k in groups and isinstance(v, str)]
        file_nodes.append((path, {k: v for k, v in mapping.items() if not (k in groups and isinstance(v, str))}))
    if file_nodes:
        ref = OmegaConf.to_container(compose_config(config_name, file_picks + picks), resolve=False)
        for i, (path, node) in enumerate(file_nodes):
            _check_file_keys(node, ref, f"config={path}", "", free)
            ConfigStore.instance().store(group=f"_config_file{i}", name="file", node=node)
    overrides = file_picks + [f"+_config_file{i}@_global_=file" for i in range(len(file_nodes))] + cli
    try:
        cfg = compose_config(config_name, overrides, base=file_picks + picks)
    except ConfigError as e:
        msg = str(e)
        for i, (path, _) in enumerate(file_nodes):
            msg = msg.replace(f"_config_file{i}/file", f"config={path}")
        raise ConfigError(msg) from None

    def value(key: str, v: object) -> object:
        return read_config_file(v, key) if key in file_keys and _is_file_name(v) else v

    with open_dict(cfg):
        for key in file_keys:  # a file name a config= file gave
            if key in cfg and _is_file_name(cfg[key]):
                cfg[key] = read_config_file(cfg[key], key)
        for o in late:
            try:
                if o.is_sweep_override():
                    raise ConfigError(f"{o.input_line}: a sweep needs fit's -m; the other commands run once")
                if o.is_delete():
                    parent, _, leaf = o.key_or_group.rpartition(".")
                    node = OmegaConf.select(cfg, parent) if parent else cfg
                    if node is not None and leaf in node:
                        del node[leaf]
                else:
                    OmegaConf.update(cfg, o.key_or_group, value(o.key_or_group, o.value()), merge=False,
                                     force_add=True)
            except OmegaConfBaseException as e:
                raise ConfigError(f"{o.input_line}: {str(e).strip().splitlines()[0]}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None


# --- --help, choices and the old --flag spellings of route, export, compare and submit ----------------

def command_help(doc: str, config_name: str) -> str:
    """A `key=value` command's `--help`: its docstring, then its primary config (every key, its default, a comment)."""
    return f"{doc.strip()}\n\n{(recipes_dir() / f'{config_name}.yaml').read_text(encoding='utf-8')}"


def help_requested(argv: list[str], doc: str, config_name: str) -> int | None:
    """A `key=value` command asked for `--help`/`-h` (exit 0) or given nothing (exit 2): print `command_help` and
    return the exit code; None when it should run."""
    if argv and not any(a in ("-h", "--help") for a in argv):
        return None
    print(command_help(doc, config_name))
    return 0 if argv else 2


def check_choice(cfg: dict, key: str, choices: tuple[str, ...] | list[str]) -> str:
    """`cfg[key]` when it is one of `choices`, else a one-line ConfigError naming them."""
    value = cfg[key]
    if value not in choices:
        raise ConfigError(f"{key}={value}: choose from: {', '.join(choices)}")
    return str(value)


def hydra_value(text: str) -> str:
    """`text` as an override value Hydra reads back as the same string: as it is where that holds (`0.5`, a plain
    path), else quoted (a path with `=`, `,`, `~` or a space; `--constraint=a100`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (o,) = OverridesParser.create().parse_overrides([f"k={text}"])
        value = o.value()
        if not o.is_sweep_override() and (value == text or isinstance(value, int | float | bool)):
            return text
    except HydraException:
        pass
    # in a quoted value only backslashes before a quote or at the end are escapes
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


def legacy_flags(argv: list[str] | tuple[str, ...], flags: dict[str, str], switches: tuple[str, ...] = (),
                 lists: tuple[str, ...] = (), positional: str | None = None, keep: tuple[str, ...] = (),
                 translate: dict[str, Callable[[str], str]] | None = None, hint: str = "") -> list[str]:
    """The old argparse spellings, `--flag value`, `--flag=value` and a bare switch, as `key=value` arguments
    (kept for one release; one `note:` line on stderr says the new spelling).

    `flags` maps each old flag to its key, `switches` take no value (`--merge` -> `merge=true`), `lists` may
    repeat (`--metric a --metric b` -> `metrics=[a,b]`), words without `=` go to the list key `positional`
    (compare's run dirs), `keep` pass as they are (submit's `-m`), and `translate` maps a flag's value to its
    argument where that is not `key=value` (`--calibrate budget=1` -> `calibrate.budget=1`). Another `--flag` is
    a ConfigError naming the keys."""
    out: list[tuple[str, bool]] = []  # (argument, translated)
    old: list[str] = []
    listed: dict[str, tuple[int, list[str]]] = {}  # list key -> (where it goes: where it first stood, values)
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        # a key has no '/': `runs/lr=0.1` is a run dir (compare's positional), not the key `runs/lr`
        is_key = "=" in arg and "/" not in arg.split("=", 1)[0]
        if arg in keep or not arg or (not arg.startswith("-") and (is_key or positional is None)):
            out.append((arg, False))  # key=value (or a stray word: compose_command says what is wrong with it)
            continue
        if not arg.startswith("-"):
            listed.setdefault(positional, (len(out), []))[1].append(arg)
            old.append(arg)
            continue
        flag, eq, value = arg.partition("=")
        if flag not in flags:
            keys = ", ".join(dict.fromkeys(flags.values()))
            raise ConfigError(f"unknown option {flag!r}: arguments are key=value; valid keys: {keys}"
                              + (f" ({hint})" if hint else ""))
        key = flags[flag]
        if flag in switches:
            if eq:
                raise ConfigError(f"{arg}: {flag} takes no value (it is now {key}=true)")
            old.append(arg)
            out.append((f"{key}=true", True))
            continue
        if not eq:
            if i >= len(args):
                raise ConfigError(f"{flag} needs a value (it is now {key}=VALUE)")
            value = args[i]
            i += 1
        old += [flag, value] if not eq else [arg]
        if flag in lists:
            listed.setdefault(key, (len(out), []))[1].append(value)
        else:
            out.append((translate[flag](value) if flag in (translate or {}) else f"{key}={hydra_value(value)}", True))
    for at, _, key, values in sorted(((at, n, k, v) for n, (k, (at, v)) in enumerate(listed.items())), reverse=True):
        out.insert(at, (f"{key}=[{','.join(hydra_value(v) for v in values)}]", True))  # from the end: indices hold
    if old:
        new = shlex.join(a for a, translated in out if translated)
        print(f"note: {shlex.join(old)} is now {new} (the --flag spelling goes in the next release)", file=sys.stderr)
    return [a for a, _ in out]
