"""MkDocs hook: the config reference page is generated from `recipes/` at every build.

`reference/config.md` is not a file in docs/: `on_files` adds it with the text of
`docs/gen_config_tables.py`, so the site's recipe and config-group tables cannot drift from the tree.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File

CONFIG_PAGE = "reference/config.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_tables", Path(__file__).with_name("gen_config_tables.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    existing = files.get_file_from_path(CONFIG_PAGE)
    if existing is not None:  # a stale copy written by hand: the generated text wins
        files.remove(existing)
    files.append(File.generated(config, CONFIG_PAGE, content=_generator().config_tables()))
    return files
