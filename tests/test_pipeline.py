"""Fused inference end to end (router → thought stage → backend → scorer) and the OpenAI-compatible server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from openai_server import FakeOpenAIServer, last_user
from planted import fit_planted_router
from tiny_lm import build_tiny_lm

from fusion_lightning.query.router import Router
from fusion_lightning.scoring.formats import answer_instruction
from fusion_lightning.serve import MODEL_NAME, serve_in_thread
from fusion_lightning.serving import BackendError, LocalBackend, OpenAICompatibleBackend
from fusion_lightning.serving.pipeline import FusedPipeline

ARITH = "add the sum of these numbers plus digits"
GEO = "which river crosses the capital city of this country"


@pytest.fixture(scope="module")
def router_ckpt(tmp_path_factory) -> Path:
    return fit_planted_router(tmp_path_factory.mktemp("pipe_router"), epochs=20)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="module")
def servers():
    """alpha and beta as HTTP models: each answers '<name> says #### 42'."""
    made = {n: FakeOpenAIServer(api_key=None, answer=lambda m, n=n: f"{n} says #### 42").start() for n in ("alpha", "beta")}
    yield made
    for s in made.values():
        s.stop()


def _http(servers, names=("alpha", "beta")) -> list[OpenAICompatibleBackend]:
    return [OpenAICompatibleBackend(servers[n].base_url, "m", name=n, cache_dir=None, progress=False) for n in names]


def test_router_only_sends_each_query_to_its_routed_backend_and_scores(router_ckpt, servers) -> None:
    pipe = FusedPipeline(_http(servers), router=Router.load(router_ckpt))
    out = pipe.run([ARITH, GEO], tasks=["arithmetic", "geography"], metrics=["GSM8K", "GSM8K"],
                   ground_truths=["#### 42", "#### 41"])
    assert [o.model for o in out] == ["alpha", "beta"]
    assert out[0].text == "alpha says #### 42" and out[1].text == "beta says #### 42"
    assert [o.score for o in out] == [1.0, 0.0]
    sent = last_user(servers["alpha"].bodies[-1]["messages"])
    assert sent.startswith(ARITH) and sent.endswith(answer_instruction("GSM8K"))  # zero-shot prompt
    assert pipe.stages == ["router"]


def test_router_chooses_among_the_models_that_have_a_backend(router_ckpt, servers, tiny_dir) -> None:
    router = Router.load(router_ckpt)
    gamma = LocalBackend(str(tiny_dir), name="gamma", progress=False)
    pipe = FusedPipeline([*_http(servers, ("beta",)), gamma], router=router)
    scores = router.route([ARITH], tasks=["arithmetic"]).scores[0]
    best_available = max(("beta", "gamma"), key=lambda m: scores[router.models.index(m)])
    out = pipe.run([ARITH], tasks=["arithmetic"], max_new_tokens=4)
    assert out[0].model == best_available  # alpha (the router's first choice) has no backend here
    with pytest.raises(ValueError, match="no backend is named after one of the router's models"):
        FusedPipeline([LocalBackend(str(tiny_dir), name="other", progress=False)], router=router)


def test_student_only_pipeline_from_config_runs_the_local_model(tiny_dir, tmp_path: Path) -> None:
    cat = tmp_path / "cat.json"
    cat.write_text(json.dumps({"student": {"input_price": 1.0, "output_price": 2.0}}))
    pipe = FusedPipeline.from_config({"backends": [{"type": "local", "model": str(tiny_dir), "name": "student",
                                                     "progress": False}],
                                      "catalog": str(cat), "sampling": {"max_new_tokens": 5}})
    out = pipe.run(["What is two plus two?"], tasks=["gsm8k"], metrics=["GSM8K"], ground_truths=["#### 4"])
    o = out[0]
    assert o.model == "student" and pipe.stages == [] and 1 <= o.output_tokens <= 5
    assert o.cost == pytest.approx((o.input_tokens * 1.0 + o.output_tokens * 2.0) / 1e6)
    assert o.score in (0.0, 1.0)
    with pytest.raises(ValueError, match="unknown pipeline key"):
        FusedPipeline.from_config({"backends": [], "routr": {}})


class _StubAugmenter:
    """Stands in for the thought stage when fusion_lightning.thought.prompt is not there."""

    def prompts(self, queries, tasks, metrics, model=None):
        return [f"TEMPLATE[{t}] {q}" for q, t in zip(queries, tasks, strict=True)]


def test_thought_stage_rewrites_the_prompt_and_composes_with_the_router(router_ckpt, servers) -> None:
    pipe = FusedPipeline(_http(servers), router=Router.load(router_ckpt), augmenter=_StubAugmenter())
    out = pipe.run([GEO], tasks=["geography"])
    assert out[0].model == "beta" and out[0].prompt == f"TEMPLATE[geography] {GEO}"
    assert last_user(servers["beta"].bodies[-1]["messages"]) == f"TEMPLATE[geography] {GEO}"
    assert pipe.stages == ["router", "thought"]


def test_thought_stage_writes_for_the_task_the_router_inferred(router_ckpt, servers) -> None:
    """A request without a task (as most chat clients send) gets the thought stage of the task the router
    routed it under, not the task-less default; a task the request names wins."""
    pipe = FusedPipeline(_http(servers), router=Router.load(router_ckpt), augmenter=_StubAugmenter())
    plans = pipe.plan([GEO, ARITH, GEO], tasks=[None, None, "poetry"])
    assert [(p.task, p.task_source) for p in plans] == [("geography", "router"), ("arithmetic", "router"),
                                                        ("poetry", "request")]
    assert [p.prompt for p in plans] == [f"TEMPLATE[geography] {GEO}", f"TEMPLATE[arithmetic] {ARITH}",
                                         f"TEMPLATE[poetry] {GEO}"]
    chat = pipe.plan(conversations=[[{"role": "user", "content": GEO}]])[0]
    assert chat.prompt[-1]["content"] == f"TEMPLATE[geography] {GEO}"


def write_library(folder: Path) -> Path:
    """A real template library (thought level's format) embedded with the hashing encoder."""
    from fusion_lightning.data.embeddings import build_encoder
    from fusion_lightning.thought.library import Template, TemplateLibrary

    enc = build_encoder("hashing")
    rows = [("geography", "river capital country city", "Name the country, then recall its capital."),
            ("arithmetic", "add the sum of numbers", "Write each number, add them left to right, check the total."),
            ("gsm8k", "What is 1 plus 2?", "Add the two numbers and write the sum after ####.")]
    templates = [Template(Template.content_id(t, text), t, None, text, [f"q{i}"], [q], ["m"], ["s"])
                 for i, (t, q, text) in enumerate(rows)]
    lib = TemplateLibrary(enc.name)
    lib.add(templates, enc.encode([x.text for x in templates]))
    return lib.save(folder)


def test_real_template_augmenter_from_config_composes_with_the_router(router_ckpt, servers, tmp_path) -> None:
    lib = write_library(tmp_path / "lib")
    pipe = FusedPipeline.from_config({
        "backends": [{"type": "openai_compatible", "base_url": servers[n].base_url, "model": "m", "name": n,
                      "cache_dir": None, "progress": False} for n in ("alpha", "beta")],
        "router": {"ckpt": str(router_ckpt)}, "thought": {"library": str(lib), "k": 1}})
    out = pipe.run([GEO], tasks=["geography"], metrics=["GSM8K"])
    assert out[0].model == "beta" and pipe.stages == ["router", "thought"]
    sent = last_user(servers["beta"].bodies[-1]["messages"])
    assert "Name the country, then recall its capital." in sent and "add them left to right" not in sent
    assert sent.endswith(answer_instruction("GSM8K"))
    with pytest.raises(ValueError, match="thought config takes 'library'"):
        FusedPipeline.from_config({"backends": [], "thought": {"library_dir": str(lib)}})


def test_server_answers_openai_requests_through_the_router(router_ckpt, servers, tiny_dir, monkeypatch) -> None:
    monkeypatch.setenv("FUSION_SERVE_KEY", "sk-serve")
    gamma = LocalBackend(str(tiny_dir), name="gamma", progress=False)
    pipe = FusedPipeline([*_http(servers), gamma], router=Router.load(router_ckpt))
    server, url = serve_in_thread(pipe, api_key_env="FUSION_SERVE_KEY")
    try:
        client = OpenAICompatibleBackend(url, MODEL_NAME, api_key_env="FUSION_SERVE_KEY", cache_dir=None,
                                         max_retries=0, progress=False)
        gens = client.generate([ARITH, [{"role": "system", "content": "be brief"}, {"role": "user", "content": GEO}]])
        assert [g.text for g in gens] == ["alpha says #### 42", "beta says #### 42"]
        assert gens[0].input_tokens > 0 and gens[0].output_tokens == 4
        # the client's conversation goes through unchanged (no task/metric given, no thought stage)
        assert servers["beta"].bodies[-1]["messages"] == [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": GEO}]
        req = urllib.request.Request(f"{url}/models", headers={"Authorization": "Bearer sk-serve"})
        ids = [m["id"] for m in json.loads(urllib.request.urlopen(req, timeout=10).read())["data"]]
        assert ids == [MODEL_NAME, "alpha", "beta", "gamma"]
        body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": ARITH}],
                           "metric": "GSM8K", "max_tokens": 8}).encode()
        req = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST",
                                     headers={"Authorization": "Bearer sk-serve", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            reply = json.loads(r.read())
            assert r.headers["X-Fusion-Model"] == "alpha"
        assert reply["model"] == MODEL_NAME and reply["fusion"]["routed_to"] == "alpha"
        assert last_user(servers["alpha"].bodies[-1]["messages"]).endswith(answer_instruction("GSM8K"))
        direct = OpenAICompatibleBackend(url, "gamma", api_key_env="FUSION_SERVE_KEY", cache_dir=None, progress=False)
        assert direct.generate(["hello"], max_new_tokens=3)[0].output_tokens <= 3
        with pytest.raises(BackendError, match="404.*not found"):
            OpenAICompatibleBackend(url, "gpt-9", api_key_env="FUSION_SERVE_KEY", cache_dir=None,
                                    progress=False).generate(["x"])
        monkeypatch.setenv("WRONG_KEY", "nope")
        with pytest.raises(BackendError, match="401"):
            OpenAICompatibleBackend(url, MODEL_NAME, api_key_env="WRONG_KEY", cache_dir=None,
                                    progress=False).generate(["x"])
    finally:
        server.shutdown()
        server.server_close()
