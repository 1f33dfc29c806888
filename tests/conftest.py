"""What the suite shares: the shared real-data folder (and the skip when it is absent), small planted logs,
a fast recipe override, and the `integration` marker's meaning.

- `shared_data(name)`: the folder `$FUSION_LIGHTNING_SHARED_DATA/<name>` (default `../shared/data`, beside
  the checkout), or a skip that says how to point at it; session-scoped, so module fixtures can use it.
- the cache (autouse, session): `FUSION_LIGHTNING_CACHE` is the checkout's `.cache/fusion_lightning` unless
  already set, so the suite never writes into the user's `~/.cache` and finds the zoo's models, ONNX exports
  and embeddings where it made them before the cache moved there (a run from the checkout used that
  folder), in any working directory and in the processes it starts; a test that needs its own cache sets
  the variable itself.
- `fast_overrides`: the overrides that run any router recipe in seconds on the planted LLMRouter-format log
  (tests/planted.py: a routing rule a router that reads the query must learn), with the hashing encoder,
  no logger, 3 epochs, and the cache and run dir under tmp_path.
- under pytest-xdist (`-n 2`, the quick loop) each worker runs torch on one thread (`pytest_configure`).
- `@pytest.mark.integration`: a test that starts processes or servers (DDP, DeepSpeed, SLURM, the embed job,
  subprocess CLIs, HTTP servers). The default run takes them; `python -m pytest -m "not integration"` is
  the quick loop of unit tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TEST_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "fusion_lightning"  # gitignored


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n 2`), each worker computes on one thread: two workers with torch's default
    threads each fight over the same cores (the quick loop took longer with `-n 2` than without)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"  # and the processes a test starts
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def fl_cache() -> Iterator[Path]:
    """The cache root the suite uses (fusion_lightning.cache): `$FUSION_LIGHTNING_CACHE`, else the checkout's
    `.cache/fusion_lightning` - never `~/.cache/fusion_lightning`."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("FUSION_LIGHTNING_CACHE"):
            mp.setenv("FUSION_LIGHTNING_CACHE", str(TEST_CACHE))
        yield Path(os.environ["FUSION_LIGHTNING_CACHE"])


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
