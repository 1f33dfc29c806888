"""A small OpenAI-compatible chat-completions server for tests (127.0.0.1, ephemeral port, in a thread).

    with FakeOpenAIServer(api_key="sk-test") as server:
        backend = OpenAICompatibleBackend(server.base_url, "echo", api_key_env=...)
        server.faults["q3"] = ["429", "500", "timeout", "malformed"]   # consumed in order
        ...
        assert server.requests["q3"] == 5

Answers are rule-based: `answer(messages) -> str` (default: "echo: <last user message>"), cut to
`max_tokens` whitespace tokens; `usage` counts whitespace tokens. Faults are configured per prompt
(the last user message) in `faults`, each applied to one request in order:

    "429"         429 with `Retry-After: <retry_after>` (omitted when retry_after is None)
    "500", "503"  a server error with an OpenAI-style error body
    "timeout"     sleep `slow_s` before answering (exceeds a short client timeout)
    "malformed"   200 with a body that is not JSON
    "400"         400 with {"error": {"message": "bad request: ...", "type": "invalid_request_error"}}
    "disconnect"  close the connection without a response

`fail_after=K` makes every request after the first K successful answers fail with 503 (a server
that goes down mid-batch). Requests without `Authorization: Bearer <api_key>` get 401 (whose message
echoes the offered key, as some real servers do). `requests` counts requests per prompt,
`max_in_flight` is the most concurrent requests seen, `bodies` holds every request body received.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def echo_answer(messages: list[dict]) -> str:
    return f"echo: {last_user(messages)}"


def last_user(messages: list[dict]) -> str:
    return next((str(m["content"]) for m in reversed(messages) if m.get("role") == "user"), "")


class FakeOpenAIServer:
    def __init__(
        self,
        api_key: str | None = "test-key",
        answer: Callable[[list[dict]], str] = echo_answer,
        delay_s: float = 0.0,
        retry_after: str | None = "0",
        slow_s: float = 1.0,
    ):
        self.api_key, self.answer, self.delay_s = api_key, answer, delay_s
        self.retry_after, self.slow_s = retry_after, slow_s
        self.faults: dict[str, list[str]] = {}
        self.fail_after: int | None = None
        self.requests: Counter[str] = Counter()
        self.successes = 0
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock, self._closing = threading.Lock(), threading.Event()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling -------------------------------------------------------------------------
    def _next_fault(self, prompt: str) -> str | None:
        with self._lock:
            queue = self.faults.get(prompt)
            if queue:
                return queue.pop(0)
            if self.fail_after is not None and self.successes >= self.fail_after:
                return "503"
        return None

    def _respond(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))  # read first: never reset the client
        if h.path.rstrip("/") != "/v1/chat/completions":
            return _send(h, 404, {"error": {"message": f"no route {h.path}"}})
        auth = h.headers.get("Authorization", "")
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            offered = auth.removeprefix("Bearer ")
            return _send(h, 401, {"error": {"message": f"Incorrect API key provided: {offered}"}})
        body = json.loads(raw)
        prompt = last_user(body["messages"])
        with self._lock:
            self.requests[prompt] += 1
            self.bodies.append(body)
        fault = self._next_fault(prompt)
        if fault == "429":
            headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
            return _send(h, 429, {"error": {"message": "rate limited"}}, headers)
        if fault in ("500", "503"):
            return _send(h, int(fault), {"error": {"message": "internal error"}})
        if fault == "400":
            return _send(h, 400, {"error": {"message": f"bad request: {prompt}", "type": "invalid_request_error"}})
        if fault == "malformed":
            return _send(h, 200, b'{"choices": [ this is not json')
        if fault == "disconnect":
            h.close_connection = True
            return h.connection.shutdown(2)
        if fault == "timeout":
            self._closing.wait(self.slow_s)
        text = self.answer(body["messages"])
        words = text.split(" ")
        finish = "stop"
        if body.get("max_tokens") and len(words) > body["max_tokens"]:
            text, finish = " ".join(words[: body["max_tokens"]]), "length"
        n_in = sum(len(str(m["content"]).split()) for m in body["messages"])
        with self._lock:
            self.successes += 1
        _send(h, 200, {
            "id": f"chatcmpl-{self.successes}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": len(text.split()),
                      "total_tokens": n_in + len(text.split())},
        })

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay_s:
                        server._closing.wait(server.delay_s)
                    server._respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args):  # quiet
                pass

        return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up is not a test failure
        pass


def _send(h: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)
