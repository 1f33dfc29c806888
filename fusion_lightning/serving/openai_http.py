"""Generation through any server that speaks the OpenAI chat-completions API (OpenAI, vLLM, SGLang,
TGI, llama.cpp, LiteLLM, ...): `POST {base_url}/chat/completions`.

On httpx. `generate` runs a batch concurrently (a thread pool of `max_concurrency` over one pooled
client), each request with a timeout; 429, 5xx, timeouts, connection errors and malformed responses
are retried with exponential backoff and jitter (`Retry-After` honoured); other 4xx are errors that
name the status and the server's message. Every answer is written to a disk cache as it arrives
(see `cache.py`), so a re-run sends only what is not cached yet. The API key is read from the
environment variable named by `api_key_env` at request time: it is never stored on the object,
written to the cache or put in a message.

A server uses the async side: `acomplete(prompt)` (one answer, same retries and cache) and
`astream(prompt)` (the upstream's server-sent events passed through as they arrive, with
`stream_options.include_usage` for token counts). A stream is retried only until its first piece
of text has been passed on; after that a failure is a `BackendError` ("stream broke"). There, too,
at most `max_concurrency` requests are in flight per event loop; a request that finds them all busy
waits for a slot, unless `max_queue` requests are already waiting (None, the default: no bound):
then it fails at once with `QueueFull` (a `BackendError` with a `retry_after` hint), which a server
answers with 503. `upstream_load()` is (in flight, waiting) now, `upstream_rejected` the count of
refusals. The default of 8 in flight is polite to a rate-limited API (`collect`); `serve` raises it
for every backend that does not set its own (its `upstream_concurrency`, `upstream_queue`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx

from fusion_lightning.cache import cache_root

from .base import (
    Chunk,
    Generation,
    Prompt,
    Sampling,
    StopTrim,
    resolve_sampling,
    to_messages,
    truncate_at_stop,
)
from .cache import GenerationCache, request_key
from .transport import LeanAsyncTransport, lean_transport_applies
from .upstream import (
    AsyncPools,
    BackendError,
    Cancelled,
    QueueFull,
    Retryable,
    StreamState,
    parse_retry_after,
    server_message,
    to_generation,
)

log = logging.getLogger(__name__)


class _DefaultCacheDir:
    """`cache_dir`'s default: `<cache root>/generations` (fusion_lightning.cache), read when a backend is
    made, so `FUSION_LIGHTNING_CACHE` set after import still counts."""

    def __repr__(self) -> str:
        return "<cache root>/generations"


DEFAULT_CACHE_DIR = _DefaultCacheDir()
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
__all__ = ["BackendError", "OpenAICompatibleBackend", "QueueFull"]


class OpenAICompatibleBackend:
    """`base_url` like "https://api.openai.com/v1" or "http://localhost:8000/v1"; `model` is sent as
    the request's model; `name` (default: `model`) is the model name in logs. `api_key_env` names
    the environment variable holding the key (None: no Authorization header). `cache_dir` defaults to
    `<cache root>/generations` (fusion_lightning.cache); `cache_dir=None` disables the cache.
    `errors="raise"` raises `BackendError` for the first prompt that fails for good (after in-flight
    requests finish and are cached); `errors="return"` returns a `Generation` with `error` set for
    each failed prompt instead. With the cache on, identical requests in one call are sent once and
    share the answer. `max_concurrency`: the most requests in flight (a batch's threads; on the async
    side, per event loop); `max_queue`: on the async side, the most requests waiting for a slot before
    one more is refused with `QueueFull` (None: no bound)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        name: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        max_queue: int | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        max_backoff: float = 60.0,
        retry_seed: int | None = None,
        cache_dir: str | os.PathLike | None | _DefaultCacheDir = DEFAULT_CACHE_DIR,
        sampling: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        errors: str = "raise",
        progress: bool = True,
    ):
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_base < 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_base >= 0")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be an integer >= 0 or None (no bound), got {max_queue!r}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"environment variable {api_key_env} (named by api_key_env) is not set or empty")
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, name or model
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env, self.max_concurrency, self.timeout_s = api_key_env, max_concurrency, timeout_s
        self.max_queue = max_queue
        self.max_retries, self.backoff_base, self.max_backoff = max_retries, backoff_base, max_backoff
        self.default_sampling, self.extra_body = dict(sampling or {}), dict(extra_body or {})
        resolve_sampling(self.default_sampling, {})  # fail early on bad defaults
        if isinstance(cache_dir, _DefaultCacheDir):
            cache_dir = cache_root() / "generations"
        self.cache = GenerationCache(cache_dir) if cache_dir is not None else None
        self.errors, self.progress = errors, progress
        self._rng, self._rng_lock = random.Random(retry_seed), threading.Lock()
        self._sleep = time.sleep  # tests replace it to record the backoff delays
        self._client: httpx.Client | None = None  # made on first use; thread-safe, pooled
        self._aclients: dict[Any, AsyncPools] = {}  # per event loop
        self._rejected_closed = 0  # refusals counted by pools since closed
        self._client_lock = threading.Lock()
        self._pending: set[asyncio.Future] = set()  # cache writes the async side started

    def __repr__(self) -> str:
        cache = None if self.cache is None else str(self.cache.root)
        return (
            f"OpenAICompatibleBackend(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, max_queue={self.max_queue}, "
            f"cache_dir={cache!r})"
        )

    # -- requests -------------------------------------------------------------------------------
    def request_body(self, prompt: Prompt, s: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "messages": to_messages(prompt),
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        return body

    def _redact(self, message: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return message.replace(key, "***") if key else message

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _limits(self, connections: int | None = None) -> dict[str, Any]:
        n = connections or self.max_concurrency
        return {"timeout": httpx.Timeout(self.timeout_s, pool=None), "trust_env": True,
                "limits": httpx.Limits(max_connections=n, max_keepalive_connections=n)}

    def _sync_client(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(**self._limits())
            return self._client

    def _pools(self) -> AsyncPools:
        """This event loop's clients (an httpx.AsyncClient belongs to one loop)."""
        loop = asyncio.get_running_loop()
        with self._client_lock:
            pools = self._aclients.get(loop)
            if pools is None:
                admit = {"max_queue": self.max_queue, "name": self.name}
                if lean_transport_applies():  # no proxy to honour: the lean transport, one pool
                    timeout, idle = httpx.Timeout(self.timeout_s, pool=None), max(256, self.max_concurrency)
                    pools = AsyncPools(self.max_concurrency, lambda n: httpx.AsyncClient(
                        transport=LeanAsyncTransport(max_idle=idle), timeout=timeout), per_pool=self.max_concurrency,
                        **admit)
                else:
                    pools = AsyncPools(self.max_concurrency, lambda n: httpx.AsyncClient(**self._limits(n)), **admit)
                self._aclients[loop] = pools
            return pools

    def upstream_load(self) -> tuple[int, int]:
        """(requests in flight, requests waiting for a slot) on the async side, summed over event loops."""
        with self._client_lock:
            pools = list(self._aclients.values())
        return sum(p.in_flight for p in pools), sum(p.queued for p in pools)

    @property
    def upstream_rejected(self) -> int:
        """Requests refused with `QueueFull` so far (async side)."""
        with self._client_lock:
            return self._rejected_closed + sum(p.rejected for p in self._aclients.values())

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close this event loop's connections (a server calls it on shutdown)."""
        with self._client_lock:
            pools = self._aclients.pop(asyncio.get_running_loop(), None)
            self._rejected_closed += pools.rejected if pools is not None else 0
        if pools is not None:
            await pools.aclose()

    def _transport_error(self, e: httpx.HTTPError) -> Retryable:
        if isinstance(e, httpx.TimeoutException):
            return Retryable(f"timed out after {self.timeout_s:g} s")
        return Retryable(f"connection error: {type(e).__name__}: {self._redact(str(e))}")

    def _check_status(self, status: int, headers: httpx.Headers, raw: bytes) -> None:
        """Raise `Retryable` (429, 5xx, ...) or `BackendError` (other 4xx) for an error status."""
        if status < 400:
            return
        msg = self._redact(server_message(raw))
        if status in RETRYABLE_STATUS or status >= 500:
            raise Retryable(f"HTTP {status}: {msg}", parse_retry_after(headers.get("Retry-After")))
        hint = f" (check the key in ${self.api_key_env})" if status in (401, 403) and self.api_key_env else ""
        raise BackendError(f"{self.name}: HTTP {status} from POST {self.url}: {msg}{hint}")

    def _answer(self, raw: bytes, body: dict[str, Any], latency: float) -> dict[str, Any]:
        try:
            data = json.loads(raw)
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            finish = data["choices"][0].get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = self._redact(raw[:200].decode("utf-8", errors="replace"))
            raise Retryable(f"malformed response: {snippet!r}") from None
        return {
            "text": truncate_at_stop(str(text), body.get("stop") or ()),
            "input_tokens": usage.get("prompt_tokens"),
            "output_tokens": usage.get("completion_tokens"),
            "latency_s": latency,
            "finish_reason": finish,
        }

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One attempt. Returns the parsed answer; raises `Retryable` or `BackendError`."""
        start = time.perf_counter()
        try:
            resp = self._sync_client().post(self.url, json=body, headers=self._headers())
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        self._check_status(resp.status_code, resp.headers, resp.content)
        return self._answer(resp.content, body, time.perf_counter() - start)

    async def _apost(self, body: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            async with self._pools().client() as client:
                resp = await client.post(self.url, json=body, headers=self._headers())
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        self._check_status(resp.status_code, resp.headers, resp.content)
        return self._answer(resp.content, body, time.perf_counter() - start)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()  # x0.5 .. x1.5
        return min(self.backoff_base * 2**attempt, self.max_backoff) * jitter

    def _retry_delay(self, e: Retryable, attempt: int) -> float:
        """The wait before retry `attempt + 1`; BackendError once `max_retries` retries are spent."""
        if attempt >= self.max_retries:
            raise BackendError(f"{self.name}: gave up after {attempt + 1} attempts at POST {self.url}; last error: {e}") from None
        delay = self._delay(attempt, e.retry_after)
        log.info("%s: %s; retry %d/%d in %.2f s", self.name, e, attempt + 1, self.max_retries, delay)
        return delay

    def _call(self, body: dict[str, Any], stop: threading.Event | None = None) -> dict[str, Any]:
        """One request with retries: `max_retries` retries after the first attempt; no new attempt
        once `stop` is set (the batch is failing or interrupted)."""
        for attempt in range(self.max_retries + 1):
            if attempt and stop is not None and stop.is_set():
                raise Cancelled(f"{self.name}: cancelled before retry {attempt}")
            try:
                return self._post(body)
            except Retryable as e:
                self._sleep(self._retry_delay(e, attempt))
        raise AssertionError("unreachable")

    def _complete(self, body: dict[str, Any], key: str, stop: threading.Event) -> dict[str, Any]:
        if stop.is_set():
            raise Cancelled(f"{self.name}: cancelled")
        try:
            response = self._call(body, stop)
        except BackendError as e:
            if self.errors == "raise" and not isinstance(e, Cancelled):
                stop.set()  # at once, before this worker picks up the next request
            raise
        if self.cache is not None:  # as it arrives: an interruption loses nothing already paid for
            self.cache.put(key, {"base_url": self.base_url, "body": body}, response)
        return response

    # -- batch ----------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], **sampling: Any) -> list[Generation]:
        from tqdm.auto import tqdm

        s = resolve_sampling(self.default_sampling, sampling)
        bodies = [self.request_body(p, s) for p in prompts]
        keys = [request_key({"base_url": self.base_url, "body": b}) for b in bodies]
        results: list[Generation | None] = [None] * len(bodies)
        groups: dict[Any, list[int]] = {}  # one request per group; identical requests share one
        for i, key in enumerate(keys):
            record = self.cache.get(key) if self.cache is not None else None
            if record is not None:
                results[i] = to_generation(record["response"], cached=True)
            else:
                groups.setdefault(key if self.cache is not None else i, []).append(i)
        n_cached = len(bodies) - sum(len(g) for g in groups.values())
        if n_cached:
            log.info("%s: %d of %d prompts answered from the cache", self.name, n_cached, len(bodies))
        failures: list[tuple[int, BackendError]] = []
        bar = tqdm(total=len(groups), desc=f"generate {self.name}", unit="req", disable=not self.progress or not groups)
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="openai-http")
        stop = threading.Event()
        try:
            futures = {pool.submit(self._complete, bodies[idx[0]], keys[idx[0]], stop): idx for idx in groups.values()}
            for fut in as_completed(futures):
                idx = futures[fut]
                if fut.cancelled():
                    continue
                bar.update(1)
                try:
                    response = fut.result()
                except BackendError as e:
                    if self.errors == "return" or not isinstance(e, Cancelled):
                        failures.append((idx[0], e))  # with "raise", a failure has set `stop`: nothing
                        # new is sent; requests in flight finish (and are cached) but are not retried
                    for i in idx:
                        results[i] = Generation("", None, None, 0.0, error=str(e))
                    continue
                for i in idx:
                    results[i] = to_generation(response, cached=False)
        finally:
            stop.set()  # on an interruption too: in-flight requests finish, nothing new starts
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        if failures and self.errors == "raise":
            first, err = failures[0]
            raise BackendError(f"prompt {first} (of {len(bodies)}): {err}") from None
        return results  # type: ignore[return-value]


    # -- one request at a time, for a server (async) ----------------------------------------------
    def _cache_soon(self, key: str | None, body: dict[str, Any], response: dict[str, Any]) -> None:
        """Write the answer to the cache in a worker thread (an fsync must not hold up the reply)."""
        if self.cache is None or key is None:
            return
        fut = asyncio.get_running_loop().run_in_executor(
            None, self.cache.put, key, {"base_url": self.base_url, "body": body}, response)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    def _cached(self, prompt: Prompt, sampling: Mapping[str, Any],
                use: bool) -> tuple[dict, str | None, Generation | None]:
        body = self.request_body(prompt, resolve_sampling(self.default_sampling, sampling))
        if not use or self.cache is None:
            return body, None, None
        key = request_key({"base_url": self.base_url, "body": body})
        record = self.cache.get(key)
        return body, key, None if record is None else to_generation(record["response"], cached=True)

    async def acomplete(self, prompt: Prompt, *, cache: bool = True, **sampling: Any) -> Generation:
        """One answer (retries; the cache unless `cache=False`); raises BackendError when it fails for good."""
        body, key, hit = self._cached(prompt, sampling, cache)
        if hit is not None:
            return hit
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._apost(body)
                break
            except Retryable as e:
                await asyncio.sleep(self._retry_delay(e, attempt))
        self._cache_soon(key, body, response)
        return to_generation(response, cached=False)

    async def astream(self, prompt: Prompt, *, cache: bool = True, **sampling: Any) -> AsyncIterator[Chunk]:
        """The answer as it arrives: `Chunk(0, text)` pieces, then `Chunk(0, "", generation)`. A cached
        answer comes as one piece; a streamed one is cached when complete (unless `cache=False`)."""
        body, key, hit = self._cached(prompt, sampling, cache)
        if hit is not None:
            yield Chunk(0, hit.text)
            yield Chunk(0, "", hit)
            return
        request = {**body, "stream": True, "stream_options": {"include_usage": True}}
        pools = self._pools()
        sent = False
        for attempt in range(self.max_retries + 1):
            trim, state = StopTrim(body.get("stop") or ()), StreamState()
            start = time.perf_counter()
            try:
                async with pools.client() as client, client.stream("POST", self.url, json=request,
                                                                   headers=self._headers()) as resp:
                    if resp.status_code >= 400:
                        self._check_status(resp.status_code, resp.headers, await resp.aread())
                    async for data in resp.aiter_bytes():  # what one read brings is passed on as one piece
                        piece = "".join(trim.feed(state.read(line, self._redact)) for line in state.lines(data))
                        if piece:
                            sent = True
                            state.text.append(piece)
                            yield Chunk(0, piece)
                        if trim.done:
                            break  # cut at a stop string; after [DONE] it reads on, so the connection is reused
                if not (state.done or trim.done):
                    raise Retryable("the stream ended without [DONE]")
            except httpx.HTTPError as e:
                err = None if state.done else self._transport_error(e)  # after [DONE]: answered in full
            except Retryable as e:
                err = e
            else:
                err = None
            if err is None:
                tail = trim.flush()
                if tail:
                    state.text.append(tail)
                    yield Chunk(0, tail)
                response = {"text": "".join(state.text), "input_tokens": state.usage.get("prompt_tokens"),
                            "output_tokens": state.usage.get("completion_tokens"),
                            "latency_s": time.perf_counter() - start,
                            "finish_reason": "stop" if trim.done else state.finish}
                self._cache_soon(key, body, response)
                yield Chunk(0, "", to_generation(response, cached=False))
                return
            if sent:
                raise BackendError(f"{self.name}: the stream broke after output was sent: {err}")
            await asyncio.sleep(self._retry_delay(err, attempt))
