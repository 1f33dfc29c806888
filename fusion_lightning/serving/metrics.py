"""Prometheus metrics of the server (`GET /metrics`), on a registry of its own per server, so two
servers in one process (tests) never share counters.

    fusion_requests_total{endpoint, status}             requests answered, by HTTP status
    fusion_request_latency_seconds{endpoint, stream}    histogram: receipt to last byte
    fusion_routed_total{model}                          answers per backend the request went to
    fusion_explored_total{model}                        of those, the policy's exploratory choices (not
                                                        the router's argmax; router `explore`)
    fusion_errors_total{kind}                           request (4xx), upstream (502), queue_full (503: an
                                                        upstream queue was full), stream (mid-stream), ...
    fusion_batch_size{stage}                            histogram: requests per routing / local batch
    fusion_batch_seconds{stage}                         histogram: time in one batch call
    fusion_stage_seconds{stage}                         histogram: where a chat request's time goes: encode
                                                        (its routing batch in the encoder), route (waiting for
                                                        the batch, scoring, the prompt), upstream (to the last
                                                        piece of the answer), write_back (log record, reply)
    fusion_tokens_total{model, kind}                    prompt and completion tokens
    fusion_requests_in_flight                           gauge
    fusion_upstream_in_flight{backend}                  gauge: calls to an HTTP backend in flight now
    fusion_upstream_queued{backend}                     gauge: calls waiting for one of its slots now
    fusion_upstream_rejected_total{backend}             calls refused at once because its queue was full

The upstream figures are read from the backends (`upstream_load()`, `upstream_rejected`: see
openai_http.py) when /metrics is scraped; backends without them (in-process models) have none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("encode", "route", "upstream", "write_back")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fusion_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("fusion_request_latency_seconds", "Request latency, receipt to last byte",
                                 ["endpoint", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.routed = Counter("fusion_routed", "Answers per backend", ["model"], registry=r)
        self.explored = Counter("fusion_explored", "Routed answers that explored (not the router's argmax)",
                                ["model"], registry=r)
        self.errors = Counter("fusion_errors", "Errors by kind", ["kind"], registry=r)
        self.batch_size = Histogram("fusion_batch_size", "Requests per batch", ["stage"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("fusion_batch_seconds", "Seconds in one batch call", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("fusion_stage_seconds", "Seconds of a chat request in each stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self._stages = {s: self.stage_seconds.labels(s) for s in STAGES}
        self.tokens = Counter("fusion_tokens", "Tokens", ["model", "kind"], registry=r)
        self.in_flight = Gauge("fusion_requests_in_flight", "Requests being answered", registry=r)
        self.upstream_in_flight = Gauge("fusion_upstream_in_flight", "Calls to an HTTP backend in flight",
                                        ["backend"], registry=r)
        self.upstream_queued = Gauge("fusion_upstream_queued", "Calls waiting for a slot of an HTTP backend",
                                     ["backend"], registry=r)

    def watch_upstreams(self, backends: Mapping[str, Any]) -> None:
        """Gauges of each HTTP backend's calls in flight and waiting, and its count of refused calls,
        read from the backends at scrape time."""
        watched = {n: b for n, b in backends.items() if callable(getattr(b, "upstream_load", None))}
        for name, b in watched.items():
            self.upstream_in_flight.labels(name).set_function(lambda b=b: b.upstream_load()[0])
            self.upstream_queued.labels(name).set_function(lambda b=b: b.upstream_load()[1])
        if watched:
            self.registry.register(_Rejected(watched))

    def stage(self, name: str, seconds: float) -> None:
        self._stages[name].observe(max(seconds, 0.0))

    def batch(self, stage: str):
        """An `on_batch(size, seconds)` callback for a MicroBatcher."""
        size, seconds = self.batch_size.labels(stage), self.batch_seconds.labels(stage)

        def on_batch(n: int, s: float) -> None:
            size.observe(n)
            seconds.observe(s)

        return on_batch

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Rejected(Collector):
    """fusion_upstream_rejected_total{backend}: the backends' own counts, read at scrape time."""

    def __init__(self, backends: Mapping[str, Any]):
        self.backends = dict(backends)

    def collect(self):
        c = CounterMetricFamily("fusion_upstream_rejected", "Calls to an HTTP backend refused at once: its queue "
                                "was full", labels=["backend"])
        for name, b in self.backends.items():
            c.add_metric([name], b.upstream_rejected)
        yield c
