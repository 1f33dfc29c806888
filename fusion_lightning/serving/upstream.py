"""What talking to an OpenAI-compatible upstream needs besides the requests themselves (openai_http.py):
the error types, `Retry-After` and error-body parsing, the reader of a streamed answer's server-sent
events, and the pools of async clients with their admission limits (in flight, waiting)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from .base import Generation


class BackendError(RuntimeError):
    """A request that failed for good: a non-retryable status, or retries exhausted."""


class Cancelled(BackendError):
    """A request not sent (or not retried) because the batch is failing or was interrupted."""


class QueueFull(BackendError):
    """A request refused at once: every slot of the backend busy and `max_queue` requests already waiting.
    `retry_after`: seconds after which a slot is likely free (a hint, at least 1)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is delay-seconds or an HTTP date; None when absent or unparseable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def server_message(raw: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself (shortened)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text).get("error", text)
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        pass
    return text[:500] or "(empty body)"


class AsyncPools:
    """At most `max_concurrency` requests in flight over clients of at most `per_pool` connections each.
    httpx's own pool does work linear in its size on every request (measured: 6.6 ms CPU a request
    with one pool of 32 busy connections, 2.7 ms with four of 8), so with httpx's transport requests
    go to the least busy of pools of 8; the lean transport (transport.py) needs one.

    Admission: a request that finds every slot busy waits for one, unless `max_queue` requests are
    already waiting (None: no bound): then it fails at once with `QueueFull`, whose `retry_after` is
    the time the waiting requests need at the recent slot-holding time. `in_flight`, `queued` and
    `rejected` count them (read by the server's /metrics)."""

    def __init__(self, max_concurrency: int, make: Any, per_pool: int = 8, max_queue: int | None = None,
                 name: str = "upstream"):
        n = -(-max_concurrency // per_pool)
        self.make, self.size = make, min(per_pool, max_concurrency)
        self.clients: list[httpx.AsyncClient | None] = [None] * n  # made when first needed
        self.busy = [0] * n
        self.limit = asyncio.Semaphore(max_concurrency)
        self.max_concurrency, self.max_queue, self.name = max_concurrency, max_queue, name
        self.in_flight = self.queued = self.rejected = 0
        self.hold_s = 0.0  # moving average of the seconds a request holds its slot

    def retry_after(self) -> float:
        """Seconds until the waiting requests (and one more) are likely through: a hint, at least 1."""
        return max(1.0, math.ceil(self.hold_s * (self.queued + 1) / self.max_concurrency))

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self.max_queue is not None and self.in_flight + self.queued >= self.max_concurrency + self.max_queue:
            self.rejected += 1
            raise QueueFull(f"{self.name}: upstream queue full ({self.in_flight} requests in flight, the most "
                            f"{self.max_concurrency}; {self.queued} waiting, the most {self.max_queue})",
                            self.retry_after())
        self.queued += 1
        try:
            await self.limit.acquire()  # at most max_concurrency in flight: the least busy pool has room
        finally:
            self.queued -= 1
        self.in_flight += 1
        start = time.monotonic()
        i = self.busy.index(min(self.busy))
        try:
            if self.clients[i] is None:
                self.clients[i] = self.make(self.size)
            self.busy[i] += 1
            try:
                yield self.clients[i]
            finally:
                self.busy[i] -= 1
        finally:
            self.in_flight -= 1
            self.limit.release()
            held = time.monotonic() - start
            self.hold_s = held if not self.hold_s else 0.9 * self.hold_s + 0.1 * held

    async def aclose(self) -> None:
        for c in self.clients:
            if c is not None:
                await c.aclose()


class StreamState:
    """What the server-sent events of one streamed answer have said so far."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.done = False
        self._rest = b""

    def lines(self, data: bytes) -> list[str]:
        """The complete lines in what has arrived so far (a line cut by a read waits for its end)."""
        *complete, self._rest = (self._rest + data).split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in complete]

    def read(self, line: str, redact) -> str:
        """One SSE line -> the text it adds ("" for comments, keep-alives, usage, [DONE] and after it)."""
        if self.done or not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return ""
        try:
            event = json.loads(data)
        except ValueError:
            raise Retryable(f"malformed stream event: {redact(data[:200])!r}") from None
        if not isinstance(event, dict):
            raise Retryable(f"malformed stream event: {redact(data[:200])!r}")
        if event.get("error"):
            err = event["error"]
            raise Retryable(f"error event: {redact(str(err.get('message', err) if isinstance(err, dict) else err))}")
        self.usage = event.get("usage") or self.usage
        out = []
        for choice in event.get("choices") or []:
            self.finish = choice.get("finish_reason") or self.finish
            out.append((choice.get("delta") or {}).get("content") or "")
        return "".join(out)


def to_generation(response: Mapping[str, Any], cached: bool) -> Generation:
    return Generation(
        text=response["text"],
        input_tokens=response.get("input_tokens"),
        output_tokens=response.get("output_tokens"),
        latency_s=float(response.get("latency_s") or 0.0),
        cached=cached,
        finish_reason=response.get("finish_reason"),
    )
