"""Helpers shared by the test files: synthetic IDX files, the real data, running the real
CLI, images and requests (fixtures are in conftest.py)."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_exp.core.data import DEBIAN_DIR, FILES, KERAS_CACHE

# The environment of a CLI run in a subprocess: quiet TensorFlow, unbuffered output, and no
# store inherited from the shell.
CLI_ENV = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"} | {
    "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A small PNG file whose header claims width x height pixels (a decompression bomb)."""
    png = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def framing_error(seen: np.ndarray, original: np.ndarray) -> float:
    """Mean absolute pixel difference, allowing a one-pixel shift (odd widths centre either way)."""
    return min(np.abs(np.roll(seen.astype(int), (dy, dx), (0, 1)) - original).mean()
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


# --- Bad requests to the service: each a 4xx with a reason, and the service goes on ----------

GOOD = np.zeros((28, 28), int).tolist()
BAD_REQUESTS = [
    ("27 rows", {"json": {"images": [GOOD[:27]]}}, 422, "images.0: List should have at least 28"),
    ("floats", {"json": {"images": [[[0.5] * 28] * 28]}}, 422, "valid integer"),
    ("pixel 256", {"json": {"images": [[[256] * 28] * 28]}}, 422, "less than or equal to 255"),
    ("negative", {"json": {"images": [[[-1] * 28] * 28]}}, 422, "greater than or equal to 0"),
    ("strings", {"json": {"images": [[["1"] * 28] * 28]}}, 422, "valid integer"),
    ("not JSON", {"content": b"{images: nope", "headers": {"Content-Type": "application/json"}},
     422, "Invalid JSON"),
    ("no images key", {"json": {"image": GOOD}}, 422, "images: Field required"),
    ("empty list", {"json": {"images": []}}, 422, "at least 1 item"),
    ("flat array", {"json": {"images": [0] * 784}}, 422, "images.0: Input should be a valid list"),
    ("5 images", {"json": {"images": [GOOD] * 5}}, 413, "5 images in one request: the limit is 4"),
    ("plain text", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
     "send multipart/form-data"),
    ("no files field", {"files": {"photo": ("a.png", b"x", "image/png")}}, 400, "no image found"),
    ("not an image", {"files": {"files": ("notes.txt", b"hello world", "text/plain")}}, 415,
     "notes.txt: not a readable image"),
    ("empty file", {"files": {"files": ("empty.png", b"", "image/png")}}, 400,
     "empty.png: empty upload"),
    ("truncated", {"files": {"files": ("cut.jpg", encode(Image.new("RGB", (300, 300), "red"),
                                                         "JPEG")[:700], "image/jpeg")}},
     400, "cut.jpg: corrupt or truncated"),
    ("bomb", {"files": {"files": ("bomb.png", huge_png(30000, 30000), "image/png")}}, 413,
     "bomb.png: image too large"),
    ("pixels", {"files": {"files": ("big.png", huge_png(3000, 3000), "image/png")}}, 413,
     "9000000 pixels is over the limit of 4000000"),
    ("bytes", {"files": {"files": ("big.bin", b"\xff" * 2_500_000, "image/jpeg")}}, 413,
     "over the limit of 2000000 bytes"),
    ("body", {"files": [("files", (f"{i}.bin", b"0" * 1_000_000, "image/png")) for i in range(4)]},
     413, "over the limit of 3000000 bytes"),
    ("unknown run", {"params": {"model": "runs:/0123456789abcdef/model"},
                     "json": {"images": [GOOD]}},
     404, "is not a model of this tracking store"),
    ("unknown version", {"params": {"model": "models:/fashion_serve/99"},
                         "json": {"images": [GOOD]}}, 404, "models:/fashion_serve/99"),
    ("not a model URI", {"params": {"model": "/etc/passwd"}, "json": {"images": [GOOD]}}, 404,
     "use runs:/<run_id>/model"),
    ("model path escape", {"params": {"model": f"runs:/{'0' * 32}/../../../../etc"},
                           "json": {"images": [GOOD]}}, 404, "is not a model of this tracking"),
    ("model file URI", {"params": {"model": "file:///etc"}, "json": {"images": [GOOD]}}, 404,
     "is not a model of this tracking"),
    ("5 files", {"files": [("files", (f"{i}.png", b"x", "image/png")) for i in range(5)]}, 413,
     "Too many files"),
    ("deep JSON", {"content": b"[" * 50_000, "headers": {"Content-Type": "application/json"}},
     422, "Invalid JSON"),
    ("newline in a key", {"json": {"images": [GOOD], "x\ny": 1}}, 422, "x\\ny"),
    ("thin image", {"files": {"files": ("thin.png", encode(Image.new("L", (2, 300)), "PNG"),
                                        "image/png")}}, 422, "image of 2x300 is too thin"),
    ("JSON body size", {"content": b'{"images": [' + b"0, " * 100_000 + b"0]}",
                        "headers": {"Content-Type": "application/json"}}, 413,
     "over the limit of"),
    ("top_k 0", {"params": {"top_k": 0}, "json": {"images": [GOOD]}}, 422, "top_k"),
    ("top_k 11", {"params": {"top_k": 11}, "json": {"images": [GOOD]}}, 422,
     "less than or equal to 10"),
]


def probabilities(prediction: dict) -> np.ndarray:
    """All 10 class probabilities of one /predict answer (asked with top_k=10)."""
    probs = np.zeros(10)
    for c in prediction["top"]:
        probs[c["index"]] = c["probability"]
    return probs


REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write a uint8 array as a gzipped IDX file (images: 3 dims, labels: 1 dim)."""
    if magic is None:
        magic = 0x803 if array.ndim == 3 else 0x801
    header = struct.pack(">II", magic, array.shape[0])
    if array.ndim == 3:
        header += struct.pack(">II", *array.shape[1:])
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def write_dataset(folder: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Four small synthetic files with the real names, in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28)),
        "y_train": np.arange(n_train) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28)),
        "y_test": np.arange(n_test) % 10,
    }
    for key, array in arrays.items():
        write_idx(folder / FILES[key], array)
    return folder


def real_data_dir() -> Path | None:
    """Where the real Fashion-MNIST files are on this machine, if anywhere."""
    for folder in (KERAS_CACHE, DEBIAN_DIR):
        if all((folder / name).is_file() for name in FILES.values()):
            return folder
    return None


# CI installs the real files (./dev.sh), so there a missing copy is a failure, not a skip.
requires_real_data = pytest.mark.skipif(
    real_data_dir() is None and not os.environ.get("CI"),
    reason="real Fashion-MNIST not installed (./dev.sh setup installs it)",
)


def run_cli(*overrides: str, tmp_path: Path, script: str | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the training entry point in a subprocess, outputs under tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [script] if script else [sys.executable, "-m", "fashion_exp.cli.train"]
    cmd += [*overrides, f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=env)
