"""What /metrics shows (Prometheus' text format): requests by route and status, their latency,
batch sizes and seconds, the queue's depth, refusals. Each app has its own registry, so that a
process (a test) may hold several apps."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/", "/v1/caption", "/v1/info", "/health", "/ready", "/metrics")
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("captioning_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("captioning_request_seconds", "HTTP request latency (seconds)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("captioning_batch_size", "images captioned per batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("captioning_batch_seconds", "seconds a batch took",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("captioning_queue_depth", "requests waiting for a batch",
                                 registry=r)
        self.refused = Counter("captioning_refused", "requests refused: queue_full, timeout",
                               ["reason"], registry=r)
        self.images = Counter("captioning_images", "images captioned, and image errors",
                              ["outcome"], registry=r)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: each HTTP request's status and seconds, by route (unknown paths: other)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
