"""The prediction service's endpoints, registered on its app one group at a time: the page, the
models, predictions (/predict), MLflow's scoring protocol and /metrics; and how the errors
raised along the way are answered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from fashion_exp.core.data import CLASSES
from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.serving import scoring
from fashion_exp.serving.batching import ModelFailed
from fashion_exp.serving.decoding import (
    JSON_INLINE_BYTES,
    ClientGone,
    json_limit,
    read_body,
    read_images,
)
from fashion_exp.serving.following import AliasFollower
from fashion_exp.serving.models import (
    Models,
    ModelUnusable,
    ServedModel,
    StoreUnavailable,
    ref_json,
)
from fashion_exp.serving.payloads import (
    INVOCATIONS_BODY,
    UPLOAD_BODY,
    ModelInfo,
    ModelList,
    PredictResponse,
    Sample,
)
from fashion_exp.serving.prometheus import ServiceMetrics
from fashion_exp.tracking.logged_models import ModelRef, UnknownModel

log = logging.getLogger(__name__)

MODEL_FAILED = "the model failed on this input; the service's log has the details"
Choices = Callable[[ServedModel], list[dict[str, str]]]  # the page's models, given the default


@dataclass
class ServiceParts:
    """What the endpoints of one app share."""

    models: Models
    settings: Settings
    metrics: ServiceMetrics
    decoder: ThreadPoolExecutor  # decodes uploaded photos, decode_workers at a time
    follower: AliasFollower | None = None
    choices: Choices | None = None
    samples: tuple[np.ndarray, np.ndarray] | None = None  # test images and their labels


# --- Errors ------------------------------------------------------------------------------------

def add_error_handlers(app: FastAPI) -> None:
    """Answer the errors requests run into with one line each (JSON {"detail": ...})."""

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


# --- The page and the models -------------------------------------------------------------------

def add_page_routes(app: FastAPI) -> None:
    """GET / (the web page) and /favicon.ico."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        page = resources.files("fashion_exp.serving").joinpath("web/index.html")
        return HTMLResponse(page.read_text())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        # The page carries its icon inline; browsers that ask anyway get no icon, not a 404.
        return Response(status_code=204)


def add_model_routes(app: FastAPI, parts: ServiceParts) -> None:
    """GET /health, /model, /models and /samples/random."""
    models, follower, choices, samples = parts.models, parts.follower, parts.choices, parts.samples
    rng = np.random.default_rng()

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


# --- Predictions -------------------------------------------------------------------------------

def add_predict_route(app: FastAPI, parts: ServiceParts) -> None:
    """POST /predict: top-k classes for photos or 28x28 arrays, batched with other requests."""
    models, settings, metrics = parts.models, parts.settings, parts.metrics

    @app.post("/predict", response_model=None, openapi_extra=UPLOAD_BODY,
              responses={200: {"model": PredictResponse}})
    async def predict(request: Request,
                      model: str | None = Query(None, description="model URI; default: the "
                                                "service's model"),
                      top_k: int = Query(settings.top_k, ge=1, le=len(CLASSES),
                                         description="how many classes to return")) -> Any:
        """Top-k classes for uploaded photos (framed like the dataset first) or 28x28 arrays."""
        ref, served = await models.get(model)
        images, names = await read_images(request, settings, parts.decoder)
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


def top_classes(probs: np.ndarray, k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one image, most probable first."""
    order = np.argsort(probs)[::-1][:k]
    return [{"label": CLASSES[i], "index": int(i), "probability": round(float(probs[i]), 6)}
            for i in order]


# --- MLflow's scoring protocol (fashion_exp/serving/scoring.py) --------------------------------

def add_scoring_routes(app: FastAPI, parts: ServiceParts) -> None:
    """GET /ping, /version and POST /invocations, as `mlflow models serve` answers them."""
    models, settings, metrics = parts.models, parts.settings, parts.metrics

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
            images = await read_scoring_images(request, settings)
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


async def read_scoring_images(request: Request, settings: Settings) -> np.ndarray:
    """(n, 28, 28) uint8 images of an /invocations request; ScoringError, in MLflow's terms,
    for a request that has none."""
    mime = scoring.check_content_type(request.headers.get("content-type"))
    try:
        body = await read_body(request, json_limit(settings))
    except HTTPException as err:
        raise scoring.too_large(str(err.detail)) from None
    if mime == scoring.NPY_TYPE:
        return scoring.parse_npy(body, settings.max_images)
    if len(body) <= JSON_INLINE_BYTES:
        return scoring.parse(body, settings.max_images)
    return await asyncio.to_thread(scoring.parse, body, settings.max_images)


# --- Prometheus --------------------------------------------------------------------------------

def add_metrics_route(app: FastAPI, metrics: ServiceMetrics) -> None:
    """GET /metrics, left out of the API description."""

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Requests, latency, batch sizes and model events in Prometheus' text format."""
        return Response(metrics.text(), media_type=metrics.content_type)


# --- Saying which model answered ---------------------------------------------------------------

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
