"""What the service tells Prometheus: GET /metrics in its text format (prometheus-client).

    fashion_exp_requests_total{endpoint,status}      requests answered
    fashion_exp_request_seconds{endpoint}            latency histogram, request to answer
    fashion_exp_requests_in_progress{endpoint}       requests the app is working on now
    fashion_exp_request_images{endpoint}             images per predicting request
    fashion_exp_batch_images                         images per model call (batching at work)
    fashion_exp_model_info{uri,model_id,run_id,version}  1 for the model served by default
    fashion_exp_model_loads_total{result}            models loaded (loaded) or refused (failed)
    fashion_exp_model_swaps_total                    default model replaced (a moved alias)

Each app has a registry of its own, so two services in one process never mix their counts.
`endpoint` is a route of the app or "other": paths a client makes up never become labels.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fashion_exp.tracking.logged_models import ModelRef

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The service's instruments, in one registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fashion_exp_requests", "Requests answered, by endpoint and "
                                "HTTP status", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("fashion_exp_request_seconds", "Seconds from a request's "
                                 "arrival to its answer", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.in_progress = Gauge("fashion_exp_requests_in_progress", "Requests the app is "
                                 "working on now (arrived, not yet answered), by endpoint",
                                 ["endpoint"], registry=self.registry)
        self.request_images = Histogram("fashion_exp_request_images", "Images per predicting "
                                        "request", ["endpoint"], buckets=IMAGE_BUCKETS,
                                        registry=self.registry)
        self.batch_images = Histogram("fashion_exp_batch_images", "Images per model call (the "
                                      "requests batched together)", buckets=IMAGE_BUCKETS,
                                      registry=self.registry)
        self.model = Gauge("fashion_exp_model_info", "1 for the model served by default",
                           ["uri", "model_id", "run_id", "version"], registry=self.registry)
        self.loads = Counter("fashion_exp_model_loads", "Models loaded to serve (result=loaded) "
                             "or that could not be (result=failed)", ["result"],
                             registry=self.registry)
        self.swaps = Counter("fashion_exp_model_swaps", "Times the default model was replaced "
                             "(a registry alias that moved)", registry=self.registry)
        for result in ("loaded", "failed"):
            self.loads.labels(result)  # both series exist from the start, at 0

    def serving(self, ref: ModelRef) -> None:
        """Record the model now served by default (the previous one's series is removed)."""
        self.model.clear()
        self.model.labels(ref.uri, ref.model_id, ref.run_id, ref.version or "").set(1)

    def text(self) -> bytes:
        """Every metric in Prometheus' text exposition format."""
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: every HTTP request counted and timed by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics,
                 endpoints: Callable[[], Iterable[str]]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self.known: set[str] = set()  # the app's routes, read on the first request

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.known:
            self.known.update(self.endpoints())
        path = scope.get("path", "")
        endpoint = path if path in self.known else "other"
        status = [500]  # what an app that fails without answering amounts to

        async def sent(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_progress.labels(endpoint).inc()
        try:
            await self.app(scope, receive, sent)
        finally:
            self.metrics.in_progress.labels(endpoint).dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
