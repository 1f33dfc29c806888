"""Prometheus metrics of the server (`GET /metrics`), on a registry of its own per server, so two
servers in one process (tests) never share counters.

    fusion_requests_total{endpoint, status}             requests answered, by HTTP status
    fusion_request_latency_seconds{endpoint, stream}    histogram: receipt to last byte
    fusion_routed_total{model}                          answers per backend the request went to
    fusion_explored_total{model}                        of those, the policy's exploratory choices (not
                                                        the router's argmax; router `explore`)
    fusion_errors_total{kind}                           request (4xx), upstream (502), stream (mid-stream), ...
    fusion_batch_size{stage}                            histogram: requests per routing / local batch
    fusion_batch_seconds{stage}                         histogram: time in one batch call
    fusion_tokens_total{model, kind}                    prompt and completion tokens
    fusion_requests_in_flight                           gauge
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        self.tokens = Counter("fusion_tokens", "Tokens", ["model", "kind"], registry=r)
        self.in_flight = Gauge("fusion_requests_in_flight", "Requests being answered", registry=r)

    def batch(self, stage: str):
        """An `on_batch(size, seconds)` callback for a MicroBatcher."""
        size, seconds = self.batch_size.labels(stage), self.batch_seconds.labels(stage)

        def on_batch(n: int, s: float) -> None:
            size.observe(n)
            seconds.observe(s)

        return on_batch

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
