"""Where fusion_lightning keeps what it makes once and reuses: the one rule for the cache folder.

Everything built once and reused lives under one root: the zoo's models (`students/`), the ONNX exports
(`onnx/`), the embedding cache (`embeddings/`), the layer probe's picks (`layer_probe/`) and the
OpenAI-compatible backend's generation cache (`generations/`). The root is, as for the Hugging Face
caches (`HF_HOME`):

1. `$FUSION_LIGHTNING_CACHE`, when set (`~` expanded; a relative path is taken from the working
   directory at the time it is read);
2. else `$XDG_CACHE_HOME/fusion_lightning`, when `XDG_CACHE_HOME` is an absolute path (the XDG base
   directory spec says to ignore a relative one);
3. else `~/.cache/fusion_lightning`.

Why not a folder relative to the working directory (the default before): a run started from another
folder (a SLURM job's, a notebook's) found no cache there and rebuilt gemma (108 s, 3.3 GB peak) and
re-embedded the log. `cache_root()` is the only reader of `FUSION_LIGHTNING_CACHE` in the package (a
test checks it); the recipes reach it through the `${fl_cache:SUBDIR}` resolver (config.py).
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

ENV = "FUSION_LIGHTNING_CACHE"
LEGACY = Path(".cache") / "fusion_lightning"  # the old default, relative to the working directory
RULE = f"${ENV}, else $XDG_CACHE_HOME/fusion_lightning, else ~/.cache/fusion_lightning"

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """The cache folder, absolute: `$FUSION_LIGHTNING_CACHE`, else `$XDG_CACHE_HOME/fusion_lightning`,
    else `~/.cache/fusion_lightning` (read from the environment on every call, so a test or a job that
    sets the variable is seen at once)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    root = base / "fusion_lightning"
    _hint_legacy(root, Path.cwd())
    return root


def cache_help() -> str:
    """Two lines for a command's --help: where the cache is now, and the rule that put it there."""
    return (f"cache: {cache_root()}  (zoo models, ONNX exports, embeddings, layer-probe picks, generations)\n"
            f"  {RULE}")


@cache
def _hint_legacy(root: Path, cwd: Path) -> None:
    """Once per (root, working directory): a cache left at the old cwd-relative default is not used any
    more; say so, and how to keep using it, rather than silently rebuilding the zoo's models."""
    old = cwd / LEGACY
    if old.is_dir() and old.resolve() != root.resolve():
        log.warning("the cache is now %s (%s); the old one at %s is not used: move it there or set %s=%s",
                    root, RULE, old, ENV, old)
