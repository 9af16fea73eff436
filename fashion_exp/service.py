"""The prediction service: a FastAPI app over logged models, for programs and for people.

    POST /predict          photos (multipart field "files") or {"images": [28x28 ints]}, batched
    GET  /model, /models   the model a request would use; the models one can pick
    GET  /samples/random   a test-set image with its label, for the page's "try one" button
    GET  /health, /        liveness; the web page (fashion_exp/web/index.html)

Requests that arrive while the model is busy are answered by one model call together
(`Batcher`), which is where the throughput under concurrency comes from.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fashion_exp import preprocess
from fashion_exp.config import ServiceSettings as Settings
from fashion_exp.data import CLASSES
from fashion_exp.tracking import MODEL_SCHEMES, ModelRef

log = logging.getLogger(__name__)

SIDE = preprocess.SIZE
Predict = Callable[[np.ndarray], np.ndarray]  # (n, 28, 28) uint8 -> (n, 10) probabilities


# --- Request and response shapes (they make the OpenAPI description) ---------------------------

Pixel = Annotated[int, Field(ge=0, le=255)]
Row = Annotated[list[Pixel], Field(min_length=SIDE, max_length=SIDE)]
Image28 = Annotated[list[Row], Field(min_length=SIDE, max_length=SIDE)]


class ArrayRequest(BaseModel):
    """JSON body of POST /predict: Fashion-MNIST style images as they are, no preprocessing."""

    model_config = ConfigDict(extra="forbid", strict=True)
    images: list[Image28] = Field(min_length=1, description="28 rows of 28 integers 0-255 each; "
                                  "light garment on black, as in the dataset")


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
    name: str | None
    version: str | None


class PredictResponse(BaseModel):
    model: ModelRefOut
    predictions: list[Prediction]


class ModelInfo(ModelRefOut):
    run_name: str
    metrics: dict[str, float]
    classes: list[str]


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

class ModelNotFound(LookupError):
    """A model URI that names nothing loadable in the tracking store."""


class Batcher:
    """Collects the images of requests waiting for one model and runs them in one call."""

    def __init__(self, predict: Predict, executor: ThreadPoolExecutor, max_batch: int) -> None:
        self.predict, self.executor, self.max_batch = predict, executor, max_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] | None = None

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for (n, 28, 28) uint8 images, computed together with other requests'."""
        if self.queue is None:  # created inside the server's event loop
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._work())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((images, done))
        return await done

    async def _work(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            count = len(waiting[0][0])
            while not self.queue.empty() and count < self.max_batch:
                waiting.append(self.queue.get_nowait())
                count += len(waiting[-1][0])
            batch = np.concatenate([images for images, _ in waiting])
            try:
                probs = await loop.run_in_executor(self.executor, self.predict, batch)
            except Exception as err:  # answered to each waiting request, the loop goes on
                for _, done in waiting:
                    if not done.done():
                        done.set_exception(err)
                continue
            start = 0
            for images, done in waiting:
                if not done.done():  # a client that went away cancels its future
                    done.set_result(probs[start:start + len(images)])
                start += len(images)


@dataclass
class ServedModel:
    """A loaded model with what /model reports about it."""

    ref: ModelRef
    run_name: str
    metrics: dict[str, float]
    predict: Predict
    batcher: Batcher | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        """The JSON of GET /model."""
        return {**self.ref_json(), "run_name": self.run_name, "metrics": self.metrics,
                "classes": list(CLASSES)}

    def ref_json(self) -> dict[str, Any]:
        return {"uri": self.ref.uri, "run_id": self.ref.run_id, "name": self.ref.name,
                "version": self.ref.version}


class Models:
    """The default model, plus others loaded on first request and kept: at most
    settings.max_models in all, the least recently used dropped first."""

    def __init__(self, default: ServedModel, loader: Callable[[str], ServedModel],
                 settings: Settings, executor: ThreadPoolExecutor) -> None:
        self.default, self.loader, self.settings = default, loader, settings
        self.executor = executor
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self.lock = asyncio.Lock()
        self._attach(default)

    def _attach(self, model: ServedModel) -> ServedModel:
        model.batcher = Batcher(model.predict, self.executor, self.settings.max_batch)
        return model

    async def get(self, uri: str | None) -> ServedModel:
        """The model for a request's `model` parameter (None: the default)."""
        if uri is None or uri == "" or uri == self.default.ref.uri:
            return self.default
        if not uri.startswith(MODEL_SCHEMES):
            raise ModelNotFound(f"model={uri!r}: use runs:/<run_id>/model, "
                                "models:/<name>/<version> or models:/<name>@<alias>")
        async with self.lock:  # one load at a time; a second request for it waits here
            if uri not in self.loaded:
                self.loaded[uri] = self._attach(await asyncio.to_thread(self.loader, uri))
                # The default counts as one; the model just loaded always stays.
                while len(self.loaded) > max(1, self.settings.max_models - 1):
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(uri)
            return self.loaded[uri]


# --- Turning a request into images -------------------------------------------------------------

def one_line(err: ValidationError) -> str:
    """The first problem pydantic found, with its location, and how many more there are."""
    problems = err.errors(include_url=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return (f"{where}: {first['msg']}{more}; expected "
            '{"images": [<28 rows of 28 integers 0-255>, ...]}')


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - lets Starlette parse a form from what was read
    return body


def prepare_uploads(uploads: list[tuple[str, bytes]], settings: Settings) -> np.ndarray:
    """Photos to model inputs; the first bad one is refused, naming the file."""
    images = []
    for name, data in uploads:
        try:
            images.append(preprocess.prepare(data, settings.max_upload_bytes,
                                             settings.max_image_pixels, settings.object_size))
        except preprocess.ImageRejected as err:
            raise HTTPException(err.status, f"{name}: {err}") from None
    return np.stack(images)


async def read_images(request: Request, settings: Settings) -> tuple[np.ndarray, list[str]]:
    """(n, 28, 28) uint8 images and their names from a multipart or JSON request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise HTTPException(415, f"Content-Type {kind or 'missing'!r}: send multipart/form-data "
                                 "with image files in field 'files', or application/json "
                                 '{"images": [...]}')
    body = await read_body(request, settings.max_request_bytes)
    if kind == "application/json":
        try:
            images = ArrayRequest.model_validate_json(body).images
        except ValidationError as err:
            raise HTTPException(422, one_line(err)) from None
        check_count(len(images), settings)
        return np.asarray(images, dtype=np.uint8), [f"images[{i}]" for i in range(len(images))]
    try:
        form = await request.form(max_files=settings.max_images, max_fields=8)
    except HTTPException as err:  # Starlette's own refusal (too many files, bad boundary)
        raise HTTPException(400, f"multipart body refused: {err.detail}") from None
    try:
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise HTTPException(400, "no image found: upload files in multipart field 'files'")
        check_count(len(files), settings)
        uploads = [(f.filename or f"files[{i}]", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()
    images = await asyncio.to_thread(prepare_uploads, uploads, settings)
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

def create_app(default: ServedModel, loader: Callable[[str], ServedModel], settings: Settings,
               choices: Callable[[], list[dict[str, str]]] | None = None,
               samples: tuple[np.ndarray, np.ndarray] | None = None) -> FastAPI:
    """The service for `default`; `loader` loads other models by URI (raising ModelNotFound),
    `choices` lists the models the page offers, `samples` are test images and labels."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    models = Models(default, loader, settings, executor)
    rng = np.random.default_rng()

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fashion_exp prediction service", version="1",
                  description="Fashion-MNIST classifiers logged by fashion_exp, served over "
                              "HTTP. Photos are framed like the dataset before prediction.",
                  lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0]
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse({"detail": f"{where}: {first['msg']}"}, status_code=422)

    @app.exception_handler(ModelNotFound)
    async def _no_model(_: Request, err: ModelNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"{err} (GET /models lists the models available)"},
                            status_code=404)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("fashion_exp").joinpath("web/index.html").read_text())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: answers while the service can take requests."""
        return {"status": "ok", "default_model": default.ref.uri,
                "models_loaded": 1 + len(models.loaded)}

    @app.get("/model", response_model=ModelInfo)
    async def model_info(model: str | None = Query(None, description="model URI; "
                                                   "default: the service's model")) -> Any:
        """Which run, registered name/version and test metrics a model URI stands for."""
        return (await models.get(model)).info()

    @app.get("/models", response_model=ModelList)
    async def model_list() -> Any:
        """Models the page can ask: the default, registered versions, the best logged runs."""
        listed = await asyncio.to_thread(choices) if choices else []
        return {"default": default.ref.uri, "models": listed or
                [{"uri": default.ref.uri, "label": default.ref.uri}]}

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
        served = await models.get(model)
        images, names = await read_images(request, settings)
        probs = await served.batcher(images)
        return JSONResponse({"model": served.ref_json(), "predictions": [
            {"source": name, "top": top_classes(p, top_k), "image": image.tolist()}
            for name, p, image in zip(names, probs, images, strict=True)]})

    return app
