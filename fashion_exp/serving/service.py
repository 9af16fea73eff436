"""The prediction service: a FastAPI app over logged models, for programs and for people.

    POST /predict          photos (multipart field "files") or {"images": [28x28 ints]}, batched
    GET  /model, /models   the model a request would use; the models one can pick
    GET  /samples/random   a test-set image with its label, for the page's "try one" button
    GET  /health, /        liveness; the web page (fashion_exp/serving/web/index.html)
    GET  /docs, /redoc     the API description, with its assets served here (works offline)

This module builds the app from its parts and starts and stops them with it: the models
(models.py, called in batches by batching.py), the endpoints (routes.py), request decoding
(decoding.py), the request and answer shapes (payloads.py), /metrics (prometheus.py) and a
registry alias followed (following.py).

What it trusts and what it does not (docs/serving.md has the whole threat model): the tracking
store is trusted; every request is not. A request's `model` is a reference looked up in the
store, never a path; bodies are bounded before they are parsed, images before they are
decoded, and parsing, validation and decoding run off the event loop, so /health answers
while they work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.serving import routes, scoring
from fashion_exp.serving.following import AliasFollower
from fashion_exp.serving.models import Models, ModelUnusable, ServedModel
from fashion_exp.serving.prometheus import CountRequests, ServiceMetrics
from fashion_exp.tracking.logged_models import ModelRef
from fashion_exp.uris import printable

log = logging.getLogger(__name__)

CUT = "the service is shutting down and stopped before this request was answered; send it again"


def create_app(default: ServedModel, resolver: Callable[[str], ModelRef],
               loader: Callable[[ModelRef], ServedModel], settings: Settings,
               choices: routes.Choices | None = None,
               samples: tuple[np.ndarray, np.ndarray] | None = None,
               follow: str | None = None) -> FastAPI:
    """The service for `default`. `resolver` turns a request's model URI into a reference of
    the store (raising UnknownModel), `loader` loads a referenced model (raising
    ModelUnusable), `choices` lists the models the page offers given the current default,
    `samples` are test images, `follow` a registry alias URI whose moves the default follows
    (every settings.follow_seconds)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    decoder = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
    metrics = ServiceMetrics()
    load = counted(loader, metrics)
    models = Models(default, resolver, load, settings, executor,
                    observe=metrics.batch_images.observe)
    metrics.loads.labels("loaded").inc()  # the default, loaded before the service starts
    metrics.serving(default.ref)
    follower = alias_follower(models, follow, resolver, load, settings, metrics)
    parts = routes.ServiceParts(models, settings, metrics, decoder, follower, choices, samples)
    app = new_app(lifespan(parts, executor))
    app.state.models, app.state.follower, app.state.metrics = models, follower, metrics
    add_middleware(app, parts)
    add_routes(app, parts)
    return app


def new_app(lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]) -> FastAPI:
    """The FastAPI app, described; its /docs and /redoc JavaScript served from the package,
    not a CDN (FastAPIOffline)."""
    return FastAPIOffline(
        title="fashion_exp prediction service", version="1",
        description="Fashion-MNIST classifiers logged by fashion_exp, served over HTTP. Photos "
                    "are framed like the dataset before prediction. /ping, /version and "
                    "/invocations speak MLflow's scoring protocol.", lifespan=lifespan)


def add_middleware(app: FastAPI, parts: routes.ServiceParts) -> None:
    """Requests cut by the shutdown answered 503; every request counted (settings.metrics)."""
    app.add_middleware(AnswerCutRequests)  # inside CountRequests: the 503 is counted
    if parts.settings.metrics:
        app.add_middleware(CountRequests, metrics=parts.metrics,
                           endpoints=lambda: {getattr(r, "path", "") for r in app.routes})


def add_routes(app: FastAPI, parts: routes.ServiceParts) -> None:
    """Every endpoint, in the order the API description lists them, and the error answers."""
    routes.add_error_handlers(app)
    routes.add_page_routes(app)
    routes.add_model_routes(app, parts)
    routes.add_predict_route(app, parts)
    routes.add_scoring_routes(app, parts)
    if parts.settings.metrics:
        routes.add_metrics_route(app, parts.metrics)


def alias_follower(models: Models, follow: str | None, resolver: Callable[[str], ModelRef],
                   load: Callable[[ModelRef], ServedModel], settings: Settings,
                   metrics: ServiceMetrics) -> AliasFollower | None:
    """What keeps the default on the model alias URI `follow` names; None when not following
    (no alias, or follow_seconds=0)."""
    if not (follow and settings.follow_seconds > 0):
        return None

    def swapped(new: ServedModel) -> None:
        metrics.swaps.inc()
        metrics.serving(new.ref)

    return AliasFollower(models, follow, resolver, load, settings.follow_seconds,
                         permanent=(ModelUnusable,), on_swap=swapped)


def lifespan(parts: routes.ServiceParts, executor: ThreadPoolExecutor,
             ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's start (the alias follower) and stop (models, then the worker threads)."""

    @asynccontextmanager
    async def running(_: FastAPI) -> AsyncIterator[None]:
        following = asyncio.create_task(parts.follower.run()) if parts.follower else None
        yield
        if following:
            following.cancel()
        parts.models.close()
        executor.shutdown(wait=False, cancel_futures=True)
        parts.decoder.shutdown(wait=False, cancel_futures=True)

    return running


def counted(loader: Callable[[ModelRef], ServedModel],
            metrics: ServiceMetrics) -> Callable[[ModelRef], ServedModel]:
    """`loader`, with every load and every failure to load counted in /metrics."""
    def load(ref: ModelRef) -> ServedModel:
        try:
            model = loader(ref)
        except Exception:
            metrics.loads.labels("failed").inc()
            raise
        metrics.loads.labels("loaded").inc()
        return model

    return load


class AnswerCutRequests:
    """ASGI middleware: a request still in flight when the drain ends (drain_seconds) is
    cancelled by uvicorn, which would answer a plain-text 500 and log the CancelledError's
    traceback. Here it gets a JSON 503 (MLflow's error shape on /invocations) and one log
    line."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # handled here: the answer can still be sent
            path = printable(scope.get("path", ""))
            log.warning("%s %s: cut by the shutdown before it was answered%s", scope["method"],
                        path, "" if started else " (503)")
            if not started:  # else part of the answer is out: uvicorn closes the connection
                await send_cut(send, path)


async def send_cut(send: Any, path: str) -> None:
    """The 503 of a request cut by the shutdown: MLflow's error shape on /invocations."""
    if path == "/invocations":
        body = scoring.ScoringError(503, "TEMPORARILY_UNAVAILABLE", CUT).body()
    else:
        body = json.dumps({"detail": CUT}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"connection", b"close"),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
