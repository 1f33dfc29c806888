"""Log files: finding them, the task and split their names carry, and a query found in two split files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_lightning.data.arrow import codes
from fusion_lightning.data.errors import LogFormatError
from fusion_lightning.data.readers.common import SourceData

_SPLIT_RE = re.compile(r"(?:^|[_\-.])(train|training|test|testing|val|valid|validation|dev)(?=$|[_\-.])", re.I)
_SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test", "val": "val",
                "valid": "val", "validation": "val", "dev": "val"}


def split_from_name(path: Path) -> str | None:
    """'gsm8k_test.json' -> 'test'; None when the file name carries no split."""
    m = _SPLIT_RE.search(path.stem)
    return _SPLIT_NAMES[m.group(1).lower()] if m else None


_ROLE_RE = re.compile(r"(?:^|[_\-.])(responses|response|scores|queries|logs|log)(?=$|[_\-.])", re.I)


def task_from_name(path: Path) -> str:
    """'gsm8k_test.json' -> 'gsm8k': the file stem without its split and role words."""
    no_split = _SPLIT_RE.sub("", path.stem).strip("_-. ")
    stem = _ROLE_RE.sub("", no_split).strip("_-. ")
    return stem or no_split or path.stem


def find_files(path: Path, suffixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[Path]:
    """`path` itself, or the files under a directory with one of `suffixes` (sorted, so runs repeat)."""
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(p.name.startswith(x) for x in exclude)
    )
    if not files:
        raise LogFormatError(str(path), f"no {'/'.join(suffixes)} files found in this directory")
    return files


def drop_cross_split_duplicates(src: SourceData) -> None:
    """A query text in both a test/val file and a train file is kept in the held-out split only.

    Otherwise a model would be evaluated on queries it trained on. Reported, never silent.
    """
    table = src.table
    si, split_values = codes(table["split"])
    if len({v for v in split_values if v is not None}) < 2:
        return
    rank_of = {"test": 0, "val": 1, "train": 2}
    rank = np.array([rank_of.get(v or "train", 2) for v in split_values])[si]
    qi, _ = codes(table["query"])
    best = np.full(qi.max() + 1, 3)
    np.minimum.at(best, qi, rank)
    keep = rank == best[qi]
    if keep.all():
        return
    n_queries = len(np.unique(qi[~keep]))
    src.counts["duplicates_across_splits"] = n_queries
    src.notes.append(
        f"{n_queries} queries appear in more than one split file: kept in the held-out split "
        f"(test before val before train) and removed from the others ({int((~keep).sum())} rows)"
    )
    new_index = np.cumsum(keep) - 1
    src.issues = {int(new_index[i]): v for i, v in src.issues.items() if keep[i]}
    src.table = table.filter(pa.array(keep))
