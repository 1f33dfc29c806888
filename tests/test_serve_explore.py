"""Exploration in serve: the routing policy's probabilities on hand examples, the settings' checks, and
the real server (official `openai` client, a planted router over three HTTP upstreams) drawing with
an epsilon policy, logging each answer's propensity and policy id, and the log read back as a bandit log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai_server import FakeOpenAIServer, loopback_without_proxy
from planted import fit_planted_router

from fusion_lightning.data.logtable import load_logs
from fusion_lightning.data.readers import read_source
from fusion_lightning.serve import MODEL_NAME, serve_in_thread
from fusion_lightning.serving import OpenAICompatibleBackend
from fusion_lightning.serving.explore import (
    Exploration,
    choice_probabilities,
    router_policy_id,
    sample_choices,
)
from fusion_lightning.serving.pipeline import FusedPipeline

NAMES = ("alpha", "beta", "gamma")  # the planted router's models with a backend; delta has none
QUERIES = ("add the sum of these numbers plus digits", "what is the total of these numbers added",
           "which river crosses the capital city of this country", "name the mountain on the border of this country")


# -- the pure policy ----------------------------------------------------------------------------------
SCORES = np.array([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 1.0, 9.0], [2.0, 2.0, 7.0, 0.5]])
AVAILABLE = np.array([True, True, False, True])  # column 2 has no backend: K = 3


def test_greedy_and_epsilon_probabilities_by_hand() -> None:
    greedy = choice_probabilities(SCORES, AVAILABLE, Exploration())
    # row 2: the unavailable column's 7.0 is ignored and the tie 2.0 = 2.0 goes to the first column
    np.testing.assert_array_equal(greedy, [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    eps = choice_probabilities(SCORES, AVAILABLE, Exploration("epsilon", epsilon=0.3))
    np.testing.assert_allclose(eps, [[0.1, 0.8, 0, 0.1], [0.1, 0.1, 0, 0.8], [0.8, 0.1, 0, 0.1]], atol=1e-12)
    np.testing.assert_allclose(choice_probabilities(SCORES, AVAILABLE, Exploration("epsilon", epsilon=1.0)),
                               np.tile([1 / 3, 1 / 3, 0, 1 / 3], (3, 1)), atol=1e-12)


def test_softmax_and_floor_probabilities_by_hand() -> None:
    soft = choice_probabilities(SCORES, AVAILABLE, Exploration("softmax", temperature=2.0))
    e = [math.exp(0.5), math.exp(1.5), 0.0, math.exp(0.0)]
    np.testing.assert_allclose(soft[0], np.array(e) / sum(e), atol=1e-12)
    e = [math.exp(2.5), math.exp(0.5), 0.0, math.exp(4.5)]
    np.testing.assert_allclose(soft[1], np.array(e) / sum(e), atol=1e-12)
    floored = choice_probabilities(SCORES, AVAILABLE, Exploration("softmax", temperature=2.0, floor=0.1))
    np.testing.assert_allclose(floored, 0.7 * soft + 0.1 * AVAILABLE, atol=1e-12)  # (1 - K·floor)·p + floor
    assert floored[:, AVAILABLE].min() >= 0.1
    eps_floor = choice_probabilities(SCORES, AVAILABLE, Exploration("epsilon", epsilon=0.3, floor=0.2))
    np.testing.assert_allclose(eps_floor[0], [0.4 * 0.1 + 0.2, 0.4 * 0.8 + 0.2, 0, 0.4 * 0.1 + 0.2], atol=1e-12)
    uniform = choice_probabilities(SCORES, AVAILABLE, Exploration("softmax", floor=1 / 3))
    np.testing.assert_allclose(uniform, np.tile([1 / 3, 1 / 3, 0, 1 / 3], (3, 1)), atol=1e-12)
    for p in (soft, floored, eps_floor, uniform):
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
        assert (p[:, ~AVAILABLE] == 0).all()


def test_settings_are_checked_with_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown explore 'greedy'; valid: \['none', 'epsilon', 'softmax'\]"):
        Exploration("greedy")
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        Exploration("epsilon", epsilon=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        Exploration("softmax", temperature=0.0)
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1/K\] = \[0, 0.3333\] with K=3"):
        choice_probabilities(SCORES, AVAILABLE, Exploration("epsilon", floor=0.4))
    with pytest.raises(ValueError, match="floor needs explore: epsilon or softmax"):
        Exploration("none", floor=0.1)
    with pytest.raises(ValueError, match="router.temperature applies to explore: softmax, not explore: epsilon"):
        Exploration.from_config({"explore": "epsilon", "temperature": 0.5})
    with pytest.raises(ValueError, match="router.epsilon applies to explore: epsilon, not explore: none"):
        Exploration.from_config({"epsilon": 0.5})
    with pytest.raises(ValueError, match="seed must be an integer"):
        Exploration.from_config({"explore": "softmax", "seed": "x"})
    # the settings are checked before the checkpoint is loaded, and unknown router keys list the valid ones
    with pytest.raises(ValueError, match="unknown explore 'ucb'"):
        FusedPipeline.from_config({"backends": [], "router": {"ckpt": "missing.ckpt", "explore": "ucb"}})
    with pytest.raises(ValueError, match="router config takes 'ckpt' \\(required\\), 'lam', 'tolerance', 'explore', 'epsilon'"):
        FusedPipeline.from_config({"backends": [], "router": {"ckpt": "x.ckpt", "eps": 0.1}})


def test_policy_ids_name_the_checkpoint_and_the_settings() -> None:
    assert router_policy_id("3f9a0c1d2e4b", Exploration()) == "router:3f9a0c1d2e4b"
    assert router_policy_id("3f9a0c1d2e4b", Exploration("epsilon", epsilon=0.2)) == "router:3f9a0c1d2e4b:epsilon=0.2"
    assert (router_policy_id("3f9a0c1d2e4b", Exploration("softmax", temperature=0.5, floor=0.05, seed=3), lam=0.5)
            == "router:3f9a0c1d2e4b:lam=0.5:temperature=0.5:floor=0.05")  # the seed changes draws, not the policy
    assert (router_policy_id("3f9a0c1d2e4b", Exploration("epsilon", epsilon=0.1), tolerance=0.02)
            == "router:3f9a0c1d2e4b:tol=0.02:epsilon=0.1")
    assert router_policy_id("3f9a0c1d2e4b", Exploration(), tolerance=0.0) == "router:3f9a0c1d2e4b:tol=0"


def test_sampling_follows_the_probabilities_never_draws_zero_and_repeats_with_a_seed() -> None:
    probs = np.tile([0.2, 0.0, 0.5, 0.3, 0.0], (20_000, 1))
    drawn = sample_choices(probs, np.random.default_rng(0))
    freq = np.bincount(drawn, minlength=5) / len(drawn)
    assert freq[1] == freq[4] == 0
    np.testing.assert_allclose(freq, probs[0], atol=4 * math.sqrt(0.25 / len(drawn)))
    again = sample_choices(probs, np.random.default_rng(0))
    np.testing.assert_array_equal(drawn, again)
    one_hot = np.eye(4)[[3, 0, 2]]
    np.testing.assert_array_equal(sample_choices(one_hot, np.random.default_rng(1)), [3, 0, 2])


# -- the pipeline and the server ----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _env(monkeypatch):
    loopback_without_proxy(monkeypatch)


@pytest.fixture(scope="module")
def router_ckpt(tmp_path_factory) -> Path:
    return fit_planted_router(tmp_path_factory.mktemp("explore_router"), epochs=5)


@pytest.fixture(scope="module")
def upstreams():
    made = {n: FakeOpenAIServer(api_key=None, answer=lambda m, n=n: f"{n} answers").start() for n in NAMES}
    yield made
    for s in made.values():
        s.stop()


def pipeline_config(upstreams, router: dict) -> dict:
    backends = [{"type": "openai_compatible", "base_url": upstreams[n].base_url, "model": "m", "name": n,
                 "cache_dir": None, "progress": False, "max_retries": 1, "max_concurrency": 64} for n in NAMES]
    return {"backends": backends, "router": router, "sampling": {"max_new_tokens": 2}}


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def read_records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.glob("requests-*.jsonl")) for line in f.read_text().splitlines()]


def test_pipeline_plans_carry_the_softmax_policy_probabilities_and_a_seed_repeats_them(router_ckpt, upstreams):
    router = {"ckpt": str(router_ckpt), "explore": "softmax", "temperature": 0.5, "floor": 0.05, "seed": 7}
    pipe = FusedPipeline.from_config(pipeline_config(upstreams, router))
    assert pipe.policy_id == f"router:{file_hash(router_ckpt)}:temperature=0.5:floor=0.05"
    probs = pipe.choice_probabilities(list(QUERIES))
    models = pipe.router.models
    assert probs[:, models.index("delta")].tolist() == [0.0] * len(QUERIES)  # no backend: never chosen
    plans = pipe.plan(list(QUERIES) * 5)
    for i, p in enumerate(plans):
        assert p.policy == pipe.policy_id
        assert p.propensity == pytest.approx(probs[i % len(QUERIES), models.index(p.model)], abs=1e-6)
    again = FusedPipeline.from_config(pipeline_config(upstreams, router)).plan(list(QUERIES) * 5)
    assert [p.model for p in again] == [p.model for p in plans]  # seeded: the same draws
    direct = pipe.plan(list(QUERIES[:1]), models=["beta"])[0]
    assert (direct.model, direct.propensity, direct.policy) == ("beta", 1.0, "direct:beta")
    with pytest.raises(ValueError, match="explore: epsilon needs a router"):
        FusedPipeline([OpenAICompatibleBackend(upstreams["alpha"].base_url, "m", name="alpha", cache_dir=None)],
                      explore=Exploration("epsilon"))


def test_pipeline_routes_by_tolerance_and_explores_around_its_choice(router_ckpt, upstreams):
    """`router.tolerance`: the cheapest backend predicted within τ of the best available one; epsilon
    explores around that choice and the policy id says the rule."""
    pipe = FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": 0.05,
                                                                 "explore": "epsilon", "epsilon": 0.3}))
    assert pipe.policy_id == f"router:{file_hash(router_ckpt)}:tol=0.05:epsilon=0.3"
    res = pipe.router.route(list(QUERIES))
    available = np.array([m in NAMES for m in pipe.router.models])
    perf = np.where(available, res.perf, -np.inf)
    expected = []
    for i in range(len(QUERIES)):  # by hand: within 0.05 of the best available, then the cheapest
        near = np.flatnonzero(perf[i] >= perf[i].max() - 0.05)
        expected.append(int(near[np.argmin(res.cost[i, near])]))
    probs = pipe.choice_probabilities(list(QUERIES))
    for i, j in enumerate(expected):
        assert probs[i, j] == pytest.approx(0.7 + 0.3 / 3)
        assert probs[i, ~available].sum() == 0
    greedy = FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": 0.05}))
    assert greedy.route(list(QUERIES)) == [pipe.router.models[j] for j in expected]
    wide = FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": 1.0}))
    cheapest = [pipe.router.models[int(np.argmin(np.where(available, c, np.inf)))] for c in res.cost]
    assert wide.route(list(QUERIES)) == cheapest  # τ = 1 admits every model: the cheapest available
    with pytest.raises(ValueError, match="softmax has nothing to weigh"):
        FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": 0.05,
                                                              "explore": "softmax"}))
    with pytest.raises(ValueError, match="give lam .* or tolerance .*, not both"):
        FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": 0.05,
                                                              "lam": 0.5}))
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": -0.1}))


def test_server_explores_with_epsilon_logs_propensities_and_reads_back_as_a_bandit_log(router_ckpt, upstreams,
                                                                                        tmp_path):
    eps, k, n_req = 0.5, len(NAMES), 200
    pipe = FusedPipeline.from_config(pipeline_config(
        upstreams, {"ckpt": str(router_ckpt), "explore": "epsilon", "epsilon": eps}))
    policy = f"router:{file_hash(router_ckpt)}:epsilon=0.5"
    assert pipe.policy_id == policy
    probs = pipe.choice_probabilities(list(QUERIES))  # the server routes without a task, so this does too
    col = {m: pipe.router.models.index(m) for m in NAMES}
    best = {q: max(NAMES, key=lambda m, i=i: probs[i, col[m]]) for i, q in enumerate(QUERIES)}
    np.testing.assert_allclose(np.sort(probs[:, list(col.values())], axis=1),
                               np.tile([eps / k, eps / k, 1 - eps + eps / k], (len(QUERIES), 1)), atol=1e-12)

    log_dir = tmp_path / "log"
    server, url = serve_in_thread(pipe, log_dir=str(log_dir), batch_wait_ms=5)
    try:
        async def ask(c: openai.AsyncOpenAI, gate: asyncio.Semaphore, q: str) -> tuple[str, str]:
            async with gate:
                r = await c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": q}],
                                                    max_tokens=2)
            return r.id, r.fusion["routed_to"]

        async def run() -> list[tuple[str, str]]:
            gate = asyncio.Semaphore(32)
            async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as c:
                return await asyncio.gather(*(ask(c, gate, QUERIES[i % len(QUERIES)]) for i in range(n_req)))

        replies = asyncio.run(run())
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        two = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": QUERIES[0]}],
                                        max_tokens=2, n=2)
        direct = c.chat.completions.create(model="gamma", messages=[{"role": "user", "content": QUERIES[2]}],
                                           max_tokens=2)
        for rid, model in replies[:40]:  # scored: the same (query, model) gets the same score
            r = httpx.post(f"{url}/feedback", json={"id": rid, "score": float(model == "alpha")})
            assert r.status_code == 200, r.text
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        server.fusion.request_log.flush()
    finally:
        server.shutdown()
        server.server_close()

    records = read_records(log_dir)
    by_id = {r["request_id"]: r for r in records if r.get("feedback_at") is None}  # the answers, not feedback
    served = [by_id[rid] for rid, _ in replies]
    assert [r["llm"] for r in served] == [m for _, m in replies]
    counts = {q: {m: 0 for m in NAMES} for q in QUERIES}
    for r in served:
        p = probs[QUERIES.index(r["query"]), col[r["llm"]]]
        assert r["policy"] == policy and r["propensity"] == pytest.approx(p, abs=1e-12)
        counts[r["query"]][r["llm"]] += 1
    n_q = n_req // len(QUERIES)
    # the empirical choice frequencies: within 4.5 binomial standard errors. Unseeded on purpose: with a fixed
    # seed the requests' near-cyclic arrival makes each query's draws a fixed slice of one sequence, a check
    # of that slice rather than of the sampler (seed 0's slice for the third query is 4 SE off)
    for q in QUERIES:
        for m in NAMES:
            p = probs[QUERIES.index(q), col[m]]
            assert abs(counts[q][m] / n_q - p) <= 4.5 * math.sqrt(p * (1 - p) / n_q), (q, m, counts[q], p)
    explored = sum(r["llm"] != best[r["query"]] for r in served)
    logged = sum(float(v) for v in re.findall(r'^fusion_explored_total\{model="\w+"\} (\S+)$', metrics, re.M))
    assert logged >= explored > 0  # the n=2 request may have explored too

    two_records = [r for r in records if r["request_id"] == two.id]
    assert [r["choice"] for r in two_records] == [0, 1]
    assert len({(r["propensity"], r["policy"], r["llm"]) for r in two_records}) == 1
    assert two_records[0]["propensity"] == pytest.approx(probs[0, col[two_records[0]["llm"]]], abs=1e-12)
    direct_record = next(r for r in records if r["request_id"] == direct.id)
    assert (direct_record["propensity"], direct_record["policy"]) == (1.0, "direct:gamma")
    scored = [r for r in records if r.get("feedback_at") is not None]
    assert len(scored) == 40 and all(r["policy"] == policy and 0 < r["propensity"] < 1 for r in scored)

    src = read_source("llmfusionbench", log_dir)  # the scored answers, with how they were chosen
    rows = src.table.to_pylist()
    assert len(rows) == 40 and {r["policy"] for r in rows} == {policy}
    assert sorted(r["propensity"] for r in rows) == pytest.approx(sorted(r["propensity"] for r in scored))
    logs = load_logs("llmfusionbench", log_dir, duplicates="mean", split="query")
    assert set(logs.table["policy"].to_pylist()) == {policy}
    assert all(min(abs(v - (1 - eps + eps / k)), abs(v - eps / k)) < 1e-9 for v in logs.table["propensity"].to_pylist())


def test_greedy_serving_logs_propensity_one_and_its_policy_id(router_ckpt, upstreams, tmp_path):
    pipe = FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt)}))
    plain = FusedPipeline.from_config({**pipeline_config(upstreams, {}), "router": None, "default": "beta"})
    assert pipe.explore == Exploration() and plain.policy_id == "default:beta"
    for p, name in ((pipe, "router"), (plain, "plain")):
        log_dir = tmp_path / name
        server, url = serve_in_thread(p, log_dir=str(log_dir))
        try:
            c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
            for q in QUERIES:
                c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": q}], max_tokens=2)
            c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": QUERIES[3]}], max_tokens=2,
                                      n=2)
            metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
            server.fusion.request_log.flush()
        finally:
            server.shutdown()
            server.server_close()
        records = read_records(log_dir)
        assert len(records) == len(QUERIES) + 2 and all(r["propensity"] == 1.0 for r in records)
        want = f"router:{file_hash(router_ckpt)}" if name == "router" else "default:beta"
        assert [r["policy"] for r in records] == [want] * len(QUERIES) + ["direct:alpha"] * 2
        assert "fusion_explored_total{" not in metrics  # greedy: nothing explored


def test_server_with_tolerance_answers_from_the_rule_s_model_through_the_openai_client(router_ckpt, upstreams, tmp_path):
    """`router.tolerance` served for real: the official client's answers come from the backend the rule picks,
    and the request log says the policy (`:tol=τ`) with propensity 1."""
    pipe = FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(router_ckpt), "tolerance": 1.0}))
    expected = pipe.route(list(QUERIES))
    server, url = serve_in_thread(pipe, log_dir=str(tmp_path / "log"))
    try:
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        answers = [c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": q}],
                                             max_tokens=2) for q in QUERIES]
        server.fusion.request_log.flush()
    finally:
        server.shutdown()
        server.server_close()
    assert [a.choices[0].message.content for a in answers] == [f"{m} answers" for m in expected]
    records = read_records(tmp_path / "log")
    assert [r["policy"] for r in records] == [f"router:{file_hash(router_ckpt)}:tol=1"] * len(QUERIES)
    assert all(r["propensity"] == 1.0 for r in records)


def test_the_loop_closes_serve_explore_feedback_retrain_off_policy_and_serve_the_new_router(router_ckpt, upstreams,
                                                                                           tmp_path):
    """Served traffic with ε-exploration, scored by feedback, is a bandit log `fit` trains on off-policy (DR
    pseudo-rewards, off-policy estimates in place of the full table); the new checkpoint then serves under its
    own policy id."""
    from planted import _WORDS, MODELS

    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit

    rng = np.random.default_rng(0)
    tasks = ("arithmetic", "geography")
    queries = [(t, f"served {t} question {i}: " + " ".join(rng.choice(_WORDS[t], 4))) for i in range(120)
               for t in (tasks[i % 2],)]
    pipe = FusedPipeline.from_config(pipeline_config(
        upstreams, {"ckpt": str(router_ckpt), "explore": "epsilon", "epsilon": 0.6, "seed": 1}))
    log_dir = tmp_path / "log"
    server, url = serve_in_thread(pipe, log_dir=str(log_dir), batch_wait_ms=5)
    try:
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        for task, q in queries:
            r = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": q}], max_tokens=2,
                                          extra_body={"task": task})
            p_right = MODELS[r.fusion["routed_to"]][0][tasks.index(task)]
            score = float(rng.random() < p_right)  # the planted truth: alpha on arithmetic, beta on geography
            assert httpx.post(f"{url}/feedback", json={"id": r.id, "score": score}).status_code == 200
        server.fusion.request_log.flush()
    finally:
        server.shutdown()
        server.server_close()

    run_dir = tmp_path / "retrained"
    summary = fit(compose_recipe("router_mlp", ["data=llmfusionbench", f"data.path={log_dir}", "data.split=query",
                                                "encoder=hashing", f"run_dir={run_dir}", "trainer.max_epochs=10",
                                                "logger=none"]))
    assert summary["data"]["bandit_log"] == 1 and summary["data"]["calls_per_query_max"] == 1
    m = summary["metrics"]
    assert m["test/ope/dr/perf_lo"] <= m["test/ope/dr/perf"] <= m["test/ope/dr/perf_hi"]
    assert "test/oracle/perf" not in m and (run_dir / "ope_report.md").exists()
    notes = json.loads((run_dir / "data_report.json").read_text())["notes"]
    assert any("off_policy=auto (dr, importance weights clipped at 10)" in n for n in notes)

    new_ckpt = run_dir / summary["artifacts"]["best_checkpoint"]
    new = FusedPipeline.from_config(pipeline_config(upstreams, {"ckpt": str(new_ckpt), "explore": "epsilon",
                                                                "epsilon": 0.1}))
    assert new.policy_id == f"router:{file_hash(new_ckpt)}:epsilon=0.1" != pipe.policy_id
    log2 = tmp_path / "log2"
    server, url = serve_in_thread(new, log_dir=str(log2))
    try:
        r = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": queries[0][1]}], max_tokens=2)
        assert r.fusion["routed_to"] in NAMES
        server.fusion.request_log.flush()
    finally:
        server.shutdown()
        server.server_close()
    (record,) = read_records(log2)
    assert record["policy"] == new.policy_id and 0 < record["propensity"] <= 1
