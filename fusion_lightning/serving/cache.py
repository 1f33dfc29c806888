"""A disk cache of generations, one small JSON file per request, written atomically as each response
arrives, so an interrupted batch resumes where it stopped and never pays for an answer twice.

Layout: `<cache_dir>/<key[:2]>/<key>.json`, where `key` is the sha256 of the canonical JSON of the
request (`request_key`): the base URL and the request body (model, messages, sampling parameters).
Credentials are never part of a request here, so they never reach the key or the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from fusion_lightning.io import atomic_write

log = logging.getLogger(__name__)


def request_key(request: dict[str, Any]) -> str:
    """sha256 of the request's canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class GenerationCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record, or None (absent; an unreadable file is a miss, with a warning)."""
        p = self.path(key)
        try:
            with open(p, encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache file %s: %s", p, e)
            return None
        return record if isinstance(record, dict) and "response" in record else None

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        """Write atomically (fusion_lightning.io): a reader sees all or nothing."""
        record = {"key": key, "created": time.time(), "request": request, "response": response}
        atomic_write(self.path(key), json.dumps(record, ensure_ascii=False))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
