"""Fashion-MNIST from the four original IDX files: find, verify, read, split.

Pure NumPy; TensorFlow is imported only if the files must be downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashion_exp.schemas import IMAGE_SIDE

log = logging.getLogger(__name__)

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# MD5 of each file's *decompressed* contents, as published by Zalando. The .gz files' own
# MD5s are not usable: Debian's dataset-fashion-mnist ships the same contents recompressed,
# so its .gz checksums differ from the published ones while the data is identical.
CONTENT_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
EXPECTED_COUNT = {"x_train": 60_000, "y_train": 60_000, "x_test": 10_000, "y_test": 10_000}
KERAS_CACHE = Path.home() / ".keras" / "datasets" / "fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or put the "
    f"four files ({', '.join(FILES.values())}) in a folder and pass data.dir=<folder>"
)
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class DataError(RuntimeError):
    """The dataset is missing, corrupt, or not Fashion-MNIST."""


@dataclass(frozen=True)
class Splits:
    """Train/validation/test images (uint8, N x 28 x 28) and labels (uint8, N)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: Path


# --- Reading IDX files -------------------------------------------------------------------------

def read_idx(path: Path, verify_md5: bool = True) -> np.ndarray:
    """Read one gzipped IDX file into a uint8 array, checking magic number, shape and MD5."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable gzip file ({err}); {HOW_TO_GET}") from None
    if len(raw) < 8:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes); {HOW_TO_GET}")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == IDX_IMAGES_MAGIC:
        header, shape = 16, (count, *struct.unpack(">II", raw[8:16]))
    elif magic == IDX_LABELS_MAGIC:
        header, shape = 8, (count,)
    else:
        raise DataError(
            f"{path}: wrong IDX magic number 0x{magic:08x} (expected 0x{IDX_IMAGES_MAGIC:08x} "
            f"for images or 0x{IDX_LABELS_MAGIC:08x} for labels)"
        )
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes where the header promises {expected} "
            f"(shape {shape}); the file is truncated or corrupt; {HOW_TO_GET}"
        )
    if verify_md5 and path.name in CONTENT_MD5:
        digest = hashlib.md5(raw).hexdigest()
        if digest != CONTENT_MD5[path.name]:
            raise DataError(
                f"{path}: MD5 of the contents is {digest}, expected {CONTENT_MD5[path.name]}; "
                f"the file is corrupt or not Fashion-MNIST; {HOW_TO_GET}"
            )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_arrays(folder: Path, verify_md5: bool = True) -> dict[str, np.ndarray]:
    """Read and cross-check the four files of one folder."""
    arrays = {key: read_idx(folder / name, verify_md5) for key, name in FILES.items()}
    for key, array in arrays.items():
        if verify_md5 and len(array) != EXPECTED_COUNT[key]:
            raise DataError(f"{folder / FILES[key]}: {len(array)} items, expected "
                            f"{EXPECTED_COUNT[key]}")
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{folder / FILES['x_' + split]}: images of shape "
                            f"{images.shape[1:]}, expected {(IMAGE_SIDE, IMAGE_SIDE)}")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
        if labels.size and labels.max() >= len(CLASSES):
            raise DataError(f"{folder / FILES['y_' + split]}: label {labels.max()} "
                            f"outside 0..{len(CLASSES) - 1}")
    return arrays


# --- Finding the files -------------------------------------------------------------------------

def candidate_dirs(configured: str | None) -> list[Path]:
    """Folders searched for the files, in order."""
    dirs = [Path(configured).expanduser()] if configured else []
    return dirs + [KERAS_CACHE, DEBIAN_DIR]


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES.values())


def _download_with_keras() -> Path:
    """Let Keras fetch the files into its cache (needs internet)."""
    import keras  # heavy: only on this path

    keras.datasets.fashion_mnist.load_data()
    return KERAS_CACHE


def locate(configured: str | None, download: bool = True) -> Path:
    """The first folder that holds all four files, downloading with Keras as a last resort."""
    searched = candidate_dirs(configured)
    if configured and not _has_all(searched[0]):
        missing = [n for n in FILES.values() if not (searched[0] / n).is_file()]
        raise DataError(f"data.dir={configured!r} lacks {', '.join(missing)}; {HOW_TO_GET}")
    for folder in searched:
        if _has_all(folder):
            return folder
    if download:
        try:
            folder = _download_with_keras()
            if _has_all(folder):
                return folder
        except Exception as err:  # noqa: BLE001 - any download failure ends the same way
            log.warning("Keras could not download Fashion-MNIST: %s", err)
    where = ", ".join(str(d) for d in searched) + (", Keras download" if download else "")
    raise DataError(f"Fashion-MNIST not found (looked in {where}); {HOW_TO_GET}")


# --- Splitting ---------------------------------------------------------------------------------

def split(arrays: dict[str, np.ndarray], val_split: float, seed: int,
          limit: int | None, source: Path) -> Splits:
    """Shuffle the training set with `seed`, hold out `val_split` of it, apply `limit`."""
    x, y = arrays["x_train"], arrays["y_train"]
    order = np.random.default_rng(seed).permutation(len(x))
    if limit is not None:
        order = order[:limit]
    n_val = max(1, int(round(len(order) * val_split)))
    train_idx, val_idx = order[:-n_val], order[-n_val:]
    n_test = len(arrays["x_test"]) if limit is None else min(limit, len(arrays["x_test"]))
    return Splits(
        x_train=x[train_idx], y_train=y[train_idx], x_val=x[val_idx], y_val=y[val_idx],
        x_test=arrays["x_test"][:n_test], y_test=arrays["y_test"][:n_test], source=source,
    )


def load(dir: str | None, val_split: float, seed: int, limit: int | None = None,
         verify_checksums: bool = True, download: bool = True) -> Splits:
    """Find, verify and split Fashion-MNIST as the data config says."""
    folder = locate(dir, download)
    log.info("Reading Fashion-MNIST from <%s>", folder)
    return split(load_arrays(folder, verify_checksums), val_split, seed, limit, folder)
