"""Readers convert a public log format into canonical records (see `schema.py`).

A reader is one function registered by name; a new format is one new file in this package:

    @register_reader("myformat")
    def read_myformat(path: Path, options: ReaderOptions) -> SourceData: ...

The registry is the one list of reader names: every module of this package is imported on first use
(`load_readers`), so a new file registers itself; nothing else keeps a list of formats.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from fusion_lightning.data.readers.common import ReaderOptions, SourceData
from fusion_lightning.data.readers.files import drop_cross_split_duplicates

Reader = Callable[[Path, ReaderOptions], SourceData]
READERS: dict[str, Reader] = {}
_HELPERS = ("common", "files")  # shared code of the readers, not formats


def register_reader(name: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


def load_readers() -> dict[str, Reader]:
    """Import every reader module of this package (each registers itself); the registry, name -> reader."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _HELPERS and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return READERS


def get_reader(name: str) -> Reader:
    load_readers()
    if name not in READERS:
        raise ValueError(f"unknown log format {name!r}; choose from: {', '.join(sorted(READERS))}")
    return READERS[name]


def read_source(fmt: str, path: str | Path, options: ReaderOptions | None = None) -> SourceData:
    """Read one file or a directory of files of format `fmt` into canonical records."""
    p = Path(path).expanduser()
    if not p.exists() and fmt != "llmfusionbench":  # llmfusionbench also accepts a Hub dataset name
        raise FileNotFoundError(f"{p}: no such file or directory (data.path)")
    options = options or ReaderOptions()
    src = get_reader(fmt)(p, options)
    if not options.responses and src.table["response"].null_count < len(src.table):  # readers that read them anyway
        i = src.table.schema.get_field_index("response")
        src.table = src.table.set_column(i, "response", pa.nulls(len(src.table), pa.string()))
    drop_cross_split_duplicates(src)
    return src


__all__ = ["READERS", "ReaderOptions", "SourceData", "get_reader", "load_readers", "read_source", "register_reader"]
