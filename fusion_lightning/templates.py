"""`python -m fusion_lightning.templates build [key=value ...]`: build or extend a template library.

    python -m fusion_lightning.templates build data=routellm out=library/
    python -m fusion_lightning.templates build data=llmrouter backend=openai_compatible \\
        backend.base_url=http://localhost:8000/v1 backend.model=qwen2.5-7b-instruct out=library/

Keys (recipes/templates.yaml): data (a data config, as in fit), backend (rule | local |
openai_compatible, plus its keys), out, encoder, dedup_threshold, batch_size, split, selection.*.
Resumable: re-running the same command skips queries already in the library; the HTTP backend's
cache answers an interrupted batch again without new requests. Prints built / failed / deduplicated.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusion_lightning.config import compose_config

COMMANDS = ("build",)


def compose_build(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """recipes/templates.yaml with Hydra overrides; ConfigError (one line) on any problem."""
    return compose_config("templates", overrides)


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
    except (ValueError, FileNotFoundError) as e:
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
