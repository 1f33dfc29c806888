"""Generation backends: the OpenAI-compatible HTTP backend against a local fake server (retries, cache
and resume, key hygiene, concurrency) and the local Hugging Face backend on a tiny random Llama."""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer, echo_answer, last_user, loopback_without_proxy
from tiny_lm import build_tiny_lm

from fusion_lightning.serving import (
    Backend,
    BackendError,
    LocalBackend,
    OpenAICompatibleBackend,
    build_backend,
)
from fusion_lightning.serving.local import cut_completion

KEY_ENV = "FL_TEST_API_KEY"
KEY = "sk-DISTINCTIVE-k3y-9f8e7d6c5b4a"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    loopback_without_proxy(monkeypatch)


@pytest.fixture
def server():
    with FakeOpenAIServer(api_key=KEY) as s:
        yield s


def http_backend(server, tmp_path, **kw) -> OpenAICompatibleBackend:
    kw = {"api_key_env": KEY_ENV, "cache_dir": tmp_path / "cache", "backoff_base": 0.01, "progress": False, **kw}
    return OpenAICompatibleBackend(server.base_url, "echo-model", **kw)


# -- OpenAI-compatible HTTP backend -----------------------------------------------------------------
def test_http_answers_in_input_order_with_token_counts(server, tmp_path):
    def jittery(messages):  # later prompts often finish first
        time.sleep((zlib.crc32(last_user(messages).encode()) % 20) / 1000)
        return echo_answer(messages)

    server.answer = jittery
    prompts = [f"question number {i} " + "word " * (i % 4) for i in range(30)]
    gens = http_backend(server, tmp_path, max_concurrency=6).generate(prompts)
    assert [g.text for g in gens] == [f"echo: {p}" for p in prompts]
    assert [g.input_tokens for g in gens] == [len(p.split()) for p in prompts]
    assert [g.output_tokens for g in gens] == [len(g.text.split()) for g in gens]
    assert not any(g.cached or g.error for g in gens) and all(g.latency_s > 0 for g in gens)
    assert all(server.requests[p] == 1 for p in prompts) and server.successes == 30


def test_http_retries_transient_faults_and_answers_each_prompt_once(server, tmp_path):
    server.slow_s = 1.0
    faults = {"q1": ["429", "429"], "q2": ["500", "503"], "q3": ["timeout"], "q4": ["malformed"],
              "q5": ["disconnect", "500"]}
    server.faults = {k: list(v) for k, v in faults.items()}
    prompts = [f"q{i}" for i in range(8)]
    gens = http_backend(server, tmp_path, timeout_s=0.4, max_concurrency=4).generate(prompts)
    assert [g.text for g in gens] == [f"echo: {p}" for p in prompts]
    assert {p: server.requests[p] for p in prompts} == {p: 1 + len(faults.get(p, [])) for p in prompts}
    assert server.successes == len(prompts)  # exactly one answer per prompt


def test_async_side_retries_the_same_faults_and_streams(server, tmp_path):
    """acomplete/astream (what the server uses; the lean transport) keep the sync side's retries."""
    import asyncio

    server.slow_s = 1.0
    faults = {"q1": ["429", "500"], "q2": ["timeout"], "q3": ["malformed"], "q4": ["disconnect", "503"],
              "s1": ["500", "disconnect"], "s2": ["429"]}
    server.faults = {k: list(v) for k, v in faults.items()}
    b = http_backend(server, tmp_path, timeout_s=0.4, cache_dir=None)

    async def run():
        plain = await asyncio.gather(*(b.acomplete(f"q{i}") for i in range(1, 6)))
        streamed = []
        for p in ("s1", "s2", "s3 has more words"):
            streamed.append([c async for c in b.astream(p, max_new_tokens=3)])
        server.faults = {"bad": ["400"]}
        with pytest.raises(BackendError, match="HTTP 400"):
            await b.acomplete("bad")
        await b.aclose()
        return plain, streamed

    plain, streamed = asyncio.run(run())
    assert [g.text for g in plain] == [f"echo: q{i}" for i in range(1, 6)]
    assert {p: server.requests[p] for p in faults} == {p: 1 + len(v) for p, v in faults.items()}
    for chunks in streamed:
        assert chunks[-1].generation is not None and chunks[-1].text == ""
        assert "".join(c.text for c in chunks) == chunks[-1].generation.text
    assert streamed[2][-1].generation.text == "echo: s3 has" and streamed[2][-1].generation.finish_reason == "length"
    assert streamed[2][-1].generation.output_tokens == 3


def test_retry_after_is_honoured_and_backoff_is_seeded(server, tmp_path):
    server.retry_after = "7"
    server.faults = {"a": ["429"]}
    b = http_backend(server, tmp_path, max_concurrency=1)
    delays: list[float] = []
    b._sleep = delays.append
    assert b.generate(["a"])[0].text == "echo: a"
    assert delays == [7.0]

    def backoff_delays(seed):
        server.faults = {"b": ["500", "500", "500"]}
        b = http_backend(server, tmp_path, max_concurrency=1, cache_dir=None, backoff_base=1.0, retry_seed=seed)
        out: list[float] = []
        b._sleep = out.append
        assert b.generate(["b"])[0].text == "echo: b"
        return out

    d = backoff_delays(0)
    assert [0.5 <= x / 2**i <= 1.5 for i, x in enumerate(d)] == [True] * 3  # exponential with jitter
    assert backoff_delays(0) == d and backoff_delays(1) != d


def test_exhausted_retries_raise_or_return_an_error(server, tmp_path):
    server.faults = {"bad": ["500"] * 10}
    with pytest.raises(BackendError, match=r"gave up after 3 attempts.*HTTP 500"):
        http_backend(server, tmp_path, max_retries=2, max_concurrency=1).generate(["bad"])
    assert server.requests["bad"] == 3
    gens = http_backend(server, tmp_path, max_retries=1, errors="return").generate(["ok", "bad"])
    assert gens[0].text == "echo: ok" and gens[0].error is None
    assert gens[1].text == "" and "HTTP 500" in gens[1].error


def test_400_is_a_clear_error_and_not_retried(server, tmp_path):
    server.faults = {"too long": ["400"]}
    with pytest.raises(BackendError, match=r"HTTP 400 .*bad request: too long") as e:
        http_backend(server, tmp_path).generate(["too long"])
    assert "/chat/completions" in str(e.value)
    assert server.requests["too long"] == 1


def test_interrupted_batch_resumes_from_cache_and_never_pays_twice(server, tmp_path):
    prompts = [f"p{i}" for i in range(12)]
    server.fail_after = 5  # the server goes down after 5 answers
    with pytest.raises(BackendError, match="HTTP 503"):
        http_backend(server, tmp_path, max_concurrency=1, max_retries=0).generate(prompts)
    assert server.successes == 5 and sum(server.requests.values()) == 6
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 5

    server.fail_after = None
    backend = http_backend(server, tmp_path, max_concurrency=3)
    gens = backend.generate(prompts)
    assert [g.text for g in gens] == [f"echo: {p}" for p in prompts]
    assert [g.cached for g in gens] == [True] * 5 + [False] * 7
    assert server.successes == 12  # each prompt paid for once
    assert [server.requests[p] for p in prompts] == [1] * 5 + [2] + [1] * 6
    again = backend.generate(prompts)  # everything cached: no request at all
    assert all(g.cached for g in again) and [g.text for g in again] == [g.text for g in gens]
    assert sum(server.requests.values()) == 13
    assert again[0].input_tokens == gens[0].input_tokens and again[0].output_tokens == gens[0].output_tokens


def test_cache_key_covers_sampling_and_messages_and_dedupes(server, tmp_path):
    b = http_backend(server, tmp_path)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}]
    gens = b.generate(["a", "a", chat], max_new_tokens=2, seed=3, stop=["zzz"])
    assert [g.text for g in gens] == ["echo: a"] * 3
    assert server.requests["a"] == 2  # "a" twice is one request; the chat is another
    body = server.bodies[-1]
    assert (body["max_tokens"], body["seed"], body["stop"], body["model"]) == (2, 3, ["zzz"], "echo-model")
    assert b.generate(["a"], max_new_tokens=2, seed=4, stop=["zzz"])[0].cached is False
    assert b.generate(["a"], max_new_tokens=2, seed=3, stop=["zzz"])[0].cached is True
    assert server.requests["a"] == 3
    assert b.generate(["one two three four"], max_new_tokens=2)[0].text == "echo: one"


def test_api_key_never_leaks(server, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    b = http_backend(server, tmp_path, max_retries=1)
    assert KEY not in repr(b) and KEY_ENV in repr(b)
    assert KEY not in str(vars(b))
    server.faults = {"x": ["500"] * 5, "y": ["400"]}
    for prompt in ["x", "y"]:
        with pytest.raises(BackendError) as e:
            b.generate([prompt])
        assert KEY not in str(e.value)
    b.generate(["z"])
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and not any(KEY.encode() in p.read_bytes() for p in files)
    assert KEY not in caplog.text

    server.api_key = "another-key"  # the 401 body echoes the offered key: it is redacted
    with pytest.raises(BackendError, match=rf"HTTP 401 .*\*\*\*.*\${KEY_ENV}") as e:
        b.generate(["w"])
    assert KEY not in str(e.value)
    with pytest.raises(ValueError, match="api_key_env") as e:
        build_backend({"type": "openai_compatible", "base_url": server.base_url, "model": "m", "api_key": KEY})
    assert KEY not in str(e.value)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"{KEY_ENV} .*not set"):
        http_backend(server, tmp_path)


def test_concurrency_limit_is_respected(server, tmp_path):
    server.delay_s = 0.05
    http_backend(server, tmp_path, max_concurrency=3).generate([f"c{i}" for i in range(24)])
    assert 2 <= server.max_in_flight <= 3


def test_build_backend_from_config(server, tmp_path):
    cfg = {"type": "openai_compatible", "base_url": server.base_url, "model": "echo-model", "name": "echo",
           "api_key_env": KEY_ENV, "cache_dir": str(tmp_path / "c"), "sampling": {"max_new_tokens": 3}}
    b = build_backend(cfg)
    assert isinstance(b, Backend) and b.name == "echo"
    assert b.generate(["a b c d e"])[0].text == "echo: a b"
    with pytest.raises(ValueError, match=r"unknown OpenAICompatibleBackend config key\(s\) \['temp'\]"):
        build_backend({**cfg, "temp": 1})
    with pytest.raises(ValueError, match="unknown backend type 'vllm'"):
        build_backend({**cfg, "type": "vllm"})
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        b.generate(["a"], temprature=0.5)


# -- local Hugging Face backend ---------------------------------------------------------------------
PROMPTS = ["hi", "What is two plus two?", "Write a function that returns the sum of a list of numbers.",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of France?"}]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def local(tiny_dir) -> LocalBackend:
    return LocalBackend(str(tiny_dir), device="cpu", batch_size=8, progress=False)


def test_local_chat_template_and_plain_format(local, tmp_path):
    assert local.name.startswith("tiny_lm")  # a local directory is named by its last component
    assert local.render("hi") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert local.render(PROMPTS[3]).startswith("<|system|>\nBe brief.<|end|>\n<|user|>\ncapital")
    plain = LocalBackend(str(build_tiny_lm(tmp_path / "plain", chat_template=False)), device="cpu", progress=False)
    assert plain.render("hi") == "User: hi\nAssistant:"
    assert plain.render(PROMPTS[3]) == "System: Be brief.\nUser: capital of France?\nAssistant:"
    assert len(plain.generate(["hi"], max_new_tokens=3)) == 1
    base = LocalBackend(str(tmp_path / "plain"), device="cpu", progress=False, prompt_format="completion")
    assert base.render(PROMPTS[3]) == "Be brief.\n\ncapital of France?\n\nAnswer:"
    assert local.prompt_format == "chat" and plain.prompt_format == "chat"  # "auto" outside the zoo
    streamed: list[str] = []
    gen = base.generate(["hi"], max_new_tokens=6, streams=[streamed.append])[0]
    assert "".join(streamed) == gen.text  # a completion is streamed whole, once cut
    with pytest.raises(ValueError, match="prompt_format"):
        LocalBackend(str(tmp_path / "plain"), device="cpu", progress=False, prompt_format="qa")


@pytest.mark.parametrize(("text", "want"), [
    (" (B)\n\nQuestion: next", " (B)"), ("\n\n (C) because\nit is\n\nmore", "\n\n (C) because\nit is"),
    ("no blank line", "no blank line"), ("\n\n", "\n\n"),
    ("```python\ndef f():\n\n    return 1\n```\n\nQuestion: next", "```python\ndef f():\n\n    return 1\n```"),
])
def test_a_base_models_completion_ends_at_its_first_blank_line_after_text(text, want):
    assert cut_completion(text) == want


def test_completion_rows_stop_generating_at_their_blank_line(local):
    import torch

    from fusion_lightning.serving.local import _BlankLineAfterText

    tok = local.tokenizer
    prompt = tok("Q: hi", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in (" (B)\n\nQ:", "\n\n (B)", " (B) ok")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    assert _BlankLineAfterText(tok, len(prompt))(ids, None).tolist() == [True, False, False]


def test_local_batched_greedy_equals_unbatched_and_counts_tokens(local):
    import torch

    batched = local.generate(PROMPTS, max_new_tokens=12)
    assert [g.text for g in local.generate(PROMPTS, max_new_tokens=12)] == [g.text for g in batched]
    local.batch_size = 1
    try:
        single = local.generate(PROMPTS, max_new_tokens=12)
    finally:
        local.batch_size = 8
    assert [g.text for g in single] == [g.text for g in batched]
    assert any(g.text for g in batched)
    tok = local.tokenizer
    for p, g in zip(PROMPTS, batched, strict=True):
        ids = tok(local.render(p), add_special_tokens=False, return_tensors="pt")
        assert g.input_tokens == ids["input_ids"].shape[1]
        with torch.inference_mode():
            out = local.model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        n = next((j for j, t in enumerate(new) if t in (tok.eos_token_id, tok.pad_token_id)), len(new))
        assert g.output_tokens == n <= 12 and g.text == tok.decode(new[:n], skip_special_tokens=True)
    assert all(g.output_tokens <= 3 for g in local.generate(PROMPTS, max_new_tokens=3))


def test_local_seeded_sampling_is_reproducible(local):
    a = local.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    b = local.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    c = local.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=4)
    greedy = local.generate(PROMPTS, max_new_tokens=10)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c] and [g.text for g in a] != [g.text for g in greedy]


def test_local_stop_strings_cut_the_answer(local):
    full = local.generate(PROMPTS[1:2], max_new_tokens=16)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop.strip()) == 2
    cut = local.generate(PROMPTS[1:2], max_new_tokens=16, stop=[stop])[0].text
    assert cut == full[: full.find(stop)]


def test_local_lora_adapter_changes_outputs(tiny_dir, local, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    tuned = build_backend({"type": "local", "model": str(tiny_dir), "adapter": str(tmp_path / "adapter"),
                           "device": "cpu", "dtype": "float32", "progress": False})
    assert tuned.name.endswith("+adapter") and isinstance(tuned, Backend)
    with_adapter = [g.text for g in tuned.generate(PROMPTS, max_new_tokens=10)]
    assert with_adapter != [g.text for g in local.generate(PROMPTS, max_new_tokens=10)]
