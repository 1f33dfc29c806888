"""The OpenAI chat-completions wire format the server speaks: the request body parsed and checked
(`parse_chat`), OpenAI error bodies and status codes (`APIError`), server-sent events and `usage`.
Kept apart from the app (server.py) so the protocol reads in one place."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from .base import Generation, resolve_sampling, to_messages
from .upstream import BackendError, QueueFull

MODEL_NAME = "fusion-router"
MAX_N = 16


class APIError(Exception):
    """An answer with an OpenAI error body (and `headers`, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def upstream_error(e: BaseException) -> APIError:
    """A backend's failure as the client's error: 503 `upstream_queue_full` with `Retry-After` for a
    request the backend refused at once (its queue is full: try again), else 502 `upstream_error`."""
    if isinstance(e, QueueFull):
        return APIError(503, f"the backend is at capacity, try again later: {e}", "server_error",
                        "upstream_queue_full", headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})
    msg = str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}"
    return APIError(502, f"the backend failed: {msg}", "upstream_error", "upstream_error")


@dataclass
class ChatRequest:
    messages: list[dict]
    model: str
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    metric: str | None = None


def parse_chat(body: Any, models: Sequence[str], defaults: Mapping[str, Any]) -> ChatRequest:
    """A chat-completions body -> ChatRequest; APIError(400/404) naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    try:
        messages = to_messages(messages)
    except TypeError as e:
        raise APIError(400, str(e), param="messages") from None
    if not any(m.get("role") == "user" for m in messages):
        raise APIError(400, "'messages' needs at least one message with role 'user'", param="messages")
    model = body.get("model") or MODEL_NAME
    if model not in models:
        raise APIError(404, f"model {model!r} not found; available: {list(models)}",
                       "invalid_request_error", "model_not_found", "model")
    n = body.get("n") if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be an integer from 1 to {MAX_N}, got {n!r}", param="n")
    sampling: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sampling["max_new_tokens"] = max_tokens
    for k in ("temperature", "top_p", "seed", "stop"):
        if body.get(k) is not None:
            sampling[k] = body[k]
    try:
        resolve_sampling({**defaults, **sampling}, {})
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e)) from None
    options = body.get("stream_options") or {}
    for k in ("task", "metric"):
        if body.get(k) is not None and not isinstance(body[k], str):
            raise APIError(400, f"'{k}' must be a string", param=k)
    return ChatRequest(messages, model, n, bool(body.get("stream")),
                       bool(isinstance(options, dict) and options.get("include_usage")),
                       {**defaults, **sampling}, body.get("task"), body.get("metric"))


def sse_event(payload: Any) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n".encode()



def usage_of(gens: Sequence[Generation]) -> dict[str, int]:
    prompt = gens[0].input_tokens or 0 if gens else 0  # the same prompt for every choice
    completion = sum(g.output_tokens or 0 for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
