"""The prediction service: a FastAPI app over logged models, for programs and for people.

    POST /predict          photos (multipart field "files") or {"images": [28x28 ints]}, batched
    GET  /model, /models   the model a request would use; the models one can pick
    GET  /samples/random   a test-set image with its label, for the page's "try one" button
    GET  /health, /        liveness; the web page (fashion_exp/serving/web/index.html)
    GET  /docs, /redoc     the API description, with its assets served here (works offline)

Requests that arrive while the model is busy are answered by one model call together
(`Batcher`), which is where the throughput under concurrency comes from.

What it trusts and what it does not (docs/serving.md has the whole threat model): the tracking
store is trusted; every request is not. A request's `model` is a reference looked up in the
store, never a path; bodies are bounded before they are parsed, images before they are
decoded, and parsing, validation and decoding run off the event loop, so /health answers
while they work.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, FailFast, Field, ValidationError
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from fashion_exp.core import preprocess
from fashion_exp.core.data import CLASSES
from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.serving import scoring
from fashion_exp.serving.following import AliasFollower
from fashion_exp.serving.prometheus import CountRequests, ServiceMetrics
from fashion_exp.tracking.logged_models import ModelRef, UnknownModel

log = logging.getLogger(__name__)

SIDE = preprocess.SIZE
Predict = Callable[[np.ndarray], np.ndarray]  # (n, 28, 28) uint8 -> (n, 10) probabilities


# --- Request and response shapes (they make the OpenAPI description) ---------------------------

# FailFast: validation stops at the first bad value instead of listing every one of them.
Pixel = Annotated[int, Field(ge=0, le=255)]
Row = Annotated[list[Pixel], FailFast(), Field(min_length=SIDE, max_length=SIDE)]
Image28 = Annotated[list[Row], FailFast(), Field(min_length=SIDE, max_length=SIDE)]


class ArrayRequest(BaseModel):
    """JSON body of POST /predict: Fashion-MNIST style images as they are, no preprocessing."""

    model_config = ConfigDict(extra="forbid", strict=True)
    images: Annotated[list[Image28], FailFast()] = Field(
        min_length=1, description="28 rows of 28 integers 0-255 each; light garment on black, "
                                  "as in the dataset")


class ClassProbability(BaseModel):
    label: str
    index: int
    probability: float


class Prediction(BaseModel):
    source: str = Field(description="upload file name, or images[i] for JSON input")
    top: list[ClassProbability] = Field(description="the top-k classes, most probable first")
    image: list[list[int]] = Field(description="the 28x28 image the model saw (0-255)")


class ModelRefOut(BaseModel):
    uri: str
    run_id: str
    model_id: str
    name: str | None
    version: str | None


class PredictResponse(BaseModel):
    model: ModelRefOut
    predictions: list[Prediction]


class FollowStatus(BaseModel):
    uri: str = Field(description="the registry alias followed, models:/<name>@<alias>")
    every_seconds: float
    checked_at: float | None = Field(description="Unix time of the last look-up that answered")
    problem: str | None = Field(description="why the version the alias names is not served "
                                            "(it failed to load, or the store did not answer)")


class ModelInfo(ModelRefOut):
    run_name: str
    metrics: dict[str, float]
    classes: list[str]
    run_url: str = Field("", description="the run's page in the MLflow UI: the tracking "
                                          "server's, or for a local store the UI that "
                                          "./dev.sh ui starts at 127.0.0.1:5000")
    follows: FollowStatus | None = Field(None, description="for the default model when it is "
                                                           "a registry alias that is followed")


class ModelChoice(BaseModel):
    uri: str
    label: str


class ModelList(BaseModel):
    default: str
    models: list[ModelChoice]


class Sample(BaseModel):
    index: int
    label: str
    image: list[list[int]]


UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "description": "PNG, JPEG, WebP or GIF photos",
                                 "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": ArrayRequest.model_json_schema()},
}}}


# --- Models: loaded once, called in batches ----------------------------------------------------

class ModelUnusable(ValueError):
    """A logged model of the store that cannot be served: it does not take 28x28 images, or
    does not answer them with 10 class probabilities (`problem` says which; it names no
    file, so a client may read it)."""

    problem = "it is not a Keras model of (n, 28, 28) uint8 images"

    def __init__(self, uri: str, problem: str | None = None) -> None:
        self.problem = problem or self.problem
        self.reason = f"cannot be served: {self.problem}"
        super().__init__(f"model={uri!r} {self.reason}")


class ModelFailed(RuntimeError):
    """A model that failed on valid input, or answered it with something other than class
    probabilities: the service's fault (500), never sent on as numbers."""


PROBE_IMAGES = 4  # images a model answers before it may serve (a batch: rows must match)


def probe_images() -> np.ndarray:
    """What a model is asked before it serves: black, white, a gradient and fixed noise."""
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE))
    gradient = np.add.outer(np.arange(SIDE), np.arange(SIDE)) * 255 // (2 * SIDE - 2)
    return np.stack([np.zeros((SIDE, SIDE)), np.full((SIDE, SIDE), 255), gradient,
                     noise]).astype(np.uint8)


def graph_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A Keras model as a function of (n, 28, 28) uint8 batches, traced once as a graph for
    every batch size (no retracing as batches grow and shrink)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, SIDE, SIDE], tf.uint8)])
    def forward(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)

    def predict(images: np.ndarray) -> np.ndarray:
        return forward(images).numpy()

    return predict


def output_problem(probs: Any, count: int, what: str = "images") -> str | None:
    """What is wrong with a model's answer to `count` images; None when it is `count` rows of
    10 finite class probabilities (each in [0, 1], each row summing to 1)."""
    shape = np.shape(probs)
    if shape != (count, len(CLASSES)):
        return (f"its answer to {count} {what} has shape {shape}, not ({count}, "
                f"{len(CLASSES)}) class probabilities")
    probs = np.asarray(probs, np.float64)
    if not np.isfinite(probs).all():
        return f"its answer to {count} {what} is not finite (NaN or infinity)"
    if probs.min() < 0 or probs.max() > 1 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        return (f"its answer to {count} {what} is not probabilities (values in [0, 1] that "
                "sum to 1 per image: a model without softmax?)")
    return None


class StoreUnavailable(RuntimeError):
    """The tracking store did not answer a look-up (the request may be tried again)."""


class Batcher:
    """Collects the images of requests waiting for one model and runs them in one call."""

    def __init__(self, predict: Predict, executor: ThreadPoolExecutor, max_batch: int,
                 observe: Callable[[int], None] | None = None) -> None:
        self.predict, self.executor, self.max_batch = predict, executor, max_batch
        self.observe = observe  # told the size of every model call
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] | None
        self.queue = None
        self.worker: asyncio.Task | None = None
        self.closed = False

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for (n, 28, 28) uint8 images, computed together with other requests'."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            # Started inside the server's event loop; started again for a request that took
            # this model just before it was closed (a swapped or dropped model), so that
            # request is still answered, by the model it took.
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._work())
        done = loop.create_future()
        self.queue.put_nowait((images, done))
        return await done

    def close(self) -> None:
        """Stop the worker once the requests already queued are answered."""
        self.closed = True
        if self.queue is not None:
            self.queue.put_nowait(None)  # wakes an idle worker

    async def _work(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            if (first := await self.queue.get()) is None:
                if self.closed and self.queue.empty():
                    return
                continue
            waiting, count = [first], len(first[0])
            while not self.queue.empty() and count < self.max_batch:
                if (item := self.queue.get_nowait()) is not None:
                    waiting.append(item)
                    count += len(item[0])
            try:
                batch = np.concatenate([images for images, _ in waiting])
                if self.observe:
                    self.observe(len(batch))
                probs = await loop.run_in_executor(self.executor, self.predict, batch)
                if np.shape(probs) != (len(batch), len(CLASSES)):
                    raise ModelFailed(output_problem(probs, len(batch)))
            except Exception as err:  # answered to each waiting request, the loop goes on
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(err)
            else:
                start = 0
                for images, done in waiting:
                    if not done.done():  # a client that went away cancels its future
                        answer = probs[start:start + len(images)]
                        # A model checked when it was loaded may still overflow on some
                        # input: only that request fails, and no NaN reaches an answer.
                        if np.isfinite(answer).all():
                            done.set_result(answer)
                        else:
                            done.set_exception(ModelFailed(output_problem(answer,
                                                                          len(images))))
                    start += len(images)
            if self.closed and self.queue.empty():
                return


@dataclass
class ServedModel:
    """A loaded model with what /model reports about it."""

    ref: ModelRef
    run_name: str
    metrics: dict[str, float]
    predict: Predict
    batcher: Batcher | None = field(default=None, repr=False)
    run_url: str = ""  # the run's page in the MLflow UI

    def info(self, asked: ModelRef) -> dict[str, Any]:
        """The JSON of GET /model, for the reference a request asked with."""
        return {**ref_json(asked), "run_name": self.run_name, "metrics": self.metrics,
                "classes": list(CLASSES), "run_url": self.run_url}


def ref_json(ref: ModelRef) -> dict[str, Any]:
    """The reference as a request asked it, with the model it names."""
    return {"uri": ref.uri, "run_id": ref.run_id, "model_id": ref.model_id, "name": ref.name,
            "version": ref.version}


class Models:
    """The default model, plus others loaded on first request and kept: at most
    settings.max_models in all, the least recently used dropped first. Models are kept by
    the logged model a reference resolves to, so every spelling of one model loads it once."""

    def __init__(self, default: ServedModel, resolver: Callable[[str], ModelRef],
                 loader: Callable[[ModelRef], ServedModel], settings: Settings,
                 executor: ThreadPoolExecutor,
                 observe: Callable[[int], None] | None = None) -> None:
        self.default, self.resolver, self.loader = default, resolver, loader
        self.settings, self.executor, self.observe = settings, executor, observe
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()  # by logged model id
        self.lock = asyncio.Lock()
        self.reclaim: asyncio.TimerHandle | None = None  # the collection due after a drop
        self._attach(default)

    def _attach(self, model: ServedModel) -> ServedModel:
        model.batcher = Batcher(model.predict, self.executor, self.settings.max_batch,
                                self.observe)
        return model

    async def take(self, ref: ModelRef, loader: Callable[[ModelRef], ServedModel],
                   ) -> ServedModel:
        """The model `ref` names, for a swap: taken from the loaded ones if it is there,
        loaded otherwise (one load at a time, as for requests). Either way it is named by
        `ref` (the alias followed), not by the reference a request loaded it with."""
        async with self.lock:
            if ref.model_id in self.loaded:
                return replace(self.loaded.pop(ref.model_id), ref=ref)
            return await asyncio.to_thread(loader, ref)

    def swap(self, new: ServedModel) -> ServedModel:
        """Serve `new` by default from the next request on. The old default answers the
        requests that already took it and stays loaded, as the most recently used, for
        requests that name it (unless max_models is 1). Returns the old default."""
        old, self.default = self.default, new if new.batcher else self._attach(new)
        self.loaded[old.ref.model_id] = old
        while len(self.loaded) > self.settings.max_models - 1:  # the default counts as one
            self._drop(self.loaded.popitem(last=False)[1])
        return old

    def _drop(self, model: ServedModel) -> None:
        """Stop a model that leaves memory. Models may have been frozen out of the garbage
        collector's reach (cli/serve.py, following.py): once its worker has ended, one full
        collection (a pause of ~0.3 s, only when a model is dropped) reclaims it."""
        model.batcher.close()
        loop = asyncio.get_running_loop()
        # One collection for all the models dropped meanwhile (with max_models=1, every
        # request naming another model drops one).
        if gc.get_freeze_count() and (self.reclaim is None or self.reclaim.when() <= loop.time()):
            self.reclaim = loop.call_later(RECLAIM_AFTER_SECONDS, reclaim_frozen)

    async def get(self, uri: str | None) -> tuple[ModelRef, ServedModel]:
        """The reference and model for a request's `model` parameter (None: the default);
        UnknownModel when the store has no such model."""
        if uri is None or uri == "" or uri == self.default.ref.uri:
            return self.default.ref, self.default
        ref = await asyncio.to_thread(self.resolver, uri)
        if ref.model_id == self.default.ref.model_id:
            return ref, self.default
        async with self.lock:  # one load at a time; a second request for it waits here
            if ref.model_id not in self.loaded:
                model = self._attach(await asyncio.to_thread(self.loader, ref))
                if self.settings.max_models == 1:
                    # Only the default is kept: this model answers the request that named it
                    # (a closed batcher still answers what it is given) and leaves memory.
                    self._drop(model)
                    return ref, model
                self.loaded[ref.model_id] = model
                # The default counts as one; the model just loaded always stays.
                while len(self.loaded) > self.settings.max_models - 1:
                    self._drop(self.loaded.popitem(last=False)[1])
            self.loaded.move_to_end(ref.model_id)
            return ref, self.loaded[ref.model_id]

    def close(self) -> None:
        """Stop every model's batching worker (the service is shutting down)."""
        for model in (self.default, *self.loaded.values()):
            model.batcher.close()


RECLAIM_AFTER_SECONDS = 5.0  # after a model is dropped: its last requests are answered by then


def reclaim_frozen() -> None:
    """Collect garbage among frozen objects too, then freeze what lives on."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# --- Turning a request into images -------------------------------------------------------------

# A JSON body may hold max_images images of 28x28 numbers written with up to this many bytes
# each ("255, " is 5; pretty-printed JSON puts each on its own indented line): larger bodies
# are refused from their Content-Length, before a byte is parsed.
JSON_BYTES_PER_PIXEL = 16
JSON_INLINE_BYTES = 32_768  # smaller bodies are parsed on the event loop (a few images, < 1 ms)


class ClientGone(Exception):
    """The client closed the connection before its request body had arrived."""


def json_limit(settings: Settings) -> int:
    """The largest JSON body worth parsing: max_images images, generously formatted."""
    return settings.max_images * SIDE * SIDE * JSON_BYTES_PER_PIXEL + 4096


def validation_message(err: ValidationError) -> str:
    """The first problem pydantic found, with its location."""
    first = err.errors(include_url=False)[0]
    where = printable(".".join(str(part) for part in first["loc"])) or "body"
    return f'{where}: {first["msg"]}; expected {{"images": [<28 rows of 28 integers 0-255>, ...]}}'


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"request body ended after {size} bytes: the client closed the "
                         "connection or was slower than body_timeout") from None
    return b"".join(chunks)


def parse_json(body: bytes, settings: Settings) -> np.ndarray:
    """(n, 28, 28) uint8 images from a JSON body; the count is checked before the images."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:  # RecursionError: [[[[... nested too deep
        raise HTTPException(422, f"body: Invalid JSON ({str(err)[:100]}); expected "
                                 '{"images": [<28 rows of 28 integers 0-255>, ...]}') from None
    listed = payload.get("images") if isinstance(payload, dict) else None
    if isinstance(listed, list) and listed and isinstance(listed[0], list):
        check_count(len(listed), settings)  # a list of images: too many is 413, not 422
    try:
        images = ArrayRequest.model_validate(payload).images
    except ValidationError as err:
        raise HTTPException(422, validation_message(err)) from None
    return np.asarray(images, dtype=np.uint8)


def prepare_uploads(uploads: list[tuple[str, bytes]], settings: Settings) -> np.ndarray:
    """Photos to model inputs; the first bad one is refused, naming the file."""
    images = []
    for name, data in uploads:
        try:
            images.append(preprocess.prepare(data, settings.max_upload_bytes,
                                             settings.max_image_pixels, settings.object_size))
        except preprocess.ImageRejected as err:
            raise HTTPException(err.status, f"{printable(name)}: {err}") from None
        except Exception as err:  # noqa: BLE001 - a file no decoder expected: still the client's
            log.warning("upload %s could not be read: %s: %s", printable(name),
                        type(err).__name__, err)
            raise HTTPException(400, f"{printable(name)}: corrupt image: it cannot be "
                                     f"decoded ({type(err).__name__})") from None
    return np.stack(images)


def printable(text: str) -> str:
    """Client text as it may go into a one-line answer or log line: control characters
    (newlines included) escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def read_form(headers: Headers, body: bytes, settings: Settings) -> list[tuple[str, bytes]]:
    """The files of a multipart body (field 'files'), named; 413 past max_images.

    Blocking: parsing a body of up to max_request_bytes takes tens of milliseconds, so it runs
    in a worker thread, with Starlette's parser on an event loop of that thread's own."""
    async def body_stream() -> AsyncIterator[bytes]:
        yield body

    async def parse() -> list[tuple[str, bytes]]:
        parser = MultiPartParser(headers, body_stream(), max_files=settings.max_images,
                                 max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as err:
            # "Too many files/fields" is a limit (413); anything else a malformed body (400).
            status = 413 if err.message.startswith("Too many") else 400
            raise HTTPException(status, f"multipart body refused: {err.message}") from None
        try:
            files = [f for f in form.getlist("files") if not isinstance(f, str)]
            if not files:
                raise HTTPException(400, "no image found: upload files in multipart field "
                                         "'files'")
            check_count(len(files), settings)
            return [(f.filename or f"files[{i}]", await f.read()) for i, f in enumerate(files)]
        finally:
            await form.close()

    return asyncio.run(parse())


async def read_images(request: Request, settings: Settings,
                      decoder: ThreadPoolExecutor) -> tuple[np.ndarray, list[str]]:
    """(n, 28, 28) uint8 images and their names from a multipart or JSON request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise HTTPException(415, f"Content-Type {kind or 'missing'!r}: send multipart/form-data "
                                 "with image files in field 'files', or application/json "
                                 '{"images": [...]}')
    if kind == "application/json":
        body = await read_body(request, json_limit(settings))
        if len(body) <= JSON_INLINE_BYTES:
            images = parse_json(body, settings)
        else:
            images = await asyncio.to_thread(parse_json, body, settings)
        return images, [f"images[{i}]" for i in range(len(images))]
    body = await read_body(request, settings.max_request_bytes)
    uploads = await asyncio.to_thread(read_form, request.headers, body, settings)
    # decoder has settings.decode_workers threads: at most that many images are decoded at
    # once, whatever the number of requests, which bounds the memory decoding takes.
    images = await asyncio.get_running_loop().run_in_executor(
        decoder, prepare_uploads, uploads, settings)
    return images, [name for name, _ in uploads]


def check_count(count: int, settings: Settings) -> None:
    if count > settings.max_images:
        raise HTTPException(413, f"{count} images in one request: the limit is "
                                 f"{settings.max_images}")


def top_classes(probs: np.ndarray, k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one image, most probable first."""
    order = np.argsort(probs)[::-1][:k]
    return [{"label": CLASSES[i], "index": int(i), "probability": round(float(probs[i]), 6)}
            for i in order]


# --- The app -----------------------------------------------------------------------------------

def create_app(default: ServedModel, resolver: Callable[[str], ModelRef],
               loader: Callable[[ModelRef], ServedModel], settings: Settings,
               choices: Callable[[ServedModel], list[dict[str, str]]] | None = None,
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
    follower = None
    if follow and settings.follow_seconds > 0:
        def swapped(new: ServedModel) -> None:
            metrics.swaps.inc()
            metrics.serving(new.ref)

        follower = AliasFollower(models, follow, resolver, load, settings.follow_seconds,
                                 permanent=(ModelUnusable,), on_swap=swapped)
    rng = np.random.default_rng()

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        following = asyncio.create_task(follower.run()) if follower else None
        yield
        if following:
            following.cancel()
        models.close()
        executor.shutdown(wait=False, cancel_futures=True)
        decoder.shutdown(wait=False, cancel_futures=True)

    # FastAPIOffline: /docs and /redoc with their JavaScript served from the package, not a CDN.
    app = FastAPIOffline(
        title="fashion_exp prediction service", version="1",
        description="Fashion-MNIST classifiers logged by fashion_exp, served over HTTP. Photos "
                    "are framed like the dataset before prediction. /ping, /version and "
                    "/invocations speak MLflow's scoring protocol.", lifespan=lifespan)
    app.state.models, app.state.follower, app.state.metrics = models, follower, metrics
    app.add_middleware(AnswerCutRequests)  # inside CountRequests: the 503 is counted
    if settings.metrics:
        app.add_middleware(CountRequests, metrics=metrics,
                           endpoints=lambda: {getattr(r, "path", "") for r in app.routes})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0]
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse({"detail": f"{where}: {first['msg']}"}, status_code=422)

    @app.exception_handler(UnknownModel)
    async def _no_model(_: Request, err: UnknownModel) -> JSONResponse:
        return JSONResponse({"detail": f"{err} (GET /models lists the models available)"},
                            status_code=404)

    @app.exception_handler(ModelUnusable)
    async def _unusable(_: Request, err: ModelUnusable) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def _no_store(_: Request, err: StoreUnavailable) -> JSONResponse:
        log.warning("tracking store look-up failed: %s", err)
        return JSONResponse({"detail": "the tracking store did not answer; try again later"},
                            status_code=503)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, err: ClientGone) -> Response:
        log.info("%s %s: %s", request.method, request.url.path, err)
        return Response(status_code=400)  # nobody reads it: the connection is closed

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        page = resources.files("fashion_exp.serving").joinpath("web/index.html")
        return HTMLResponse(page.read_text())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        # The page carries its icon inline; browsers that ask anyway get no icon, not a 404.
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: answers while the service can take requests."""
        return {"status": "ok", "default_model": models.default.ref.uri,
                "models_loaded": 1 + len(models.loaded)}

    @app.get("/model", response_model=ModelInfo)
    async def model_info(model: str | None = Query(None, description="model URI; "
                                                   "default: the service's model")) -> Any:
        """Which run, registered name/version and test metrics a model URI stands for."""
        ref, served = await models.get(model)
        info = served.info(ref)
        if follower and served is models.default:
            info["follows"] = follower.status()
        return JSONResponse(info, headers=model_headers(ref))

    @app.get("/models", response_model=ModelList)
    async def model_list() -> Any:
        """Models the page can ask: the default, registered versions, the best logged runs."""
        current = models.default
        listed = await asyncio.to_thread(choices, current) if choices else []
        return {"default": current.ref.uri, "models": listed or
                [{"uri": current.ref.uri, "label": current.ref.uri}]}

    @app.get("/samples/random", response_model=Sample)
    async def random_sample() -> Any:
        """A random test-set image and its true label."""
        if samples is None:
            raise HTTPException(404, "no test images: the service was started without the "
                                     "dataset (serve with samples=true and the data installed)")
        i = int(rng.integers(len(samples[1])))
        return {"index": i, "label": CLASSES[int(samples[1][i])],
                "image": samples[0][i].tolist()}

    @app.post("/predict", response_model=None, openapi_extra=UPLOAD_BODY,
              responses={200: {"model": PredictResponse}})
    async def predict(request: Request,
                      model: str | None = Query(None, description="model URI; default: the "
                                                "service's model"),
                      top_k: int = Query(settings.top_k, ge=1, le=len(CLASSES),
                                         description="how many classes to return")) -> Any:
        """Top-k classes for uploaded photos (framed like the dataset first) or 28x28 arrays."""
        ref, served = await models.get(model)
        images, names = await read_images(request, settings, decoder)
        try:
            probs = await served.batcher(images)
        except Exception as err:  # noqa: BLE001 - the model failed on valid input: our fault
            model_failed(ref, "/predict", err)
            raise HTTPException(500, MODEL_FAILED) from None
        metrics.request_images.labels("/predict").observe(len(images))
        return JSONResponse({"model": ref_json(ref), "predictions": [
            {"source": name, "top": top_classes(p, top_k), "image": image.tolist()}
            for name, p, image in zip(names, probs, images, strict=True)]},
            headers=model_headers(ref))

    # --- MLflow's scoring protocol (fashion_exp/serving/scoring.py) ---------------------------

    @app.get("/ping", tags=["MLflow scoring protocol"])
    async def ping() -> Response:
        """200: the model is loaded and warm (the port opens only once it is), as
        `mlflow models serve`'s /ping answers load balancers and SageMaker."""
        return Response("\n", media_type="application/json")

    @app.get("/version", tags=["MLflow scoring protocol"])
    async def mlflow_version() -> Response:
        """The MLflow version whose scoring protocol this is."""
        return Response(scoring.MLFLOW_VERSION, media_type="application/json")

    @app.post("/invocations", tags=["MLflow scoring protocol"], response_model=None,
              openapi_extra=INVOCATIONS_BODY,
              responses={200: {"description": '{"predictions": [[10 class probabilities], '
                                              '...]}; headers name the model that answered'}})
    async def invocations(request: Request) -> Response:
        """The default model's class probabilities for 28x28 images, as `mlflow models serve`
        answers: {"inputs": [...]} or {"instances": [...]} in, {"predictions": [...]} out."""
        served = models.default  # this request is answered by this model, whatever swaps
        try:
            mime = scoring.check_content_type(request.headers.get("content-type"))
            try:
                body = await read_body(request, json_limit(settings))
            except HTTPException as err:
                raise scoring.too_large(str(err.detail)) from None
            if mime == scoring.NPY_TYPE:
                images = scoring.parse_npy(body, settings.max_images)
            elif len(body) <= JSON_INLINE_BYTES:
                images = scoring.parse(body, settings.max_images)
            else:
                images = await asyncio.to_thread(scoring.parse, body, settings.max_images)
        except scoring.ScoringError as err:
            return Response(err.body(), err.status, media_type=err.media_type)
        try:
            probs = await served.batcher(images)
        except Exception as err:  # noqa: BLE001 - the model failed on valid input: our fault
            model_failed(served.ref, "/invocations", err)
            error = scoring.ScoringError(500, "INTERNAL_ERROR", MODEL_FAILED)
            return Response(error.body(), 500, media_type=error.media_type)
        metrics.request_images.labels("/invocations").observe(len(images))
        return Response(scoring.predictions(probs), media_type=scoring.CONTENT_TYPE,
                        headers=model_headers(served.ref))

    if settings.metrics:
        @app.get("/metrics", include_in_schema=False)
        async def prometheus() -> Response:
            """Requests, latency, batch sizes and model events in Prometheus' text format."""
            return Response(metrics.text(), media_type=metrics.content_type)

    return app


INVOCATIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "description": "exactly one of inputs or instances",
               "properties": {key: {"type": "array", "description": "28x28 images, integers "
                                    "0-255", "items": {"type": "array"}}
                              for key in ("inputs", "instances")}}}}}}


MODEL_FAILED = "the model failed on this input; the service's log has the details"
CUT = "the service is shutting down and stopped before this request was answered; send it again"


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
            if started:  # part of the answer is out: uvicorn closes the connection
                return
            if path == "/invocations":
                body = scoring.ScoringError(503, "TEMPORARILY_UNAVAILABLE", CUT).body()
            else:
                body = json.dumps({"detail": CUT}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"connection", b"close"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def model_failed(ref: ModelRef, endpoint: str, err: Exception) -> None:
    """Log a model's failure on a valid request: one line for an answer that is not class
    probabilities, the traceback for an exception inside the model."""
    if isinstance(err, ModelFailed):
        log.warning("%s on a %s request: %s", ref.uri, endpoint, err)
    else:
        log.error("%s failed on a %s request", ref.uri, endpoint, exc_info=err)


def model_headers(ref: ModelRef) -> dict[str, str]:
    """Headers naming the model that answered (percent-encoded: a registered name may hold
    any character, a header only Latin-1)."""
    return {"X-Model-URI": quote(ref.uri, safe=":/@"), "X-Model-Id": ref.model_id,
            "X-Model-Version": ref.version or ""}


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
