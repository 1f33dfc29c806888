"""What the suite shares: the shared real-data folder (and the skip when it is absent), small planted logs,
a fast recipe override, and the `integration` marker's meaning.

- `shared_data(name)`: the folder `$FUSION_LIGHTNING_SHARED_DATA/<name>` (default `../shared/data`, beside
  the checkout), or a skip that says how to point at it; session-scoped, so module fixtures can use it.
- `fast_overrides`: the overrides that run any router recipe in seconds on the planted LLMRouter-format log
  (tests/planted.py: a routing rule a router that reads the query must learn), with the hashing encoder,
  no logger, 3 epochs, and the cache and run dir under tmp_path.
- `@pytest.mark.integration`: a test that starts processes or servers (DDP, DeepSpeed, SLURM, the embed job,
  subprocess CLIs, HTTP servers). The default run takes them; `python -m pytest -m "not integration"` is
  the quick loop of unit tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_path(name: str) -> Path:
    d = SHARED / name
    if not d.exists():
        pytest.skip(f"real data {d} not present (set FUSION_LIGHTNING_SHARED_DATA to the shared/data folder)")
    return d


@pytest.fixture(scope="session")
def shared_data() -> Callable[[str], Path]:
    return shared_path


@pytest.fixture
def fast_overrides(tmp_path: Path) -> list[str]:
    from planted import planted_overrides

    return planted_overrides(tmp_path, "logger=none", "trainer.max_epochs=3")
