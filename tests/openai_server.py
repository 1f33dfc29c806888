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
    "cut"         (stream=true) send the first two pieces of the answer, then close the connection

`stream=true` answers as OpenAI does: server-sent events, one `chat.completion.chunk` per word (the
first with the role), one with the finish reason, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. `token_delay_s` paces the answer like a model's
decoding: a stream sends each word that long after the last, a plain answer waits for all of them. HTTP/1.1 with
keep-alive (streams are chunked), one thread per connection, a listen backlog of 1024: it holds
hundreds of concurrent clients.

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


def loopback_without_proxy(monkeypatch) -> None:
    """Requests to 127.0.0.1 never go through a proxy the environment may name."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


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
        token_delay_s: float = 0.0,
        port: int = 0,
    ):
        self.api_key, self.answer, self.delay_s, self.token_delay_s = api_key, answer, delay_s, token_delay_s
        self.retry_after, self.slow_s = retry_after, slow_s
        self.faults: dict[str, list[str]] = {}
        self.fail_after: int | None = None
        self.requests: Counter[str] = Counter()
        self.successes = 0
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock, self._closing = threading.Lock(), threading.Event()
        self._httpd = _QuietServer(("127.0.0.1", port), self._handler_class())
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
        usage = {"prompt_tokens": n_in, "completion_tokens": len(text.split()), "total_tokens": n_in + len(text.split())}
        if body.get("stream"):
            return self._stream(h, body, text, finish, usage, cut=fault == "cut")
        if self.token_delay_s:
            self._closing.wait(self.token_delay_s * len(text.split(" ")))
        with self._lock:
            self.successes += 1
        _send(h, 200, {
            "id": f"chatcmpl-{self.successes}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        })

    def _stream(self, h: BaseHTTPRequestHandler, body: dict, text: str, finish: str, usage: dict, cut: bool) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        head = {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model")}
        words = text.split(" ")
        pieces = [{"role": "assistant", "content": ""}] + [{"content": w if i == 0 else f" {w}"}
                                                           for i, w in enumerate(words)]
        for i, delta in enumerate(pieces):
            if cut and i == 3:
                h.close_connection = True
                return h.connection.shutdown(2)
            if i and self.token_delay_s:
                self._closing.wait(self.token_delay_s)
            _event(h, {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        _event(h, {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            _event(h, {**head, "choices": [], "usage": usage})
        _event(h, "[DONE]")
        h.wfile.write(b"0\r\n\r\n")
        with self._lock:
            self.successes += 1

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: no new connection (and TIME_WAIT port) per request
            timeout = 60  # an idle keep-alive connection is closed after a minute
            disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms wait for a delayed ACK between writes
            wbufsize = -1  # buffered: headers and body leave in one write (flushed after each request)

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
    request_queue_size = 1024  # the listen backlog (socketserver's default of 5 resets clients under load)

    def handle_error(self, request, client_address):  # a client that hung up is not a test failure
        pass


def _event(h: BaseHTTPRequestHandler, payload) -> None:
    """One server-sent event as one HTTP chunk."""
    data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
    h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    h.wfile.flush()


def _send(h: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)
