"""MLflow's scoring protocol, as `mlflow models serve` speaks it for our models' signature.

Our logged models take one unnamed tensor, uint8 of shape (-1, 28, 28) (tracking/logged_models
`signature`). For such a model MLflow's scoring server (mlflow/pyfunc/scoring_server)

- accepts `application/json` (charset utf-8 only) holding exactly one of the keys `inputs` or
  `instances`, whose value is a list of 28x28 images; other keys are ignored;
- converts the values with `np.array(value, dtype=uint8)`: integers 0-255, booleans, and
  strings of digits pass (floats are truncated); integers out of range and anything else are
  refused;
- answers `{"predictions": [[10 probabilities], ...]}`, and refuses bad input with a status
  and `{"error_code": ..., "message": ...}`: 400 BAD_REQUEST when the body cannot be read as
  the tensor, 400 INVALID_PARAMETER_VALUE when the tensor has the wrong shape, 415 (plain text)
  for other content types and charsets.

This module answers the same. One deliberate difference: numpy turns a float outside
[0, 256) into an arbitrary byte, so MLflow scores such an image silently; here it is refused
(400 BAD_REQUEST). Two limits MLflow has not: at most max_images
images per request and a bounded body (413, error_code BAD_REQUEST).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

import numpy as np

from fashion_exp.schemas import IMAGE_SIDE as SIDE

CONTENT_TYPE = "application/json"
NPY_TYPE = "application/x-npy"  # one array as numpy.save writes it: (n, 28, 28) numbers
FORMAT_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")
EXPECTED = '{"inputs": [<28 rows of 28 integers 0-255>, ...]}'
# The MLflow release whose protocol this is (GET /version answers it, as MLflow's server does).
MLFLOW_VERSION = version("mlflow")


class ScoringError(Exception):
    """A request refused the way MLflow's scoring server refuses it."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message

    def body(self) -> bytes:
        """MLflow's error JSON (plain text for 415, as MLflow answers those)."""
        if self.status == 415:
            return self.message.encode()
        return json.dumps({"error_code": self.error_code, "message": self.message}).encode()

    @property
    def media_type(self) -> str:
        return "text/plain" if self.status == 415 else CONTENT_TYPE


def bad_request(message: str) -> ScoringError:
    """The body is not a tensor MLflow could build (400 BAD_REQUEST)."""
    return ScoringError(400, "BAD_REQUEST", f"Invalid input. {message}")


def wrong_shape(shape: tuple[int, ...]) -> ScoringError:
    """A tensor of the wrong shape (400 INVALID_PARAMETER_VALUE, as MLflow's schema check)."""
    return ScoringError(400, "INVALID_PARAMETER_VALUE",
                        f"Shape of input {shape} does not match expected shape (-1, 28, 28): "
                        f"send {EXPECTED}")


def too_large(message: str) -> ScoringError:
    """A request over one of the service's limits (413; MLflow's clients read its
    REQUEST_LIMIT_EXCEEDED as 429, a rate limit to retry, so that code is not used)."""
    return ScoringError(413, "BAD_REQUEST", message)


def check_content_type(header: str | None) -> str:
    """The request's media type: JSON in UTF-8, or NPY_TYPE (one .npy array, which MLflow's
    server does not take). ScoringError(415) otherwise, checked in MLflow's order: charset,
    parameters, then the type (csv and parquet: 400, as MLflow cannot read them as this tensor
    either). A missing header is 415 here (MLflow's server fails with 500)."""
    mime, *parameters = [part.strip() for part in (header or "").split(";")]
    if mime.lower() == NPY_TYPE and not parameters:
        return NPY_TYPE
    pairs = dict(p.partition("=")[::2] for p in parameters if p)
    if pairs.get("charset", "utf-8").strip().lower() != "utf-8":
        raise ScoringError(415, "", "The scoring server only supports UTF-8")
    if unknown := set(pairs) - {"charset"}:
        raise ScoringError(415, "", f"Unrecognized content type parameters: "
                                    f"{', '.join(sorted(unknown))}.")
    mime = mime.lower()
    if mime in ("text/csv", "application/vnd.apache.parquet"):
        raise bad_request(f"Content-Type {mime}: this model takes a tensor of shape "
                          f"(-1, 28, 28); send {CONTENT_TYPE} {EXPECTED}")
    if mime != CONTENT_TYPE:
        raise ScoringError(415, "", "This predictor only supports the following content types: "
                                    f"Types: ['{CONTENT_TYPE}', '{NPY_TYPE}']. "
                                    f"Got {header or ''!r}.")
    return CONTENT_TYPE


def parse_npy(body: bytes, max_images: int) -> np.ndarray:
    """(n, 28, 28) uint8 images from one .npy array (numpy.save's format, no pickled
    objects), converted by the rules of JSON bodies; ScoringError otherwise."""
    import io

    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise bad_request(f"{NPY_TYPE}: not one .npy array: {str(err)[:100]}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise bad_request(f"{NPY_TYPE}: an array of numbers is needed, not "
                          f"{getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim == 3 and len(array) > max_images:
        raise too_large(f"{len(array)} images in one request: the limit is {max_images}")
    if array.ndim != 3 or array.shape[1:] != (SIDE, SIDE) or len(array) == 0:
        raise wrong_shape(array.shape)
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise bad_request("pixel values must be finite numbers in [0, 256)")
    return to_uint8(array)


def parse(body: bytes, max_images: int) -> np.ndarray:
    """(n, 28, 28) uint8 images from an /invocations JSON body; ScoringError otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, nested too deep
        raise bad_request("Ensure that input is a valid JSON formatted string. Error: "
                          f"{str(err)[:100]}") from None
    if not isinstance(payload, dict):
        raise bad_request(f"The input must be a JSON dictionary with exactly one of the input "
                          f"fields {sorted(FORMAT_KEYS)}; received {type(payload).__name__}.")
    keys = [key for key in FORMAT_KEYS if key in payload]
    if len(keys) != 1:
        raise ScoringError(400, "BAD_REQUEST", "The input must be a JSON dictionary with exactly "
                           f"one of the input fields {sorted(FORMAT_KEYS)}. Received dictionary "
                           f"with input fields: {sorted(map(str, payload))[:8]}.")
    key, value = keys[0], payload[keys[0]]
    if key.startswith("dataframe"):
        raise ScoringError(400, "INVALID_PARAMETER_VALUE", f"{key}: this model takes a tensor "
                           f"of shape (-1, 28, 28), not a table; send {EXPECTED}")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        # Named inputs: this signature has none (MLflow refuses the two keys differently).
        code = "INVALID_PARAMETER_VALUE" if key == "instances" else "BAD_REQUEST"
        raise ScoringError(400, code, f"{key}: this model has one unnamed input; send {EXPECTED}")
    if not isinstance(value, (list, int, float, bool, str)):
        raise bad_request(f"{key}: this model has one unnamed input of shape (-1, 28, 28), "
                          f"not {type(value).__name__}; send {EXPECTED}")
    if is_image_list(value) and len(value) > max_images:
        raise too_large(f"{len(value)} images in one request: the limit is {max_images}")
    images = to_uint8(value)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or len(images) == 0:
        raise wrong_shape(images.shape)
    return images


def is_image_list(value: Any) -> bool:
    """Whether a value is shaped like a list of images (a list whose first item is a list of
    lists, or empty), which is how the image count is read before any conversion; one image
    on its own (a list of rows of numbers) is not."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], list)
            and (not value[0] or isinstance(value[0][0], list)))


def to_uint8(value: Any) -> np.ndarray:
    """The array MLflow builds with np.array(value, dtype=uint8), without its silent wrap of
    out-of-range floats.

    Converted through int64, one Python int() per element, as MLflow's cast converts: floats
    are truncated, strings must be integers ("7", not "7.5"), NaN and infinities are refused.
    (numpy would make a list holding text a fixed-width string array first: element count x
    longest string x 4 bytes, gigabytes from a 200 kB body.)"""
    try:
        array = np.asarray(value, dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - ragged lists, words, objects: all the input's
        raise bad_request(f"{type(err).__name__}: {str(err)[:200]}") from None
    if array.size and (array.min() < 0 or array.max() > 255):
        bad = array.min() if array.min() < 0 else array.max()
        raise bad_request(f"Python integer {bad} out of bounds for uint8 (pixel values are "
                          "0-255)")
    if array.size and array.min() == 0 and (low := lowest(value)) < 0:
        # A float in (-1, 0) truncates to 0: outside [0, 256) all the same.
        raise bad_request(f"pixel value {low} is out of bounds for uint8 (pixel values are "
                          "in [0, 256))")
    return array.astype(np.uint8)


def lowest(value: Any) -> float:
    """The smallest number in a value already read as integers, before truncation."""
    try:
        return float(np.asarray(value, dtype=np.float64).min())
    except (ValueError, TypeError, OverflowError):  # text numpy reads otherwise: no floats
        return 0.0


def predictions(probs: np.ndarray) -> bytes:
    """MLflow's answer: {"predictions": [[10 probabilities], ...]} with float32 values as
    Python floats (the same text MLflow's NumpyEncoder writes). Never a bare NaN or Infinity,
    which are not JSON (the batcher fails a request whose answer holds one)."""
    return json.dumps({"predictions": probs.tolist()}, allow_nan=False).encode()
