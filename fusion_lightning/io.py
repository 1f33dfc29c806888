"""Atomic file writes: every file a run leaves is either complete or untouched, never half-written.

`atomic_open(path)` yields a file object on a temp file in `path`'s folder (same filesystem, so the
final rename is atomic); on a clean exit the data is flushed and fsynced, the temp file renamed over
`path` (`os.replace`) and the folder fsynced, so the new name survives a crash too. On an error the
temp file is removed and `path` keeps its previous content. Concurrent writers of the same path each
write their own temp file: the last rename wins, whole. `atomic_write` is the one-call form;
`rewrite_checkpoint` changes a torch checkpoint in place through it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """`open(path, mode, **kwargs)` for writing ("w"/"wb" modes), made atomic; parents are created."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        # a new file with the usual umask-derived permissions (tempfile.mkstemp would make it 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write `data` (text is encoded with `encoding`) to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)


def rewrite_checkpoint(path: str | os.PathLike, edit: Callable[[dict], None],
                       out: str | os.PathLike | None = None) -> Path:
    """Load a torch checkpoint, let `edit` change the dict in place, and write it to `out` (default: `path`
    itself, replaced atomically); the weights and everything `edit` leaves alone stay as they were."""
    import torch  # util sits below everything: torch only where a checkpoint is rewritten

    data = torch.load(path, map_location="cpu", weights_only=True)
    edit(data)
    target = Path(out if out is not None else path)
    with atomic_open(target, "wb") as fh:
        torch.save(data, fh)
    return target


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created, with its folder, if missing) for one-time work
    that several processes may start at once: DDP ranks before their process group exists, one local
    rank 0 per node on a shared disk. The first does the work; the others wait, then find it done.
    No lock where the platform or filesystem has none (e.g. Lustre mounted without flock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened or fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
