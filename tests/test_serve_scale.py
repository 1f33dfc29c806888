"""Serving at production concurrency (fusion_lightning/serve.py): no hidden cap on the calls in flight to an
upstream at serve's defaults, the collect default of 8 kept, a full upstream queue answered at once with
503 + an OpenAI error body + Retry-After (and counted on /metrics), and `workers=2` on one port sharing the
request log, feedback crossing workers. Real servers on 127.0.0.1: the official `openai` client, uvicorn,
and upstreams that sleep (tests/openai_server.py)."""

from __future__ import annotations

import asyncio
import json
import re
import select
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from openai_server import FakeOpenAIServer, loopback_without_proxy

from fusion_lightning import serve
from fusion_lightning.serve import MODEL_NAME, ServerThread, app_from_config, compose, pipeline_config
from fusion_lightning.serving import OpenAICompatibleBackend, QueueFull

pytestmark = pytest.mark.integration  # starts processes or servers (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    loopback_without_proxy(monkeypatch)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def backend_cfg(base_url: str, name: str = "a", **kw) -> dict:
    return {"type": "openai_compatible", "base_url": base_url, "model": "m", "name": name, "cache_dir": None,
            "max_retries": 0, **kw}


def config_file(tmp_path: Path, backends: list[dict], **keys) -> str:
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"backends": backends, **keys}))
    return str(path)


@contextmanager
def serving(argv: list[str]):
    """serve's own path: compose the command line, build the app as serve does, run it on a thread."""
    server = ServerThread(app_from_config(compose(argv))).start()
    try:
        yield server, f"http://127.0.0.1:{server.port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + sel + '}') if sel else ''} (\S+)$", text, re.M)
    assert m, f"{name}{{{sel}}} not in /metrics"
    return float(m.group(1))


def test_serve_keys_reach_every_http_backend_and_each_worker_draws_its_own_seed(tmp_path):
    backends = [backend_cfg("http://127.0.0.1:9/v1", "a"),
                backend_cfg("http://127.0.0.1:9/v1", "b", max_concurrency=4, max_queue=0),
                {"type": "local", "model": "some/model", "name": "c"}]
    cfg = compose([f"config={config_file(tmp_path, backends, router={'ckpt': 'r.ckpt', 'seed': 7})}"])
    assert (cfg["upstream_concurrency"], cfg["upstream_queue"], cfg["workers"]) == (256, 1024, 1)
    a, b, c = pipeline_config(cfg)["backends"]
    assert (a["max_concurrency"], a["max_queue"]) == (256, 1024)
    assert (b["max_concurrency"], b["max_queue"]) == (4, 0)  # a backend's own settings win
    assert "max_concurrency" not in c and "max_queue" not in c  # not an HTTP backend
    assert [pipeline_config(cfg, i)["router"]["seed"] for i in range(3)] == [7, 8, 9]
    assert pipeline_config({**cfg, "upstream_queue": None})["backends"][0]["max_queue"] is None
    unseeded = {**cfg, "router": {"ckpt": "r.ckpt"}}
    assert "seed" not in pipeline_config(unseeded, 1)["router"]  # OS entropy: differs per process anyway
    for key, bad in (("upstream_concurrency", 0), ("upstream_queue", -1), ("workers", 0)):
        assert serve.main([f"config={config_file(tmp_path, backends)}", f"{key}={bad}"]) == 1
    with pytest.raises(ValueError, match="max_queue must be an integer >= 0"):
        OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", max_queue=-1)


def test_serve_defaults_answer_64_concurrent_requests_in_about_one_upstream_latency(tmp_path):
    latency = 0.3
    with FakeOpenAIServer(api_key=None, delay_s=latency) as up, \
            serving([f"config={config_file(tmp_path, [backend_cfg(up.base_url)])}"]) as (server, url):
        backend = server.fusion.pipeline.backends["a"]
        assert (backend.max_concurrency, backend.max_queue) == (256, 1024)

        async def run() -> tuple[list[str], float]:
            async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as c:
                await c.chat.completions.create(model=MODEL_NAME, messages=user("warm up"), max_tokens=4)
                start = time.perf_counter()
                replies = await asyncio.gather(*(c.chat.completions.create(
                    model=MODEL_NAME, messages=user(f"question {i}"), max_tokens=4) for i in range(64)))
                return [r.choices[0].message.content for r in replies], time.perf_counter() - start

        texts, wall = asyncio.run(run())
        stages = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert texts == [f"echo: question {i}" for i in range(64)]
    # where each request's time went: every stage observed once per request; the upstream's 0.3 s is upstream's
    for stage in ("encode", "route", "upstream", "write_back"):
        assert metric(stages, "fusion_stage_seconds_count", stage=stage) == 65
    upstream = metric(stages, "fusion_stage_seconds_sum", stage="upstream") / 65
    assert latency <= upstream < 4 * latency
    assert metric(stages, "fusion_stage_seconds_sum", stage="encode") == 0.0  # no router: nothing encoded
    # capped at 8 in flight this would take 64 / 8 waves x 0.3 s = 2.4 s; uncapped, about one latency
    assert wall < 4 * latency, f"64 requests took {wall:.2f} s"
    assert up.max_in_flight > 32


def test_the_collect_default_still_caps_calls_in_flight_at_8():
    with FakeOpenAIServer(api_key=None, delay_s=0.1) as up:
        backend = OpenAICompatibleBackend(up.base_url, "m", cache_dir=None, progress=False)
        assert (backend.max_concurrency, backend.max_queue) == (8, None)

        async def run() -> tuple[int, int]:
            calls = [asyncio.create_task(backend.acomplete(user(f"q{i}"))) for i in range(24)]
            while backend.upstream_load() != (8, 16):  # all admitted: 8 in flight, 16 waiting (no bound)
                await asyncio.sleep(0.005)
            await asyncio.gather(*calls)
            load = backend.upstream_load()
            await backend.aclose()
            return load

        assert asyncio.run(run()) == (0, 0)
        assert up.max_in_flight == 8 and backend.upstream_rejected == 0
        up.max_in_flight = 0
        assert len(backend.generate([user(f"p{i}") for i in range(16)])) == 16  # collect's batch: 8 threads
        assert up.max_in_flight == 8


def test_a_full_upstream_queue_is_a_503_with_retry_after_at_once_and_counted_on_metrics(tmp_path):
    latency = 0.8
    with FakeOpenAIServer(api_key=None, delay_s=latency) as up, \
            serving([f"config={config_file(tmp_path, [backend_cfg(up.base_url)])}",
                     "upstream_concurrency=2", "upstream_queue=2"]) as (server, url):
        metrics_url = url.removesuffix("/v1") + "/metrics"

        async def run():
            async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=30) as c, \
                    httpx.AsyncClient() as h:
                async def one(i: int):
                    start = time.perf_counter()
                    try:
                        r = await c.chat.completions.create(model=MODEL_NAME, messages=user(f"q{i}"), max_tokens=4)
                    except openai.APIStatusError as e:
                        return e, time.perf_counter() - start
                    return r, time.perf_counter() - start

                calls = [asyncio.create_task(one(i)) for i in range(10)]
                deadline = time.monotonic() + 10
                while sum(t.done() for t in calls) < 6 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                during = (await h.get(metrics_url)).text  # 2 in flight, 2 waiting, 6 refused
                with pytest.raises(openai.InternalServerError) as refused_stream:  # a stream: 503, no events
                    await c.chat.completions.create(model=MODEL_NAME, messages=user("s"), stream=True)
                results = await asyncio.gather(*calls)
                after = (await h.get(metrics_url)).text
            return results, during, refused_stream.value, after

        results, during, refused_stream, after = asyncio.run(run())
    ok = [(r, t) for r, t in results if not isinstance(r, Exception)]
    refused = [(e, t) for e, t in results if isinstance(e, Exception)]
    assert len(ok) == 4 and len(refused) == 6
    assert all(r.choices[0].message.content.startswith("echo: q") for r, _ in ok)
    for e, took in [*refused, (refused_stream, 0.0)]:
        assert took < latency  # refused at once, not after a wait
        assert e.status_code == 503 and e.response.headers["content-type"] == "application/json"
        assert int(e.response.headers["retry-after"]) >= 1
        body = e.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "upstream_queue_full" and body["error"]["param"] is None
        assert body["error"]["type"] == "server_error" and "queue full" in body["error"]["message"]
    assert up.max_in_flight == 2
    assert metric(during, "fusion_upstream_in_flight", backend="a") == 2
    assert metric(during, "fusion_upstream_queued", backend="a") == 2
    assert metric(during, "fusion_upstream_rejected_total", backend="a") == 6
    assert metric(after, "fusion_upstream_in_flight", backend="a") == 0
    assert metric(after, "fusion_upstream_queued", backend="a") == 0
    assert metric(after, "fusion_upstream_rejected_total", backend="a") == 7
    assert metric(after, "fusion_requests_total", endpoint="chat", status="503") == 7
    assert metric(after, "fusion_errors_total", kind="queue_full") == 7
    assert isinstance(QueueFull("x", 2.5), Exception) and QueueFull("x", 2.5).retry_after == 2.5


def _pinned(base: str, want: int, tries: int = 60) -> dict[int, httpx.Client]:
    """One kept-alive connection to each of `want` worker processes (a connection stays with the process
    that accepted it; /health names the pid)."""
    pinned: dict[int, httpx.Client] = {}
    for _ in range(tries):
        h = httpx.Client(base_url=base, timeout=30,
                         limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        pid = h.get("/health").json()["pid"]
        if pid in pinned:
            h.close()
        else:
            pinned[pid] = h
        if len(pinned) == want:
            break
    return pinned


def test_two_workers_share_the_port_and_the_request_log_and_take_feedback_for_each_others_requests(tmp_path):
    log_dir = tmp_path / "log"
    with FakeOpenAIServer(api_key=None) as up:
        cfg = config_file(tmp_path, [backend_cfg(up.base_url)])
        proc = subprocess.Popen([sys.executable, "-m", "fusion_lightning.serve", f"config={cfg}", "port=0",
                                 "workers=2", f"log_dir={log_dir}"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        pinned: dict[int, httpx.Client] = {}
        try:
            assert select.select([proc.stdout], [], [], 120)[0], "the server did not start"
            line = proc.stdout.readline()
            assert "with 2 workers" in line, line + proc.stderr.read() if proc.poll() is not None else line
            base = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
            pinned = _pinned(base, 2)
            assert len(pinned) == 2, "every connection went to one worker"
            workers = [openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, http_client=h)
                       for h in pinned.values()]
            ids = []
            for i in range(40):
                c = workers[i % 2]
                if i % 4 == 1:
                    with c.chat.completions.with_streaming_response.create(
                            model=MODEL_NAME, messages=user(f"streamed {i}"), max_tokens=4, stream=True) as r:
                        assert "".join(ch.choices[0].delta.content or "" for ch in r.parse() if ch.choices)
                        ids.append(r.headers["x-request-id"])
                else:
                    reply = c.chat.completions.create(model=MODEL_NAME, messages=user(f"plain {i}"), max_tokens=4)
                    ids.append(reply.id)
            hs = list(pinned.values())
            for i, rid in enumerate(ids):  # each answer scored through the other worker
                r = hs[(i + 1) % 2].post("/v1/feedback", json={"id": rid, "score": (i % 5) / 4})
                assert r.status_code == 200, r.text
            assert hs[0].post("/v1/feedback", json={"id": "chatcmpl-nope", "score": 1}).status_code == 404
        finally:
            for h in pinned.values():
                h.close()
            proc.terminate()  # SIGTERM: the workers stop gracefully, their logs flushed
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    records = [json.loads(x) for f in sorted(log_dir.glob("requests-*.jsonl")) for x in f.read_text().splitlines()]
    served = [r for r in records if "feedback_at" not in r]
    scored = [r for r in records if "feedback_at" in r]
    assert sorted(r["request_id"] for r in served) == sorted(ids) and len(set(ids)) == 40  # each exactly once
    assert sorted(r["request_id"] for r in scored) == sorted(ids)
    assert {r["request_id"]: r["performance"] for r in scored} == {rid: (i % 5) / 4 for i, rid in enumerate(ids)}
    assert all(r["error"] is None and r["response"].startswith("echo: ") for r in served)
