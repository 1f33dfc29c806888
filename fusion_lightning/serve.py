"""`python -m fusion_lightning.serve config=pipeline.yaml [host=127.0.0.1] [port=8000]`

The fused pipeline (see fusion_lightning/serving/pipeline.py) as an OpenAI-compatible server, so
existing clients use fusion by changing only `base_url` and `model`:

    POST /v1/chat/completions  {"model": "fusion-router", "messages": [...], "max_tokens": 256}
    GET  /v1/models            fusion-router, plus each backend by name (bypasses the router)

The router picks the backend per request; the reply's `model` is `fusion-router` and
`fusion.routed_to` (and the `X-Fusion-Model` header) name the backend that answered. Optional
request fields `task` and `metric` help the router and set the answer format. With
`api_key_env=NAME` the server requires `Authorization: Bearer <$NAME>`. Standard library
`http.server` (threaded); streaming and n > 1 are refused with a 400.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fusion_lightning.cli import parse_args
from fusion_lightning.config import ConfigError
from fusion_lightning.serving.pipeline import PIPELINE_KEYS, FusedPipeline

MODEL_NAME = "fusion-router"
DEFAULTS: dict[str, Any] = {**{k: None for k in PIPELINE_KEYS}, "backends": [], "sampling": {},
                            "host": "127.0.0.1", "port": 8000, "api_key_env": None}


class _RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("stream"):
        raise _RequestError(400, "streaming is not supported by this server; send stream=false")
    if int(body.get("n") or 1) != 1:
        raise _RequestError(400, "only n=1 is supported")
    out = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        out["max_new_tokens"] = int(max_tokens)
    for k in ("temperature", "top_p", "seed", "stop"):
        if body.get(k) is not None:
            out[k] = body[k]
    return out


def make_server(pipeline: FusedPipeline, host: str = "127.0.0.1", port: int = 0,
                api_key_env: str | None = None) -> ThreadingHTTPServer:
    """A threaded HTTP server answering with `pipeline` (port 0 = any free port); call serve_forever()."""
    models = [MODEL_NAME, *pipeline.backends]

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: _RequestError) -> None:
            self._send(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}})

        def _check_key(self) -> None:
            if api_key_env is None:
                return
            key = os.environ.get(api_key_env)
            if not key or self.headers.get("Authorization", "") != f"Bearer {key}":
                raise _RequestError(401, "missing or wrong API key", "authentication_error")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            try:
                self._check_key()
                if self.path.rstrip("/") != "/v1/models":
                    raise _RequestError(404, f"no route GET {self.path}", "not_found")
                self._send(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fusion_lightning"} for m in models]})
            except _RequestError as e:
                self._error(e)

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            try:
                self._check_key()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise _RequestError(404, f"no route POST {self.path}", "not_found")
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise _RequestError(400, f"request body is not JSON: {e.msg}") from None
                if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
                    raise _RequestError(400, "'messages' must be a non-empty list")
                model = body.get("model", MODEL_NAME)
                if model not in models:
                    raise _RequestError(404, f"model {model!r} not found; available: {models}", "model_not_found")
                try:
                    out = pipeline.run(conversations=[body["messages"]], tasks=[body.get("task")],
                                       metrics=[body.get("metric")],
                                       model=None if model == MODEL_NAME else model, **_sampling(body))[0]
                except (ValueError, TypeError) as e:
                    raise _RequestError(400, str(e)) from None
                if out.error:
                    raise _RequestError(502, f"backend {out.model} failed: {out.error}", "upstream_error")
            except _RequestError as e:
                return self._error(e)
            except Exception as e:  # noqa: BLE001 - a backend failure must answer, not hang the client
                return self._error(_RequestError(502, f"{type(e).__name__}: {e}", "upstream_error"))
            usage = {"prompt_tokens": out.input_tokens or 0, "completion_tokens": out.output_tokens or 0}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": "stop"}],
                "usage": usage, "fusion": {"routed_to": out.model, "stages": pipeline.stages},
            }, {"X-Fusion-Model": out.model})

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request on stderr
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(pipeline: FusedPipeline, host: str = "127.0.0.1", port: int = 0,
                    api_key_env: str | None = None) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread; returns it and its base URL (…/v1). `server.shutdown()` stops it."""
    server = make_server(pipeline, host, port, api_key_env)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v1"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = parse_args(argv, DEFAULTS, file_keys=("backends", "router", "thought", "sampling"))
        server_keys = ("host", "port", "api_key_env")
        pipeline = FusedPipeline.from_config({k: v for k, v in cfg.items() if k not in server_keys and v is not None})
        server = make_server(pipeline, cfg["host"], int(cfg["port"]), cfg["api_key_env"])
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"serving {MODEL_NAME} (stages: {', '.join(pipeline.stages) or 'none'}; backends: "
          f"{', '.join(pipeline.backends)}) at http://{host}:{port}/v1")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
