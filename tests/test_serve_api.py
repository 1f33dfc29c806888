"""The OpenAI-compatible server under real clients: the official `openai` SDK against Starlette/uvicorn on
127.0.0.1, routing with a real router checkpoint over two HTTP upstreams (tests/openai_server.py) and
a tiny local model. Plain, streamed, n > 1, auth, failures before and during a stream, 64 concurrent
streaming clients, local dynamic batching, and the request log read back and trained on with `fit`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai_server import FakeOpenAIServer, loopback_without_proxy
from planted import fit_planted_router
from tiny_lm import build_tiny_lm

from fusion_lightning.config import compose_recipe
from fusion_lightning.data.readers import read_source
from fusion_lightning.data.schema import ModelCatalog, ModelInfo
from fusion_lightning.fit import fit
from fusion_lightning.query.router import Router
from fusion_lightning.serve import MODEL_NAME, main, serve_in_thread
from fusion_lightning.serving import LocalBackend, OpenAICompatibleBackend
from fusion_lightning.serving.pipeline import FusedPipeline

KEY_ENV, KEY = "FL_SERVE_TEST_KEY", "sk-serve-test-1234"
ARITH = "add the sum of these numbers plus digits"
GEO = "which river crosses the capital city of this country"
LONG = "and then some more words follow here so that the stream has many pieces"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    loopback_without_proxy(monkeypatch)


@pytest.fixture(scope="module")
def router_ckpt(tmp_path_factory) -> Path:
    return fit_planted_router(tmp_path_factory.mktemp("serve_router"), epochs=5)


@pytest.fixture(scope="module")
def upstreams():
    made = {n: FakeOpenAIServer(api_key=None, answer=lambda m, n=n: f"{n} says {m[-1]['content']} {LONG}",
                                token_delay_s=0.001).start() for n in ("alpha", "beta")}
    yield made
    for s in made.values():
        s.stop()


@pytest.fixture(scope="module")
def pipeline(router_ckpt, upstreams, tmp_path_factory):
    http = [OpenAICompatibleBackend(upstreams[n].base_url, "m", name=n, cache_dir=None, progress=False,
                                    max_retries=1, backoff_base=0.01, max_concurrency=128) for n in ("alpha", "beta")]
    gamma = LocalBackend(str(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "gamma")), name="gamma", device="cpu",
                         batch_size=8, progress=False)
    catalog = ModelCatalog()
    for name, price in (("alpha", 0.2), ("beta", 1.0), ("gamma", 0.6)):
        catalog.add(ModelInfo(name=name, input_price=price, output_price=2 * price))
    return FusedPipeline([*http, gamma], router=Router.load(router_ckpt), catalog=catalog,
                         sampling={"max_new_tokens": 64})


@pytest.fixture(scope="module")
def served(pipeline):
    server, url = serve_in_thread(pipeline, api_key_env=None, batch_wait_ms=20)
    yield server, url
    server.shutdown()
    server.server_close()


def client(url: str, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60, **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_plain_completion_is_schema_valid_and_names_the_backend(served, upstreams):
    _, url = served
    raw = client(url).chat.completions.with_raw_response.create(model=MODEL_NAME, messages=user(ARITH), max_tokens=6)
    reply = raw.parse()
    routed = raw.headers["x-fusion-model"]
    assert routed in ("alpha", "beta", "gamma") and reply.fusion["routed_to"] == routed
    assert reply.model == MODEL_NAME and reply.object == "chat.completion" and reply.id == raw.headers["x-request-id"]
    assert len(reply.choices) == 1 and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    u = reply.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 6 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    direct = client(url).chat.completions.create(model="beta", messages=user(GEO), max_tokens=3)
    assert direct.choices[0].message.content == "beta says which" and direct.choices[0].finish_reason == "length"
    assert [m.id for m in client(url).models.list()] == [MODEL_NAME, "alpha", "beta", "gamma"]
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["stages"] == ["router"]


@pytest.mark.parametrize("model", ["alpha", "gamma"])
def test_stream_reassembles_to_the_plain_answer_with_a_usage_chunk(served, upstreams, model, monkeypatch):
    _, url = served
    # pieces are what each read of the upstream brings: at 1 ms a token, a busy machine reads it all at once
    monkeypatch.setattr(upstreams["alpha"], "token_delay_s", 0.02)
    c = client(url)
    plain = c.chat.completions.create(model=model, messages=user(GEO), max_tokens=12)
    with c.chat.completions.with_streaming_response.create(model=model, messages=user(GEO), max_tokens=12,
                                                           stream=True, stream_options={"include_usage": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-fusion-model"] == model
        chunks = list(r.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2 or model == "gamma"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1]) and all(ch.fusion["routed_to"] == model for ch in chunks)


def test_n_samples_from_the_chosen_backend(served):
    _, url = served
    c = client(url)
    two = c.chat.completions.create(model="alpha", messages=user(ARITH), max_tokens=4, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert all(ch.message.content == "alpha says add the" for ch in two.choices)
    assert two.usage.completion_tokens == 8 and two.usage.prompt_tokens == len(ARITH.split())
    local = c.chat.completions.create(model="gamma", messages=user(ARITH), max_tokens=8, n=2, temperature=1.0, seed=1)
    assert len(local.choices) == 2 and local.choices[0].message.content != local.choices[1].message.content
    stream = c.chat.completions.create(model="alpha", messages=user(ARITH), max_tokens=4, n=2, stream=True)
    texts = ["", ""]
    for ch in stream:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["alpha says add the"] * 2
    with pytest.raises(openai.BadRequestError, match="'n' must be"):
        c.chat.completions.create(model="alpha", messages=user(ARITH), n=0)


def test_api_key_is_required_when_configured(pipeline):
    server, url = serve_in_thread(pipeline, api_key_env=KEY_ENV)
    try:
        assert client(url, KEY).chat.completions.create(model="alpha", messages=user("x"), max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, "wrong-key").chat.completions.create(model="alpha", messages=user("x"))
        assert e.value.status_code == 401
        assert e.value.body["code"] == "invalid_api_key" and e.value.body["type"] == "invalid_request_error"
        for headers in ({}, {"Authorization": "Bearer nope"}):  # no key, a wrong key
            r = httpx.get(f"{url}/models", headers=headers)
            assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # no key needed
        r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/nowhere").json()["error"]["type"] == "not_found_error"
    finally:
        server.shutdown()
        server.server_close()


def test_backend_failures_answer_with_errors_and_the_server_stays_up(served, upstreams):
    server, url = served
    c = client(url)
    prompt = "please break this stream for me now"
    upstreams["alpha"].faults[prompt] = ["cut"]
    seen = ""
    with pytest.raises(openai.APIError, match="stream broke"):
        for ch in c.chat.completions.create(model="alpha", messages=user(prompt), stream=True):
            seen += ch.choices[0].delta.content or ""
    assert seen.startswith("alpha says")  # some output arrived before the break
    upstreams["alpha"].faults["fails twice"] = ["500", "500"]  # max_retries=1: two attempts, both fail
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="alpha", messages=user("fails twice"))
    assert e.value.status_code == 502 and "HTTP 500" in e.value.body["message"]
    again = c.chat.completions.create(model="alpha", messages=user(prompt), max_tokens=2)
    assert again.choices[0].message.content == "alpha says"
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert 'fusion_errors_total{kind="stream"}' in metrics and 'fusion_errors_total{kind="upstream"}' in metrics
    assert 'fusion_routed_total{model="alpha"}' in metrics and "fusion_request_latency_seconds_bucket" in metrics


def test_a_client_that_leaves_mid_stream_is_counted_and_the_server_goes_on(served, upstreams, monkeypatch):
    server, url = served
    monkeypatch.setattr(upstreams["alpha"], "token_delay_s", 0.05)  # a slow stream, left after its first event
    body = {"model": "alpha", "stream": True, "messages": user("one two three four five six seven eight")}
    with httpx.stream("POST", f"{url}/chat/completions", json=body) as r:
        assert next(line for line in r.iter_lines() if line).startswith("data: {")
    monkeypatch.setattr(upstreams["alpha"], "token_delay_s", 0.001)
    assert client(url).chat.completions.create(model="alpha", messages=user("x"), max_tokens=2).choices
    for _ in range(100):  # the server notices at its next write
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        if 'status="client_closed"' in metrics:
            break
        time.sleep(0.05)
    assert 'fusion_requests_total{endpoint="chat",status="client_closed"} 1.0' in metrics


def test_64_concurrent_streaming_clients_all_succeed_and_are_routed_in_batches(served):
    server, url = served
    server.fusion.router.largest = 0

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        q = f"{ARITH if i % 2 else GEO} number {i}"
        stream = await c.chat.completions.create(model=MODEL_NAME, messages=user(q), max_tokens=8, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    texts = asyncio.run(run())
    assert len(texts) == 64 and all(texts)
    assert server.fusion.router.largest > 1  # concurrent queries were routed together


def test_local_backend_generates_concurrent_requests_as_one_batch(served, pipeline):
    server, url = served
    prompts = [f"question {i}: what is {i} plus {i}?" for i in range(6)]
    alone = [g.text for g in pipeline.backends["gamma"].generate([user(p) for p in prompts], max_new_tokens=6)]
    runner = server.fusion.runners["gamma"]
    runner.batcher.largest = 0

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=120) as c:
            replies = await asyncio.gather(*(c.chat.completions.create(model="gamma", messages=user(p), max_tokens=6)
                                             for p in prompts))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(run()) == alone  # greedy answers do not depend on the batch
    assert runner.batcher.largest > 1


def test_request_log_feedback_and_fit_on_served_traffic(pipeline, tmp_path):
    log_dir = tmp_path / "log"
    server, url = serve_in_thread(pipeline, log_dir=str(log_dir), log_max_mb=0.004)  # ~4 KB files: rotation
    try:
        c = client(url)
        words = {"arithmetic": "sum add plus total numbers", "geography": "river capital country city border"}
        ids = []
        for i in range(36):
            task = ("arithmetic", "geography")[i % 2]
            model = MODEL_NAME if i % 3 == 0 else ("alpha", "beta")[i % 2]
            stream = i % 4 == 1
            kw = {"extra_body": {"task": task}} if i % 5 else {}
            messages = user(f"served {task} question {i}: {words[task]}")
            if stream:
                with c.chat.completions.with_streaming_response.create(model=model, messages=messages, max_tokens=5,
                                                                       stream=True, **kw) as r:
                    list(r.parse())
                    ids.append(r.headers["x-request-id"])
            else:
                ids.append(c.chat.completions.create(model=model, messages=messages, max_tokens=5, **kw).id)
        fb = httpx.post(f"{url}/feedback", json={"id": ids[0], "score": 0.25}).json()
        assert fb == {"id": ids[0], "object": "feedback", "choice": 0, "performance": 0.25, "llm_judge": None}
        for i, rid in enumerate(ids[:30]):  # 30 scored; ids[0] scored twice: the later score wins
            r = httpx.post(f"{url}/feedback", json={"id": rid, "score": float(i % 2), "judge": 0.5})
            assert r.status_code == 200, r.text
        assert httpx.post(f"{url}/feedback", json={"id": "chatcmpl-nope", "score": 1}).status_code == 404
        bad = httpx.post(f"{url}/feedback", json={"id": ids[1], "score": 7})
        assert bad.status_code == 400 and "[0, 1]" in bad.json()["error"]["message"]
        server.fusion.request_log.flush()
    finally:
        server.shutdown()
        server.server_close()
    files = sorted(log_dir.glob("requests-*.jsonl"))
    assert len(files) > 1  # rotated by size
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(records) == 36 + 31 and len({r["request_id"] for r in records}) == 36
    first = next(r for r in records if r["request_id"] == ids[1])
    assert first["performance"] is None and first["task_source"] == "request" and first["cost"] > 0
    assert {r["task_source"] for r in records if r["request_id"] in (ids[0], ids[15])} <= {"router", "default"}

    src = read_source("llmfusionbench", log_dir)  # the LLMFusionBench reader
    assert src.counts == {"served_records_superseded": 31, "served_answers_unscored": 6}
    assert any("6 served answers have no score yet" in n for n in src.notes)
    t = src.table.to_pylist()
    assert len(t) == 30 and {r["model"] for r in t} <= {"alpha", "beta", "gamma"}
    by_query = {r["query"]: r for r in t}
    q0 = next(r["query"] for r in records if r["request_id"] == ids[0])
    assert by_query[q0]["performance"] == 0.0 and by_query[q0]["judge"] == 0.5  # feedback updated the record
    assert all(r["cost"] > 0 for r in t)

    summary = fit(compose_recipe("router_mlp", ["data=llmfusionbench", f"data.path={log_dir}", "debug=fast",
                                                f"run_dir={tmp_path / 'run'}", "data.split=query"]))
    assert (tmp_path / "run" / summary["artifacts"]["best_checkpoint"]).is_file()
    assert summary["data"]["served_answers_unscored"] == 6


def test_cli_rejects_unknown_keys(capsys):
    assert main(["port=0", "batch_wait=3"]) == 1
    assert "unknown config key 'batch_wait'" in capsys.readouterr().err
