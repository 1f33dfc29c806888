"""`python -m fusion_lightning.serve config=pipeline.yaml [host=127.0.0.1] [port=8000] [key=value ...]`

The fused pipeline (see fusion_lightning/serving/pipeline.py) as an OpenAI-compatible server
(Starlette on uvicorn; the routes are in fusion_lightning/serving/server.py), so existing clients use
fusion by changing only `base_url` and `model`:

    POST /v1/chat/completions  {"model": "fusion-router", "messages": [...], "max_tokens": 256,
                                "stream": true, "n": 2, "task": "gsm8k", "metric": "GSM8K"}
    GET  /v1/models            fusion-router, plus each backend by name (bypasses the router)
    POST /v1/feedback          {"id": "<chat completion id>", "score": 1.0}: scores a logged answer
    GET  /health, GET /metrics (Prometheus)

The router picks the backend per request, through its policy (`router.explore=epsilon router.epsilon=0.1`
explores; the request log records each answer's `propensity` and `policy`); the reply's `model` is
`fusion-router` and `fusion.routed_to` (and the `X-Fusion-Model` header) name the backend that
answered. Keys besides
the pipeline's (backends, router, thought, default, catalog, sampling; all in recipes/serve.yaml):

    host, port           where to listen (127.0.0.1:8000)
    api_key_env=NAME     require `Authorization: Bearer <$NAME>` on /v1 routes
    batch_wait_ms=5      how long a request waits for others to be routed (and generated locally) with
    max_batch=64         the most requests routed in one batch (local models: their batch_size)
    log_dir=DIR          the request log: every answer as an LLMFusionBench record; feedback scores them;
                         `fit data=llmfusionbench data.path=DIR` trains on the scored ones
    log_max_mb=64        start a new request-log file past this size
    log_task=served      the task written for a request whose task neither the client nor the router knows
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

from fusion_lightning.config import ConfigError, compose_command, recipes_dir
from fusion_lightning.serving.pipeline import FusedPipeline
from fusion_lightning.serving.request_log import DEFAULT_TASK, RequestLog
from fusion_lightning.serving.server import MODEL_NAME, build_app

__all__ = ["MODEL_NAME", "ServerThread", "build_app", "compose", "main", "serve_in_thread"]
SERVER_KEYS = ("host", "port", "api_key_env", "batch_wait_ms", "max_batch", "log_dir", "log_max_mb", "log_task")
FILE_KEYS = ("backends", "router", "thought", "sampling")  # a .yaml/.json file name as their value: its content


def compose(argv: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """recipes/serve.yaml with `key=value` arguments -> a plain dict; ConfigError (one line) on any problem."""
    return compose_command("serve", argv, file_keys=FILE_KEYS)


def _app_kwargs(api_key_env: str | None = None, batch_wait_ms: float = 5.0, max_batch: int = 64,
                log_dir: str | None = None, log_max_mb: float = 64, log_task: str = DEFAULT_TASK) -> dict[str, Any]:
    log = RequestLog(log_dir, max_bytes=int(float(log_max_mb) * (1 << 20))) if log_dir else None
    return {"api_key_env": api_key_env, "batch_wait_ms": float(batch_wait_ms), "max_batch": int(max_batch),
            "request_log": log, "default_task": str(log_task)}


def _config(app, **kw: Any):
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, backlog=4096, timeout_keep_alive=30,
                          lifespan="on", **kw)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                backlog=4096)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """A uvicorn server on its own thread and event loop (tests, notebooks): `shutdown()` stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app, self.sock = app, _listen(host, port)
        self.server = uvicorn.Server(_config(app))
        self.host, self.port = host, self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name=f"uvicorn-{self.port}")

    @property
    def fusion(self):
        return self.app.state.fusion

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        for _ in range(int(timeout / 0.01)):
            if self.server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self.server.started:
            raise RuntimeError(f"the server on port {self.port} did not start")
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def server_close(self) -> None:
        self.sock.close()


def serve_in_thread(pipeline: FusedPipeline, host: str = "127.0.0.1", port: int = 0,
                    api_key_env: str | None = None, **kwargs: Any) -> tuple[ServerThread, str]:
    """Start a server on a daemon thread; returns it and its base URL (…/v1). `server.shutdown()` stops
    it. `kwargs`: batch_wait_ms, max_batch, log_dir, log_max_mb, log_task (as on the command line)."""
    server = ServerThread(build_app(pipeline, **_app_kwargs(api_key_env, **kwargs)), host, port).start()
    return server, f"http://{host}:{server.port}/v1"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print((recipes_dir() / "serve.yaml").read_text(encoding="utf-8"))
        return 0
    try:
        cfg = compose(argv)
        pipeline = FusedPipeline.from_config({k: v for k, v in cfg.items() if k not in SERVER_KEYS and v is not None})
        app = build_app(pipeline, **_app_kwargs(**{k: cfg[k] for k in SERVER_KEYS if k not in ("host", "port")}))
        sock = _listen(str(cfg["host"]), int(cfg["port"]))
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import uvicorn

    host, port = sock.getsockname()[:2]
    print(f"serving {MODEL_NAME} (stages: {', '.join(pipeline.stages) or 'none'}; backends: "
          f"{', '.join(pipeline.backends)}) at http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.Server(_config(app)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
