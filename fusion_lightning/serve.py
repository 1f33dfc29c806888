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
    upstream_concurrency=256  the most calls in flight per OpenAI-compatible backend (each backend's own
                         `max_concurrency` wins; `collect`'s and the library's default is a polite 8)
    upstream_queue=1024  the most calls waiting for a slot per OpenAI-compatible backend (its own
                         `max_queue` wins; null: no bound); one more is answered at once with 503,
                         `code: upstream_queue_full` and `Retry-After`, not queued
    workers=1            server processes on the one port (below)

`workers=N` (N > 1): the parent binds the port and starts N processes (multiprocessing, spawn) that
each build the pipeline and run uvicorn on the inherited listening socket, so the kernel hands each
connection to one of them (what uvicorn's own `--workers` does, without needing an import string).
Worker i's exploration seed is `router.seed + i` (unseeded workers draw from the OS's entropy), so
the workers do not draw the same sequence. They share `log_dir`: appends are locked across processes,
and feedback for a request another worker answered is found in the files (looked for again for up
to 2 s while that worker's writer catches up). A worker that fails to start, or exits, stops them all
(exit status 1: let a process supervisor restart the service); SIGINT/SIGTERM stop them gracefully.
/metrics is per process (each worker counts what it served).
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from multiprocessing.connection import wait as wait_for
from typing import Any

from fusion_lightning.config import ConfigError, compose_command, recipes_dir
from fusion_lightning.serving.pipeline import FusedPipeline
from fusion_lightning.serving.request_log import DEFAULT_TASK, RequestLog
from fusion_lightning.serving.server import MODEL_NAME, build_app

__all__ = ["MODEL_NAME", "ServerThread", "app_from_config", "build_app", "compose", "main", "pipeline_config",
           "serve_in_thread"]
APP_KEYS = ("api_key_env", "batch_wait_ms", "max_batch", "log_dir", "log_max_mb", "log_task")
SERVER_KEYS = ("host", "port", *APP_KEYS, "upstream_concurrency", "upstream_queue", "workers")
FILE_KEYS = ("backends", "router", "thought", "sampling")  # a .yaml/.json file name as their value: its content
SHARED_LOG_FIND_WAIT_S = 2.0  # workers > 1: how long feedback looks for a request another worker is logging


def compose(argv: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """recipes/serve.yaml with `key=value` arguments -> a plain dict; ConfigError (one line) on any problem."""
    return compose_command("serve", argv, file_keys=FILE_KEYS)


def _app_kwargs(api_key_env: str | None = None, batch_wait_ms: float = 5.0, max_batch: int = 64,
                log_dir: str | None = None, log_max_mb: float = 64, log_task: str = DEFAULT_TASK,
                shared_log: bool = False) -> dict[str, Any]:
    log = RequestLog(log_dir, max_bytes=int(float(log_max_mb) * (1 << 20)),
                     find_wait_s=SHARED_LOG_FIND_WAIT_S if shared_log else 0.0) if log_dir else None
    return {"api_key_env": api_key_env, "batch_wait_ms": float(batch_wait_ms), "max_batch": int(max_batch),
            "request_log": log, "default_task": str(log_task)}


def _count(cfg: Mapping[str, Any], key: str, least: int, none_ok: bool = False) -> int | None:
    v = cfg.get(key)
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{key} must be an integer >= {least}{' or null' if none_ok else ''}, got {v!r}")
    return v


def pipeline_config(cfg: Mapping[str, Any], worker: int = 0) -> dict[str, Any]:
    """The pipeline's part of a composed serve config, as worker `worker` builds it: every
    `openai_compatible` backend without its own `max_concurrency` / `max_queue` gets
    `upstream_concurrency` / `upstream_queue`, and `router.seed` (when set) becomes `seed + worker`."""
    concurrency = _count(cfg, "upstream_concurrency", 1)
    queue = _count(cfg, "upstream_queue", 0, none_ok=True)
    out = {k: v for k, v in cfg.items() if k not in SERVER_KEYS and v is not None}
    backends = []
    for b in out.get("backends") or []:
        if isinstance(b, Mapping) and b.get("type") == "openai_compatible":
            b = dict(b)
            if b.get("max_concurrency") is None:
                b["max_concurrency"] = concurrency
            if b.get("max_queue") is None:
                b["max_queue"] = queue
        backends.append(b)
    if "backends" in out:
        out["backends"] = backends
    router = out.get("router")
    seed = router.get("seed") if isinstance(router, Mapping) else None
    if worker and isinstance(seed, int) and not isinstance(seed, bool):
        out["router"] = {**router, "seed": seed + worker}
    return out


def app_from_config(cfg: Mapping[str, Any], worker: int = 0):
    """The app of a composed serve config (`compose(argv)`), as worker `worker` of `cfg["workers"]` builds it."""
    pipeline = FusedPipeline.from_config(pipeline_config(cfg, worker))
    workers = _count(cfg, "workers", 1) if "workers" in cfg else 1
    return build_app(pipeline, **_app_kwargs(**{k: cfg[k] for k in APP_KEYS if k in cfg}, shared_log=workers > 1))


def _describe(app) -> str:
    pipeline = app.state.fusion.pipeline
    return f"stages: {', '.join(pipeline.stages) or 'none'}; backends: {', '.join(pipeline.backends)}"


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
        workers = _count(cfg, "workers", 1)
        if workers > 1:
            pipeline_config(cfg)  # the server's own keys are checked here; the pipeline's by each worker
            return _run_workers(cfg, _listen(str(cfg["host"]), int(cfg["port"])), workers)
        app = app_from_config(cfg)
        sock = _listen(str(cfg["host"]), int(cfg["port"]))
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import uvicorn

    host, port = sock.getsockname()[:2]
    print(f"serving {MODEL_NAME} ({_describe(app)}) at http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.Server(_config(app)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


# -- workers=N ------------------------------------------------------------------------------------------
class _Stop(BaseException):
    """SIGTERM in the parent (or in a worker outside uvicorn's own handling): stop."""


def _raise_stop(signum, frame) -> None:
    raise _Stop


def _worker(cfg: dict[str, Any], worker: int, sock: socket.socket, ready) -> None:
    """One worker process: build the app (report how it went to the parent), then serve on `sock`."""
    import uvicorn

    signal.signal(signal.SIGTERM, _raise_stop)  # uvicorn takes SIGTERM over while it runs, then restores this
    try:
        try:
            app = app_from_config(cfg, worker)
        except (ConfigError, ValueError, OSError) as e:
            ready.put((worker, str(e)))
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the parent reports it, in one line
            ready.put((worker, f"{type(e).__name__}: {e}"))
            sys.exit(1)
        ready.put((worker, None, _describe(app)))
        uvicorn.Server(_config(app)).run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on a SIGTERM just ends the process
        sock.close()


def _run_workers(cfg: dict[str, Any], sock: socket.socket, n: int) -> int:
    """Serve with `n` worker processes on the listening socket `sock` (see the module docstring)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no threads or CUDA state forked
    ready = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, i, sock, ready), name=f"fusion-serve-{i}") for i in range(n)]
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    status = 0
    try:
        for p in procs:
            p.start()
        started: dict[int, str] = {}
        while len(started) < n:
            try:
                worker, error, *about = ready.get(timeout=0.2)
            except queue.Empty:  # did a worker die before it reported?
                dead = next((p for p in procs if p.exitcode is not None), None)
                if dead is not None:
                    raise RuntimeError(f"worker {procs.index(dead)} exited (status {dead.exitcode}) "
                                       "while starting") from None
                continue
            if error is not None:
                raise RuntimeError(f"worker {worker}: {error}")
            started[worker] = about[0]
        host, port = sock.getsockname()[:2]
        print(f"serving {MODEL_NAME} ({started[0]}) at http://{host}:{port}/v1 with {n} workers "
              f"(pids {', '.join(str(p.pid) for p in procs)})", flush=True)
        ended = wait_for([p.sentinel for p in procs])  # until one exits: then stop the others
        dead = next(p for p in procs if p.sentinel in ended)
        dead.join(10)
        if dead.exitcode != 0:  # 0: it was stopped (a signal to it), not a failure
            print(f"error: worker {procs.index(dead)} (pid {dead.pid}) exited with status {dead.exitcode}; "
                  "stopping the others", file=sys.stderr)
            status = 1
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn's graceful shutdown: requests finish, the log is flushed
        for p in procs:
            if p.pid is not None:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
