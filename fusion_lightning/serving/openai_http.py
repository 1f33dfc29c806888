"""Generation through any server that speaks the OpenAI chat-completions API (OpenAI, vLLM, SGLang,
TGI, llama.cpp, LiteLLM, ...): `POST {base_url}/chat/completions`.

Requests run concurrently (a thread pool of `max_concurrency`), each with a timeout; 429, 5xx,
timeouts, connection errors and malformed responses are retried with exponential backoff and
jitter (`Retry-After` honoured); other 4xx are errors that name the status and the server's message.
Every answer is written to a disk cache as it arrives (see `cache.py`), so a re-run sends only
what is not cached yet. The API key is read from the environment variable named by `api_key_env`
at request time: it is never stored on the object, written to the cache or put in a message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from .base import Generation, Prompt, Sampling, resolve_sampling, to_messages, truncate_at_stop
from .cache import GenerationCache, request_key

log = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = ".cache/fusion_lightning/generations"
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class BackendError(RuntimeError):
    """A request that failed for good: a non-retryable status, or retries exhausted."""


class _Cancelled(BackendError):
    """A request not sent (or not retried) because the batch is failing or was interrupted."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _parse_retry_after(value: str | None) -> float | None:
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


def _server_message(raw: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself (shortened)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text).get("error", text)
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        pass
    return text[:500] or "(empty body)"


class OpenAICompatibleBackend:
    """`base_url` like "https://api.openai.com/v1" or "http://localhost:8000/v1"; `model` is sent as
    the request's model; `name` (default: `model`) is the model name in logs. `api_key_env` names
    the environment variable holding the key (None: no Authorization header). `cache_dir=None`
    disables the cache. `errors="raise"` raises `BackendError` for the first prompt that fails for
    good (after in-flight requests finish and are cached); `errors="return"` returns a
    `Generation` with `error` set for each failed prompt instead. With the cache on, identical
    requests in one call are sent once and share the answer."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        name: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        max_backoff: float = 60.0,
        retry_seed: int | None = None,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        sampling: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        errors: str = "raise",
        progress: bool = True,
    ):
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_base < 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_base >= 0")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"environment variable {api_key_env} (named by api_key_env) is not set or empty")
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, name or model
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env, self.max_concurrency, self.timeout_s = api_key_env, max_concurrency, timeout_s
        self.max_retries, self.backoff_base, self.max_backoff = max_retries, backoff_base, max_backoff
        self.default_sampling, self.extra_body = dict(sampling or {}), dict(extra_body or {})
        resolve_sampling(self.default_sampling, {})  # fail early on bad defaults
        self.cache = GenerationCache(cache_dir) if cache_dir is not None else None
        self.errors, self.progress = errors, progress
        self._rng, self._rng_lock = random.Random(retry_seed), threading.Lock()
        self._sleep = time.sleep  # tests replace it to record the backoff delays

    def __repr__(self) -> str:
        cache = None if self.cache is None else str(self.cache.root)
        return (
            f"OpenAICompatibleBackend(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, cache_dir={cache!r})"
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

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One attempt. Returns the parsed answer; raises `_Retryable` or `BackendError`."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                msg = self._redact(_server_message(e.read()))
            except (OSError, http.client.HTTPException):
                msg = "(unreadable body)"
            if e.code in RETRYABLE_STATUS or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {msg}", _parse_retry_after(e.headers.get("Retry-After"))) from None
            hint = f" (check the key in ${self.api_key_env})" if e.code in (401, 403) and self.api_key_env else ""
            raise BackendError(f"{self.name}: HTTP {e.code} from POST {self.url}: {msg}{hint}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
            raise _Retryable(f"connection error: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        latency = time.perf_counter() - start
        try:
            data = json.loads(raw)
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            finish = data["choices"][0].get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = self._redact(raw[:200].decode("utf-8", errors="replace"))
            raise _Retryable(f"malformed response: {snippet!r}") from None
        return {
            "text": truncate_at_stop(str(text), body.get("stop") or ()),
            "input_tokens": usage.get("prompt_tokens"),
            "output_tokens": usage.get("completion_tokens"),
            "latency_s": latency,
            "finish_reason": finish,
        }

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()  # x0.5 .. x1.5
        return min(self.backoff_base * 2**attempt, self.max_backoff) * jitter

    def _call(self, body: dict[str, Any], stop: threading.Event | None = None) -> dict[str, Any]:
        """One request with retries: `max_retries` retries after the first attempt; no new attempt
        once `stop` is set (the batch is failing or interrupted)."""
        for attempt in range(self.max_retries + 1):
            if attempt and stop is not None and stop.is_set():
                raise _Cancelled(f"{self.name}: cancelled before retry {attempt}")
            try:
                return self._post(body)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise BackendError(
                        f"{self.name}: gave up after {attempt + 1} attempts at POST {self.url}; last error: {e}"
                    ) from None
                delay = self._delay(attempt, e.retry_after)
                log.info("%s: %s; retry %d/%d in %.2f s", self.name, e, attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _complete(self, body: dict[str, Any], key: str, stop: threading.Event) -> dict[str, Any]:
        if stop.is_set():
            raise _Cancelled(f"{self.name}: cancelled")
        try:
            response = self._call(body, stop)
        except BackendError as e:
            if self.errors == "raise" and not isinstance(e, _Cancelled):
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
                results[i] = _generation(record["response"], cached=True)
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
                    if self.errors == "return" or not isinstance(e, _Cancelled):
                        failures.append((idx[0], e))  # with "raise", a failure has set `stop`: nothing
                        # new is sent; requests in flight finish (and are cached) but are not retried
                    for i in idx:
                        results[i] = Generation("", None, None, 0.0, error=str(e))
                    continue
                for i in idx:
                    results[i] = _generation(response, cached=False)
        finally:
            stop.set()  # on an interruption too: in-flight requests finish, nothing new starts
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        if failures and self.errors == "raise":
            first, err = failures[0]
            raise BackendError(f"prompt {first} (of {len(bodies)}): {err}") from None
        return results  # type: ignore[return-value]


def _generation(response: Mapping[str, Any], cached: bool) -> Generation:
    return Generation(
        text=response["text"],
        input_tokens=response.get("input_tokens"),
        output_tokens=response.get("output_tokens"),
        latency_s=float(response.get("latency_s") or 0.0),
        cached=cached,
    )
