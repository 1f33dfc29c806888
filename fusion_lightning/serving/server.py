"""The fused pipeline as an OpenAI-compatible ASGI app (Starlette on uvicorn; see `serve.py` for the CLI).

    POST /v1/chat/completions   OpenAI chat completions: `stream` (server-sent events, `data: [DONE]`,
                                `stream_options.include_usage`), `n`, `usage`; plus optional `task`
                                and `metric` (help the router, set the answer format)
    GET  /v1/models[/{id}]      fusion-router, plus each backend by name (bypasses the router)
    POST /v1/feedback           {"id": "chatcmpl-...", "score": 0.8, "choice": 0, "judge": null}:
                                scores a logged answer (needs a request log)
    GET  /health                liveness (and the worker process's pid), no key needed
    GET  /metrics               Prometheus text format, no key needed

Each request is routed together with those that arrive within `batch_wait_ms` (up to `max_batch`):
one `pipeline.plan` call embeds and scores the batch on the routing worker thread, off the event
loop. HTTP backends then answer each request on the event loop (httpx, streamed through as the
upstream sends it); in-process backends batch the same way, one `generate` call for the requests
that arrive together (at most the backend's `batch_size` rows), their streams fed row by row.

Routing draws from the pipeline's policy (router `explore`: none, epsilon, softmax; pipeline.py);
each logged answer carries the drawn model's probability (`propensity`) and the policy's id
(`policy`), and /metrics counts the choices that were not the router's argmax (`fusion_explored_total`).

The reply's `model` is the model asked for; `fusion.routed_to` (in the body and in every stream
chunk) and the `X-Fusion-Model` header name the backend that answered; `X-Request-Id` is the id
that feedback names. Errors are OpenAI error bodies (`{"error": {"message", "type", "param",
"code"}}`) with OpenAI's status codes; an upstream failure is a 502, or an error event in a stream
that has begun. With `api_key_env` every /v1 route needs `Authorization: Bearer <$api_key_env>`.

Overload: an HTTP backend admits at most its `max_concurrency` calls in flight and `max_queue`
waiting (serve: `upstream_concurrency`, `upstream_queue`); a call past that is refused at once
(`QueueFull`) and the request is answered with 503, `code: "upstream_queue_full"` and a
`Retry-After` header, instead of waiting. A stream refused before its first piece gets that 503
response too (the upstream call starts before the response does); a refusal after a stream began
(one of n > 1 samples) is an error event with that code. /metrics shows each backend's calls in
flight and waiting (`fusion_upstream_in_flight`, `fusion_upstream_queued`) and the refusals
(`fusion_upstream_rejected_total`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .base import Chunk, Generation
from .batching import GenerationRequest, MicroBatcher, generate_requests
from .chat_api import MODEL_NAME, APIError, ChatRequest, parse_chat, sse_event, upstream_error, usage_of
from .metrics import ServerMetrics
from .request_log import DEFAULT_TASK, RequestLog, served_record

log = logging.getLogger(__name__)


def _nth(sampling: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Sample i of n: its own seed when a seed is given."""
    out = dict(sampling)
    if i and out.get("seed") is not None:
        out["seed"] = int(out["seed"]) + i
    return out


async def _reindex(stream: AsyncIterator[Chunk], i: int) -> AsyncIterator[Chunk]:
    async for c in stream:
        yield Chunk(i, c.text, c.generation)


async def _merge(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[Chunk]:
    """Several streams as one, chunks in the order they arrive; the first failure ends it."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Chunk]) -> None:
        try:
            async for c in stream:
                await q.put(c)
            await q.put(done)
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await q.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


class _HTTPRunner:
    """An HTTP backend: each request on the event loop; n > 1 is n upstream requests (each sample has
    its own token counts and cost; upstreams without `n` work too), not cached."""

    def __init__(self, backend: Any):
        self.backend = backend

    async def complete(self, prompt: Any, n: int, sampling: Mapping[str, Any]) -> list[Generation]:
        calls = [self.backend.acomplete(prompt, cache=n == 1, **_nth(sampling, i)) for i in range(n)]
        return list(await asyncio.gather(*calls))

    def stream(self, prompt: Any, n: int, sampling: Mapping[str, Any]) -> AsyncIterator[Chunk]:
        if n == 1:
            return self.backend.astream(prompt, **sampling)
        return _merge([_reindex(self.backend.astream(prompt, cache=False, **_nth(sampling, i)), i) for i in range(n)])

    async def close(self) -> None:
        await self.backend.aclose()


class _BatchedRunner:
    """An in-process backend behind a MicroBatcher: concurrent requests are one `generate` call."""

    def __init__(self, backend: Any, wait_ms: float, metrics: ServerMetrics):
        self.backend = backend
        if hasattr(backend, "progress"):
            backend.progress = False  # no progress bar per batch in a server's log
        self.batcher = MicroBatcher(lambda reqs: generate_requests(backend, reqs),
                                    max_batch=int(getattr(backend, "batch_size", 8)), wait_ms=wait_ms,
                                    name=f"generate-{backend.name}", on_batch=metrics.batch(f"generate:{backend.name}"))

    async def complete(self, prompt: Any, n: int, sampling: Mapping[str, Any]) -> list[Generation]:
        return await self.batcher.run(GenerationRequest(prompt, n, dict(sampling)))

    async def stream(self, prompt: Any, n: int, sampling: Mapping[str, Any]) -> AsyncIterator[Chunk]:
        loop, q, end = asyncio.get_running_loop(), asyncio.Queue(), object()

        def sink(i: int):
            return lambda text: loop.call_soon_threadsafe(q.put_nowait, Chunk(i, text))

        fut = asyncio.wrap_future(self.batcher.submit(GenerationRequest(prompt, n, dict(sampling),
                                                                        [sink(i) for i in range(n)])))
        fut.add_done_callback(lambda _: q.put_nowait(end))  # after every piece: both go through the loop in order
        while (item := await q.get()) is not end:
            yield item
        for i, g in enumerate(fut.result()):
            yield Chunk(i, "", g)

    async def close(self) -> None:
        await asyncio.to_thread(self.batcher.close)


@dataclass
class _RouteItem:
    messages: list[dict]
    task: str | None
    metric: str | None
    model: str | None  # a backend asked for by name: not routed


class FusionServer:
    """The app's state: the pipeline, its routing batcher, one runner per backend, the request log."""

    def __init__(self, pipeline: Any, *, api_key_env: str | None = None, batch_wait_ms: float = 5.0,
                 max_batch: int = 64, request_log: RequestLog | None = None, default_task: str = DEFAULT_TASK):
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"environment variable {api_key_env} (named by api_key_env) is not set or empty")
        self.pipeline, self.api_key_env, self.default_task = pipeline, api_key_env, default_task
        self.models = [MODEL_NAME, *pipeline.backends]
        self.metrics = ServerMetrics()
        self.metrics.watch_upstreams(pipeline.backends)
        self.request_log = request_log
        self.router = MicroBatcher(self._plan, max_batch=max_batch, wait_ms=batch_wait_ms, name="route",
                                   on_batch=self.metrics.batch("route"))
        self.runners = {name: _HTTPRunner(b) if hasattr(b, "astream") and hasattr(b, "acomplete")
                        else _BatchedRunner(b, batch_wait_ms, self.metrics) for name, b in pipeline.backends.items()}

    def _plan(self, items: list[_RouteItem]) -> list[Any]:
        """The routing worker's batch: one `plan` call; should it fail, each item alone (a bad one fails alone)."""
        def plan(batch: list[_RouteItem]) -> list[Any]:
            router = self.pipeline.router
            before = getattr(router, "encode_seconds", 0.0)
            plans = self.pipeline.plan(conversations=[i.messages for i in batch], tasks=[i.task for i in batch],
                                       metrics=[i.metric for i in batch], models=[i.model for i in batch])
            encode = getattr(router, "encode_seconds", 0.0) - before
            for p in plans:  # every request of the batch waited for the whole batch's encode
                p.encode_s = encode
            return plans
        try:
            return plan(items)
        except Exception:  # noqa: BLE001
            if len(items) == 1:
                raise
        out: list[Any] = []
        for item in items:
            try:
                out.append(plan([item])[0])
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    async def close(self) -> None:
        await asyncio.to_thread(self.router.close)
        for runner in self.runners.values():
            await runner.close()
        if self.request_log is not None:
            await asyncio.to_thread(self.request_log.close)

    # -- request handling ---------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key_env is None:
            return
        key = os.environ.get(self.api_key_env, "")
        offered = request.headers.get("authorization", "")
        if not key or not hmac.compare_digest(offered.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", "invalid_api_key")

    @staticmethod
    async def json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def _log(self, rid: str, req: ChatRequest, plan: Any, gens: Sequence[Generation | None], texts: Sequence[str],
             latency: float, error: str | None = None) -> None:
        if self.request_log is None:
            return
        info = self.pipeline.catalog[plan.model] if self.pipeline.catalog and plan.model in self.pipeline.catalog \
            else None
        records = []
        for i in range(req.n):
            g = gens[i] if i < len(gens) else None
            n_in, n_out = (g.input_tokens, g.output_tokens) if g else (None, None)
            records.append(served_record(
                request_id=rid, choice=i, query=plan.query, task=plan.task, task_source=plan.task_source,
                model=plan.model, served_as=req.model, response=g.text if g else texts[i], input_tokens=n_in,
                output_tokens=n_out, latency_s=latency, stream=req.stream, metric=req.metric,
                cost_usd=self.pipeline.call_cost(plan.model, n_in, n_out) if g else None,
                prices=(info.input_price, info.output_price) if info else (None, None),
                finish_reason=g.finish_reason if g else None, error=error, default_task=self.default_task,
                propensity=plan.propensity, policy=plan.policy))
        self.request_log.append(records)

    def _done(self, endpoint: str, status: int | str, stream: bool, start: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint, str(stream).lower()).observe(time.perf_counter() - start)
        self.metrics.in_flight.dec()

    async def chat(self, request: Request) -> Response:
        start, stream = time.perf_counter(), False
        self.metrics.in_flight.inc()
        try:
            self.check_key(request)
            req = parse_chat(await self.json_body(request), self.models, self.pipeline.sampling)
            stream = req.stream
            parsed = time.perf_counter()
            try:
                plan = await self.router.run(_RouteItem(req.messages, req.task, req.metric,
                                                        None if req.model == MODEL_NAME else req.model))
            except ValueError as e:
                raise APIError(400, str(e)) from None
            routed = time.perf_counter()
            self.metrics.stage("encode", plan.encode_s)
            self.metrics.stage("route", routed - parsed - plan.encode_s)  # waiting for the batch, scoring, prompt
            self.metrics.routed.labels(plan.model).inc()
            if plan.explored:
                self.metrics.explored.labels(plan.model).inc()
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            headers = {"X-Fusion-Model": plan.model, "X-Request-Id": rid}
            runner = self.runners[plan.model]
            if req.stream:
                chunks = runner.stream(plan.prompt, req.n, req.sampling)
                try:
                    first = await chunks.__anext__()  # a failure before any output is still an HTTP error
                except Exception as e:  # noqa: BLE001
                    self._log(rid, req, plan, [], [""] * req.n, time.perf_counter() - start, str(e))
                    raise upstream_error(e) from None
                body = self._events(rid, req, plan, first, chunks, start, routed)
                return StreamingResponse(body, media_type="text/event-stream",
                                         headers={**headers, "Cache-Control": "no-cache"})
            try:
                gens = await runner.complete(plan.prompt, req.n, req.sampling)
            except Exception as e:  # noqa: BLE001 - a backend failure must answer, not hang the client
                self._log(rid, req, plan, [], [""] * req.n, time.perf_counter() - start, str(e))
                raise upstream_error(e) from None
            answered = time.perf_counter()
            self.metrics.stage("upstream", answered - routed)
            self._log(rid, req, plan, gens, [], answered - start)
            self._count_tokens(plan.model, gens)
            usage = usage_of(gens)
            choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                        "finish_reason": g.finish_reason or "stop"} for i, g in enumerate(gens)]
            reply = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                     "choices": choices, "usage": usage,
                     "fusion": {"routed_to": plan.model, "stages": self.pipeline.stages}}
            response = JSONResponse(reply, headers=headers)
            self.metrics.stage("write_back", time.perf_counter() - answered)  # the log record and the JSON
            self._done("chat", 200, False, start)
            return response
        except APIError as e:
            self.metrics.errors.labels({502: "upstream", 503: "queue_full"}.get(e.status, "request")).inc()
            self._done("chat", e.status, stream, start)
            return e.response()
        except Exception as e:  # noqa: BLE001
            log.exception("internal error")
            self.metrics.errors.labels("internal").inc()
            self._done("chat", 500, stream, start)
            return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    def _count_tokens(self, model: str, gens: Sequence[Generation]) -> None:
        for kind, n in (("prompt", sum(g.input_tokens or 0 for g in gens)),
                        ("completion", sum(g.output_tokens or 0 for g in gens))):
            if n:
                self.metrics.tokens.labels(model, kind).inc(n)

    async def _events(self, rid: str, req: ChatRequest, plan: Any, first: Chunk, chunks: AsyncIterator[Chunk],
                      start: float, routed: float) -> AsyncIterator[bytes]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model}
        fusion = {"routed_to": plan.model, "stages": self.pipeline.stages}
        # every chunk is this JSON around its choices: encoded once, the text alone per chunk
        before = json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
        after = '], "fusion": ' + json.dumps(fusion, ensure_ascii=False) + (', "usage": null' if req.include_usage
                                                                            else "") + "}"

        def event(choices: list[dict], usage: dict | None = None) -> bytes:
            if usage is not None:
                return sse_event({**head, "choices": choices, "fusion": fusion, "usage": usage})
            return f"data: {before}{', '.join(json.dumps(c, ensure_ascii=False) for c in choices)}{after}\n\n".encode()

        def text_event(i: int, text: str) -> bytes:
            delta = json.dumps(text, ensure_ascii=False)
            return (f'data: {before}{{"index": {i}, "delta": {{"content": {delta}}}, "logprobs": null, '
                    f'"finish_reason": null}}{after}\n\n').encode()

        texts, gens = [""] * req.n, [None] * req.n
        status, error = 200, None

        def encode(c: Chunk) -> bytes:
            if c.generation is None:
                texts[c.index] += c.text
                return text_event(c.index, c.text)
            gens[c.index] = c.generation
            return event([{"index": c.index, "delta": {}, "logprobs": None,
                           "finish_reason": c.generation.finish_reason or "stop"}])

        try:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)]) + encode(first)
            async for c in chunks:  # a piece per upstream read: several events when the server is behind
                yield encode(c)
            done = [g for g in gens if g is not None]
            self._count_tokens(plan.model, done)
            yield (event([], usage_of(done)) if req.include_usage else b"") + sse_event("[DONE]")
        except Exception as e:  # noqa: BLE001 - mid-stream: the client gets an error event, the server goes on
            status, error = "stream_error", str(e)
            self.metrics.errors.labels("stream").inc()
            yield sse_event(upstream_error(e).body())
        except BaseException:  # the client went away (cancelled): logged, then let it unwind
            status, error = "client_closed", "the client closed the stream"
            raise
        finally:
            await _aclose(chunks)
            answered = time.perf_counter()
            self.metrics.stage("upstream", answered - routed)  # to the last piece (the client reads as it comes)
            self._log(rid, req, plan, gens if error is None else [], texts, answered - start, error)
            self.metrics.stage("write_back", time.perf_counter() - answered)
            self._done("chat", status, True, start)

    async def feedback(self, request: Request) -> Response:
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            self.check_key(request)
            body = await self.json_body(request)
            if self.request_log is None:
                raise APIError(400, "this server keeps no request log: start it with log_dir=DIR to take feedback")
            if not isinstance(body, dict) or not isinstance(body.get("id"), str):
                raise APIError(400, "feedback is {'id': '<chat completion id>', 'score': <0..1>, "
                                    "'choice': <index, default 0>, 'judge': <optional 0..1>}", param="id")
            choice = body.get("choice") or 0
            if isinstance(choice, bool) or not isinstance(choice, int):
                raise APIError(400, f"'choice' must be an integer, got {choice!r}", param="choice")
            try:
                rec = await asyncio.to_thread(self.request_log.feedback, body["id"], body.get("score"), choice,
                                              body.get("judge"))
            except KeyError:
                raise APIError(404, f"no request {body['id']!r} in the request log", code="request_not_found",
                               param="id") from None
            except ValueError as e:
                raise APIError(400, str(e)) from None
            self._done("feedback", 200, False, start)
            return JSONResponse({"id": body["id"], "object": "feedback", "choice": choice,
                                 "performance": rec["performance"], "llm_judge": rec["llm_judge"]})
        except APIError as e:
            self.metrics.errors.labels("request").inc()
            self._done("feedback", e.status, False, start)
            return e.response()


async def _aclose(stream: AsyncIterator[Chunk]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def build_app(pipeline: Any, **kwargs: Any) -> Starlette:
    """The ASGI app for `pipeline` (a FusedPipeline); `kwargs` go to FusionServer. `app.state.fusion` is it."""
    server = FusionServer(pipeline, **kwargs)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await server.close()

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        return APIError(status, f"{getattr(exc, 'detail', exc)}: {request.method} {request.url.path}", kind).response()

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "fusion_lightning"}

    async def models(request: Request) -> Response:
        try:
            server.check_key(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [model_card(m) for m in server.models]})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            server.check_key(request)
            if name not in server.models:
                raise APIError(404, f"model {name!r} not found", code="model_not_found", param="model")
        except APIError as e:
            return e.response()
        return JSONResponse(model_card(name))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": MODEL_NAME, "backends": list(pipeline.backends),
                             "stages": pipeline.stages, "pid": os.getpid()})

    async def metrics(request: Request) -> Response:
        data, content_type = server.metrics.render()
        return Response(data, media_type=content_type)

    routes = [Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/feedback", server.feedback, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.fusion = server
    return app
