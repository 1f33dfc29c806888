"""Serving benchmark: direct-to-upstream vs through `fusion-router`, side by side in one run.

Three kinds of process on 127.0.0.1: the upstream test backends (tests/openai_server.py: `alpha` and
`beta`, threaded, HTTP/1.1 keep-alive) that stand in for models: `--words` words, the first after
`--upstream-ms` (prefill), then one every `--token-ms` (decoding; a plain answer waits for all of
them, a stream sends each as it comes); the router (`python -m fusion_lightning.serve` at its defaults
on a router checkpoint trained here on the planted log with `--encoder`: `minilm`, the default encoder a
deployment runs, or `hashing`, no model on the request path, over those two backends), and this load
generator (httpx on asyncio). For each of 1, 8, 32 and 128 concurrent clients, plain and streaming,
the same requests go straight to the upstreams (alternating alpha/beta, as routing spreads them)
and through the router: req/s, p50 / p99 latency (to the last byte) and failures (a non-200, a
transport error or a stream without `data: [DONE]`), and where a routed request's time went (the
server's `fusion_stage_seconds` histograms: encode, route, upstream, write-back; mean ms per request).

    python bench/serve.py [--encoder minilm] [--clients 1 8 32 128] [--requests 4] [--upstream-ms 300] ...
    python bench/serve.py --encoder hashing --upstream-ms 50     # the earlier rows: a model-free router
    python bench/serve.py --upstream-ms 0 --token-ms 0     # no model time: CPU-bound, the router's cost alone

`--requests` is per client (at least 64 per cell). Writes the Markdown table to bench/out/serve_<encoder>_<ms>ms.md.
Targets (issue 25, the defaults: MiniLM router, 0.3 s upstreams): 0 failures; >= 0.9x direct throughput
at 32 clients and >= 0.8x at 128; the router adds <= 50 ms p50 at 32, or the stage breakdown says what is
left and why. Every process shares the machine's cores: on a busy machine absolute numbers fall, the
router (a third process in the path) most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["add the sum of these numbers plus digits {i}", "which river crosses the capital city {i}",
           "multiply the product of the total numbers {i}", "name the mountain on the border of country {i}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstreams_main(ports: list[int], delay_s: float, token_s: float, words: int) -> None:
    """The upstream process: alpha and beta until stdin closes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from openai_server import FakeOpenAIServer

    filler = " ".join(f"w{i}" for i in range(words - 2))
    servers = [FakeOpenAIServer(api_key=None, delay_s=delay_s, token_delay_s=token_s, port=p,
                                answer=lambda m, n=n: f"{n} says {filler}").start() for n, p in zip(("alpha", "beta"), ports, strict=True)]
    print("ready", flush=True)
    sys.stdin.read()
    for s in servers:
        s.stop()


def train_router(work: Path, encoder: str) -> Path:
    """`router_mlp` on the planted log with `encoder`: the checkpoint the router process serves."""
    sys.path.insert(0, str(ROOT / "tests"))
    from planted import planted_overrides

    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import fit

    overrides = [o for o in planted_overrides(work, "trainer.max_epochs=5", "logger=none", "callbacks=none")
                 if not o.startswith("datamodule.encoder=")]
    summary = fit(compose_recipe("router_mlp", [*overrides, f"encoder={encoder}"]))
    return work / "run" / summary["artifacts"]["best_checkpoint"]


STAGES = ("encode", "route", "upstream", "write_back")


def stage_seconds(url: str) -> dict[str, tuple[float, float]]:
    """stage -> (sum of seconds, count) of the server's fusion_stage_seconds histograms so far."""
    text = httpx.get(url, timeout=10).text
    out = {}
    for stage in STAGES:
        vals = [float(re.search(rf'^fusion_stage_seconds_{k}{{stage="{stage}"}} (\S+)$', text, re.M).group(1))
                for k in ("sum", "count")]
        out[stage] = (vals[0], vals[1])
    return out


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


async def _one(client: httpx.AsyncClient, url: str, model: str, query: str, stream: bool) -> float | None:
    """Seconds to the last byte, or None for a failure."""
    body = {"model": model, "messages": [{"role": "user", "content": query}], "max_tokens": 256}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(url, json=body)
            ok = r.status_code == 200 and bool(r.json()["choices"][0]["message"]["content"])
        else:
            async with client.stream("POST", url, json={**body, "stream": True}) as r:
                ok, done = r.status_code == 200, False
                async for line in r.aiter_lines():
                    done = done or line.strip() == "data: [DONE]"
                    ok = ok and '"error"' not in line[:20]
                ok = ok and done
    except (httpx.HTTPError, ValueError, KeyError):
        ok = False
    return time.perf_counter() - t0 if ok else None


_CELL = iter(range(1, 1 << 30))  # each cell's prompts are new: the router's embedding memo never answers them


async def load(targets: list[tuple[str, str]], clients: int, total: int, stream: bool) -> dict:
    """`clients` concurrent workers send `total` requests, round robin over (url, model) targets. Workers
    share httpx pools of 8 connections (one big httpx pool costs CPU linear in its size per request)."""
    pools = [httpx.AsyncClient(limits=httpx.Limits(max_connections=8, max_keepalive_connections=8), timeout=120,
                               trust_env=False) for _ in range(-(-clients // 8))]
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))
    cell = next(_CELL) * 1_000_000

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in counter:
            url, model = targets[i % len(targets)]
            dt = await _one(client, url, model, QUERIES[i % len(QUERIES)].format(i=cell + i), stream)
            if dt is None:
                failures += 1
            else:
                latencies.append(dt)

    try:
        for i in range(min(clients, 8)):  # warm the connections
            await _one(pools[0], *targets[i % len(targets)], "warm up", stream)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(pools[k // 8]) for k in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        for c in pools:
            await c.aclose()
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"req_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "failures": failures, "n": total}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(rows: list[dict], levels: list[int], note: str) -> str:
    out = ["| clients | mode | path | req/s | p50 ms | p99 ms | failures | router CPU ms/req | encode | route "
           "| upstream | write-back |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = f"{r['router_cpu_ms']:.1f}" if r.get("router_cpu_ms") is not None else ""
        stages = " | ".join(f"{r[f'{s}_ms']:.1f}" if f"{s}_ms" in r else "" for s in STAGES)
        out.append(f"| {r['clients']} | {r['mode']} | {r['path']} | {r['req_s']:.0f} | {r['p50_ms']:.1f} | "
                   f"{r['p99_ms']:.1f} | {r['failures']}/{r['n']} | {cpu} | {stages} |")
    out += ["", "| clients | mode | router req/s ÷ direct | router p50 − direct p50 (ms) |", "|---:|---|---:|---:|"]
    for c in levels:
        for mode in ("plain", "stream"):
            d, f = (next(r for r in rows if r["clients"] == c and r["mode"] == mode and r["path"] == p)
                    for p in ("direct", "router"))
            out.append(f"| {c} | {mode} | {f['req_s'] / d['req_s']:.2f} | {f['p50_ms'] - d['p50_ms']:+.1f} |")
    return "\n".join(out + ["", note])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--requests", type=int, default=4, help="requests per client (at least 64 per cell)")
    ap.add_argument("--encoder", default="minilm", help="the router's query encoder: minilm (the default a "
                    "deployment runs) or hashing (no model on the request path)")
    ap.add_argument("--upstream-ms", type=float, default=300.0, help="time to the first word")
    ap.add_argument("--token-ms", type=float, default=10.0, help="time between words")
    ap.add_argument("--words", type=int, default=24)
    ap.add_argument("--router-threads", type=int, default=1, help="the router process's OMP_NUM_THREADS (its "
                    "encoder's threads; every other process runs one)")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="serve's batch_wait_ms (default: serve's)")
    ap.add_argument("--out", default=None, help="default bench/out/serve_<encoder>_<upstream-ms>.md")
    ap.add_argument("--_upstreams", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._upstreams:
        upstreams_main(args._upstreams, args.upstream_ms / 1000, args.token_ms / 1000, args.words)
        return 0
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt = train_router(work, args.encoder)
    out_path = Path(args.out or ROOT / "bench" / "out" / f"serve_{args.encoder}_{args.upstream_ms:g}ms.md")
    ports = [_free_port(), _free_port()]
    up = subprocess.Popen([sys.executable, __file__, "--_upstreams", *map(str, ports), "--upstream-ms",
                           str(args.upstream_ms), "--token-ms", str(args.token_ms), "--words", str(args.words)],
                          stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env)
    router = None
    try:
        assert up.stdout.readline().strip() == "ready"
        backends = [{"type": "openai_compatible", "base_url": f"http://127.0.0.1:{p}/v1", "model": "m", "name": n,
                     "cache_dir": None, "progress": False}  # serve's defaults: no hidden cap
                    for n, p in zip(("alpha", "beta"), ports, strict=True)]
        cfg = work / "pipeline.json"
        cfg.write_text(json.dumps({"backends": backends, "router": {"ckpt": str(ckpt)}}))
        rport = _free_port()
        extra = [f"batch_wait_ms={args.batch_wait_ms}"] if args.batch_wait_ms is not None else []
        router = subprocess.Popen([sys.executable, "-m", "fusion_lightning.serve", f"config={cfg}", f"port={rport}",
                                   *extra], env={**env, "OMP_NUM_THREADS": str(args.router_threads)},
                                  stdout=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{rport}/health", router)
        metrics_url = f"http://127.0.0.1:{rport}/metrics"
        direct = [(f"http://127.0.0.1:{p}/v1/chat/completions", "m") for p in ports]
        routed = [(f"http://127.0.0.1:{rport}/v1/chat/completions", "fusion-router")]
        rows = []
        for clients in args.clients:
            total = max(64, clients * args.requests)
            for mode in ("plain", "stream"):
                for path, targets in (("direct", direct), ("router", routed)):
                    before, stages0 = cpu_seconds(router.pid), stage_seconds(metrics_url)
                    r = asyncio.run(load(targets, clients, total, mode == "stream"))
                    after, stages1 = cpu_seconds(router.pid), stage_seconds(metrics_url)
                    if path == "router" and before is not None and after is not None:
                        r["router_cpu_ms"] = 1000 * (after - before) / total  # warm-up requests included
                    if path == "router":  # mean ms per routed request in each stage (warm-up included)
                        for st in STAGES:
                            n = stages1[st][1] - stages0[st][1]
                            r[f"{st}_ms"] = 1000 * (stages1[st][0] - stages0[st][0]) / n if n else float("nan")
                    rows.append({"clients": clients, "mode": mode, "path": path, **r})
                    print(f"{clients:>4} {mode:<6} {path:<6} {r['req_s']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                          f"p99 {r['p99_ms']:7.1f} ms  failures {r['failures']}/{r['n']}", flush=True)
        load_avg = os.getloadavg()
        wait = f"batch_wait_ms={args.batch_wait_ms:g}" if args.batch_wait_ms is not None else "serve's defaults"
        note = (f"Router: router_mlp with encoder={args.encoder}, {wait}, {args.router_threads} thread(s). Upstream: {args.words} words, "
                f"the first after {args.upstream_ms:g} ms, then one every {args.token_ms:g} ms; {os.cpu_count()} cores, "
                f"load average {load_avg[0]:.1f} at the end; requests per cell max(64, {args.requests} x clients).")
        md = table(rows, args.clients, note)
        print("\n" + md)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(md + "\n")
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        up.stdin.close()
        up.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
