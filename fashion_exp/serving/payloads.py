"""What the prediction service's requests and answers look like: the pydantic models and
OpenAPI request bodies that make its API description (/docs, /redoc)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, FailFast, Field

from fashion_exp.core import preprocess

SIDE = preprocess.SIZE

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

INVOCATIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "description": "exactly one of inputs or instances",
               "properties": {key: {"type": "array", "description": "28x28 images, integers "
                                    "0-255", "items": {"type": "array"}}
                              for key in ("inputs", "instances")}}}}}}
