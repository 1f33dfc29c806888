"""Dynamic batching for a server: requests that arrive together are answered by one call.

`MicroBatcher(fn, max_batch, wait_ms)` owns one worker thread. `submit(item)` (from any thread) or
`await batcher.run(item)` (from an event loop) queues an item; the worker takes the first waiting
item, collects more for at most `wait_ms` or until `max_batch`, calls `fn(items) -> results` once and
resolves each item's future with its result (a result that is an exception fails that item alone;
`fn` raising fails the whole batch). While `fn` runs, new items queue up, so under load each batch
is as large as the load makes it and the per-item cost of `fn` falls. The worker waits for more only
when the batch's first item came less than `wait_ms` after the one before it: a lone request at low
load is not held back for company that will not come, while a burst is collected (its first item
goes at once, the rest, queued meanwhile or within `wait_ms`, go together). Items whose caller gave
up (a cancelled future) are left out of the batch.

The server batches routing (embed and score many queries at once) and in-process models (one
`generate` call for many prompts) with it; `fn` runs off the event loop, so a batch never stalls it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .base import Backend, Generation, Prompt

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")
_STOP = object()


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], Sequence[R | BaseException]], *, max_batch: int = 64,
                 wait_ms: float = 5.0, name: str = "batch", on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and wait_ms >= 0, got {max_batch}, {wait_ms}")
        self.fn, self.max_batch, self.wait_s, self.name = fn, int(max_batch), float(wait_ms) / 1000, name
        self.on_batch = on_batch  # called with (batch size, seconds in fn) after each batch
        self.batches = self.items = self.largest = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._last = float("-inf")  # when the last item arrived
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"MicroBatcher({self.name!r}, max_batch={self.max_batch}, wait_ms={self.wait_s * 1000:g})"

    def submit(self, item: T) -> Future:
        fut: Future = Future()
        if not self._thread.is_alive():
            raise RuntimeError(f"batcher {self.name!r} is closed")
        now = time.monotonic()
        self._queue.put((item, fut, now - self._last < self.wait_s))  # did it come in a burst?
        self._last = now
        return fut

    async def run(self, item: T) -> R:
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float | None = 10.0) -> None:
        """Answer what is queued, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _collect(self, first: tuple[T, Future, bool]) -> tuple[list[tuple[T, Future, bool]], bool]:
        batch, stopping = [first], False
        deadline = time.monotonic() + (self.wait_s if first[2] else 0.0)  # a lone item: what is queued now
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                stopping = True
                break
            batch.append(entry)
        return batch, stopping

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._collect(first)
            live = [(item, fut) for item, fut, _ in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._run(live)
            if stopping:
                return

    def _run(self, batch: list[tuple[Any, Future]]) -> None:
        start = time.perf_counter()
        try:
            results = list(self.fn([item for item, _ in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(batch)} items but {len(results)} results")
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
            log.warning("%s: a batch of %d failed: %s: %s", self.name, len(batch), type(e).__name__, e)
            for _, fut in batch:
                fut.set_exception(e)
            return
        finally:
            self.batches += 1
            self.items += len(batch)
            self.largest = max(self.largest, len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
        for (_, fut), r in zip(batch, results, strict=True):
            if isinstance(r, BaseException):
                fut.set_exception(r)
            else:
                fut.set_result(r)


@dataclass
class GenerationRequest:
    """One request for an in-process backend: `n` answers to `prompt`; `streams[i]`, when given,
    receives answer i's text as it is generated."""

    prompt: Prompt
    n: int
    sampling: Mapping[str, Any]
    streams: Sequence[Callable[[str], None]] | None = None


def generate_requests(backend: Backend, requests: list[GenerationRequest]) -> list[list[Generation] | Exception]:
    """A MicroBatcher `fn` for an in-process backend: the requests that share sampling parameters are one
    `generate` call (n rows per request). A backend whose `generate` takes `streams` streams each row;
    another gets its whole answer handed to the stream at the end."""
    streaming = "streams" in inspect.signature(backend.generate).parameters
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(json.dumps(dict(r.sampling), sort_keys=True, default=str), []).append(i)
    out: list[list[Generation] | Exception] = [[] for _ in requests]
    for idx in groups.values():
        rows = [(i, c) for i in idx for c in range(requests[i].n)]
        prompts = [requests[i].prompt for i, _ in rows]
        streams = [requests[i].streams[c] if requests[i].streams else None for i, c in rows]
        sampling = dict(requests[idx[0]].sampling)
        try:
            if streaming and any(streams):
                gens = backend.generate(prompts, streams=streams, **sampling)
            else:
                gens = backend.generate(prompts, **sampling)
                for stream, g in zip(streams, gens, strict=True):
                    if stream is not None and g.text:
                        stream(g.text)
        except Exception as e:  # noqa: BLE001 - these requests fail, the others in the batch go on
            for i in idx:
                out[i] = e
            continue
        for (i, _), g in zip(rows, gens, strict=True):
            out[i].append(g)  # type: ignore[union-attr]
    return out
