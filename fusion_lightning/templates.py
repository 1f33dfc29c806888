"""`python -m fusion_lightning.templates build [key=value ...]`: build or extend a template library.

    python -m fusion_lightning.templates build data=routellm out=library/
    python -m fusion_lightning.templates build data=llmrouter backend=openai_compatible \\
        backend.base_url=http://localhost:8000/v1 backend.model=qwen2.5-7b-instruct out=library/

Keys (recipes/templates/build.yaml): data (a data config, as in fit), backend (rule | local |
openai_compatible, plus its keys), out, encoder, dedup_threshold, batch_size, split, selection.*.
Resumable: re-running the same command skips queries already in the library; the HTTP backend's
cache answers an interrupted batch again without new requests. Prints built / failed / deduplicated.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fusion_lightning.config import ConfigError, _one_line, config_root

COMMANDS = ("build",)


def compose_build(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """recipes/templates/build.yaml with Hydra overrides; ConfigError (one line) on any problem."""
    root = config_root()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root / "recipes" / "templates"), version_base="1.3"):
            cfg = compose(config_name="build",
                          overrides=[*overrides, f"hydra.searchpath=[file://{root / 'recipes'}]"])
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        msg = _one_line(e, "templates")
        if "'backend/" in str(e):
            opts = sorted(p.stem for p in (root / "recipes" / "templates" / "backend").glob("*.yaml"))
            msg = f"unknown backend; choose from: {', '.join(opts)}"
        if msg.endswith("at the top level: "):
            msg += ", ".join(sorted(OmegaConf.load(root / "recipes" / "templates" / "build.yaml")))
        raise ConfigError(msg) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def run_build(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    from fusion_lightning.data.datamodule import load_from_config
    from fusion_lightning.data.embeddings import build_encoder
    from fusion_lightning.thought.build import build_library
    from fusion_lightning.thought.select import TemplateSelection
    from fusion_lightning.thought.summarise import build_summariser

    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    logs = load_from_config(c["data"])
    if c.get("split"):
        logs = logs.select(str(c["split"]))
    summariser = build_summariser(c["backend"], logs.task_descriptions)
    _, report = build_library(logs, summariser, build_encoder(c["encoder"]), c["out"],
                              TemplateSelection(**c["selection"]), c["dedup_threshold"], int(c["batch_size"]),
                              progress=progress)
    return {"report": report, "summariser": summariser.name}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        cfg = compose_build(argv[1:])
        result = run_build(cfg)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as e:
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {str(e).splitlines()[0]}  (FUSION_LIGHTNING_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    for line in result["report"].lines():
        print(line)
    print(f"summariser: {result['summariser']}; library: {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
