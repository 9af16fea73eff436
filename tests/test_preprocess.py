"""Photo preprocessing: safe decoding of uploads and framing a photo like Fashion-MNIST."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fashion_exp import data
from fashion_exp.preprocess import (
    ImageRejected,
    open_image,
    prepare,
    render_product_photo,
    to_fashion_mnist,
)

from .conftest import real_data_dir, requires_real_data

LIMIT_BYTES, LIMIT_PIXELS = 5_000_000, 20_000_000


def garment(height: int = 28, width: int = 14) -> np.ndarray:
    """A light, textured, tall garment on black, centred like a dataset image."""
    image = np.zeros((28, 28), np.uint8)
    top, left = (28 - height) // 2, (28 - width) // 2
    texture = 150 + 100 * np.sin(np.arange(height * width).reshape(height, width) / 3.0)
    image[top:top + height, left:left + width] = texture.clip(60, 255).astype(np.uint8)
    return image


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


def test_product_photo_is_framed_back_like_the_original() -> None:
    original = garment()
    photo = render_product_photo(original, np.random.default_rng(0))
    seen = prepare(photo, LIMIT_BYTES, LIMIT_PIXELS)
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    assert np.abs(seen.astype(int) - original).mean() < 12
    rows, cols = np.flatnonzero(seen.max(1) > 40), np.flatnonzero(seen.max(0) > 40)
    assert rows[-1] - rows[0] + 1 >= 26  # the longest side fills the frame, as in the dataset
    assert abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1  # centred
    assert seen[:, :5].max() < 30 and seen[:, -5:].max() < 30  # black ground


def test_dark_background_is_not_inverted_and_small_objects_are_enlarged() -> None:
    canvas = np.full((300, 400), 20, np.uint8)  # a light object on a dark table
    canvas[100:180, 250:290] = 230
    seen = to_fashion_mnist(Image.fromarray(canvas))
    assert seen[14, 14] > 200 and seen[0, 0] == 0 and seen[14, 0] == 0
    assert (seen[:, 14] > 100).sum() == 28  # 80 px tall object now spans all 28 rows


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"),
                                      ("WEBP", "RGB"), ("GIF", "P"), ("PNG", "RGBA")])
def test_every_accepted_format_and_mode(fmt: str, mode: str) -> None:
    dark_on_white = Image.fromarray(255 - np.kron(garment(), np.ones((8, 8), np.uint8)))
    image = dark_on_white.convert(mode)
    if mode == "RGBA":  # a product cut-out: the background is transparent, not white
        alpha = np.where(np.asarray(dark_on_white) < 250, 255, 0).astype(np.uint8)
        image.putalpha(Image.fromarray(alpha))
    seen = prepare(encode(image, fmt), LIMIT_BYTES, LIMIT_PIXELS)
    assert np.abs(seen.astype(int) - garment()).mean() < 20, fmt


def test_blank_image_gives_a_black_input() -> None:
    assert prepare(encode(Image.new("RGB", (64, 64), "white"), "PNG"),
                   LIMIT_BYTES, LIMIT_PIXELS).max() == 0


@pytest.mark.parametrize("payload,status,message", [
    (b"", 400, "empty upload"),
    (b"%PDF-1.7 not an image at all", 415, "not a readable image"),
    (encode(Image.new("RGB", (40, 40)), "BMP"), 415, "BMP images are not accepted"),
    (encode(Image.new("RGB", (300, 300), "red"), "JPEG")[:400], 400, "truncated"),
    (huge_png(8000, 8000), 413, "64000000 pixels is over the limit"),
    (huge_png(60000, 60000), 413, "too large"),  # Pillow's own bomb check, before ours
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 415, "not a readable image"),
])
def test_bad_uploads_are_refused_with_a_reason(payload: bytes, status: int, message: str) -> None:
    with pytest.raises(ImageRejected, match=message) as err:
        open_image(payload, LIMIT_BYTES, LIMIT_PIXELS)
    assert err.value.status == status


def test_upload_over_the_byte_limit() -> None:
    with pytest.raises(ImageRejected, match="over the limit of 100 bytes") as err:
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        open_image(encode(Image.fromarray(noise), "PNG"), 100, LIMIT_PIXELS)
    assert err.value.status == 413


@requires_real_data
def test_real_test_images_survive_the_photo_round_trip() -> None:
    """Rendered as large JPEG product photos, real test images come back close to themselves."""
    images = data.read_idx(real_data_dir() / data.FILES["x_test"])[:200]
    rng = np.random.default_rng(1)
    diffs = [np.abs(prepare(render_product_photo(x, rng), LIMIT_BYTES, LIMIT_PIXELS)
                    .astype(int) - x).mean() for x in images]
    assert np.median(diffs) < 12, np.median(diffs)
