"""Photo preprocessing: safe decoding of uploads and framing a photo like Fashion-MNIST."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fashion_exp.core import data
from fashion_exp.core.preprocess import (
    ADAM7,
    ImageRejected,
    open_image,
    prepare,
    render_product_photo,
    to_fashion_mnist,
)

from .helpers import encode, framing_error, huge_png, real_data_dir, requires_real_data

LIMIT_BYTES, LIMIT_PIXELS = 5_000_000, 20_000_000


def garment(height: int = 28, width: int = 14) -> np.ndarray:
    """A light, textured, tall garment on black, centred like a dataset image."""
    image = np.zeros((28, 28), np.uint8)
    top, left = (28 - height) // 2, (28 - width) // 2
    texture = 150 + 100 * np.sin(np.arange(height * width).reshape(height, width) / 3.0)
    image[top:top + height, left:left + width] = texture.clip(60, 255).astype(np.uint8)
    return image


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


# --- Every bit depth and colour type of PNG, and files whose header lies ----------------------

def raw_png(pixels: np.ndarray, color_type: int, bit_depth: int, interlace: bool = False) -> bytes:
    """A PNG written byte by byte, for what Pillow cannot save (16-bit colour, 2 bits,
    interlacing). `pixels`: (h, w) or (h, w, channels) samples already at `bit_depth`."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = b"".join(png_rows(pixels[y0::dy, x0::dx], bit_depth) for x0, y0, dx, dy in passes)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_rows(pixels: np.ndarray, bit_depth: int) -> bytes:
    """Rows of samples as PNG stores them unfiltered: a 0 byte, then the packed samples."""
    height, width = pixels.shape[:2]
    if bit_depth == 16:
        rows = [pixels[y].astype(">u2").tobytes() for y in range(height)]
    elif bit_depth == 8:
        rows = [pixels[y].astype(np.uint8).tobytes() for y in range(height)]
    else:  # 1, 2 or 4 bits: samples packed into bytes, most significant first
        per_byte = 8 // bit_depth
        rows = []
        for y in range(height):
            row = np.zeros(-(-width // per_byte), np.uint8)
            for x in range(width):
                row[x // per_byte] |= int(pixels[y, x]) << (8 - bit_depth * (x % per_byte + 1))
            rows.append(row.tobytes())
    return b"".join(b"\x00" + row for row in rows)


def big_garment() -> np.ndarray:
    """A dataset garment at 4x, as 8-bit samples (the reference every depth is compared to)."""
    return np.kron(garment(), np.ones((4, 4), np.uint8))


def as_depth(gray8: np.ndarray, bits: int) -> np.ndarray:
    """8-bit samples at another bit depth, scaled as PNG encoders scale them."""
    return (gray8.astype(np.uint32) * (2 ** bits - 1) // 255).astype(np.uint32)


PNG_KINDS = {  # name: (color type, bit depth, samples from 8-bit gray)
    "gray 1-bit": (0, 1, lambda g: (g > 0).astype(np.uint32)),
    "gray 2-bit": (0, 2, lambda g: as_depth(g, 2)),
    "gray 4-bit": (0, 4, lambda g: as_depth(g, 4)),
    "gray 16-bit": (0, 16, lambda g: as_depth(g, 16)),
    "gray+alpha 16-bit": (4, 16, lambda g: np.dstack([as_depth(g, 16),
                                                       np.full(g.shape, 65535)])),
    "rgb 16-bit": (2, 16, lambda g: np.dstack([as_depth(g, 16)] * 3)),
    "rgba 16-bit": (6, 16, lambda g: np.dstack([as_depth(g, 16)] * 3
                                               + [np.full(g.shape, 65535)])),
}


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "interlaced"])
@pytest.mark.parametrize("kind", PNG_KINDS)
def test_every_png_depth_gives_the_image_of_its_8_bit_twin(kind: str, interlace: bool) -> None:
    color_type, bits, samples = PNG_KINDS[kind]
    values = samples(big_garment())
    gray = values if values.ndim == 2 else values[..., 0]
    twin8 = (gray * 255 // (2 ** bits - 1)).astype(np.uint8)  # the same image at 8 bits
    twin = prepare(raw_png(twin8, 0, 8), LIMIT_BYTES, LIMIT_PIXELS)
    seen = prepare(raw_png(values, color_type, bits, interlace), LIMIT_BYTES, LIMIT_PIXELS)
    assert twin.max() > 200  # the reference is a real garment, not a blank
    assert np.abs(seen.astype(int) - twin).max() <= 2, kind  # 16 to 8 bits rounds by one


def test_palette_with_transparency_is_read_with_its_alpha() -> None:
    gray = big_garment()
    light = Image.fromarray(255 - gray).convert("P")  # dark garment on white
    light.info["transparency"] = light.getpixel((0, 0))  # the white ground is transparent
    seen = prepare(encode(light, "PNG"), LIMIT_BYTES, LIMIT_PIXELS)
    assert seen.max() > 200 and framing_error(seen, garment()) < 20


def lying_jpeg() -> bytes:
    """A real small JPEG whose header was edited to claim 4000x4000 pixels."""
    jpeg = bytearray(encode(Image.fromarray(big_garment()), "JPEG"))
    start = jpeg.find(b"\xff\xc0")  # the baseline frame header: length, precision, height, width
    jpeg[start + 5:start + 9] = struct.pack(">HH", 4000, 4000)
    return bytes(jpeg)


def lying_png() -> bytes:
    """A real PNG whose header claims twice its height, with the header's checksum fixed."""
    png = bytearray(encode(Image.fromarray(big_garment()), "PNG"))
    png[20:24] = struct.pack(">I", 2 * 112)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.parametrize("name,payload,message", [
    ("jpeg header", lying_jpeg(), "cannot hold the 4000x4000 pixels"),
    ("png header", lying_png(), "corrupt or truncated PNG"),
    ("png data cut", raw_png(big_garment(), 0, 8, interlace=True)[:-400], "corrupt or truncated"),
    ("png checksum", encode(Image.fromarray(big_garment()), "PNG")[:-20] + b"\x00" * 20,
     "corrupt or truncated"),
    ("gif cut", encode(Image.fromarray(big_garment()), "GIF")[:-300], "corrupt or truncated"),
    ("webp cut", encode(Image.fromarray(big_garment()), "WEBP")[:200], "truncated"),
])
def test_files_whose_contents_do_not_match_their_header_are_refused(name, payload,
                                                                     message) -> None:
    with pytest.raises(ImageRejected) as refused:
        prepare(payload, LIMIT_BYTES, LIMIT_PIXELS)
    assert refused.value.status == 400 and message in str(refused.value), str(refused.value)


def test_a_large_plain_jpeg_is_not_taken_for_a_lying_one() -> None:
    white = encode(Image.new("L", (4000, 3000), 255), "JPEG", optimize=True, progressive=True)
    assert prepare(white, LIMIT_BYTES, LIMIT_PIXELS).max() == 0  # blank, but accepted


def test_a_large_16_bit_png_is_shrunk_like_an_8_bit_one() -> None:
    big = np.kron(garment(), np.ones((80, 80), np.uint8))  # 2240x2240: Pillow's reduce() path
    seen = prepare(raw_png(big.astype(np.uint32) * 257, 0, 16), LIMIT_BYTES, LIMIT_PIXELS)
    twin = prepare(raw_png(big, 0, 8), LIMIT_BYTES, LIMIT_PIXELS)
    assert twin.max() > 200 and np.abs(seen.astype(int) - twin).max() <= 2


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_unreadable_exif_is_ignored_not_fatal(fmt: str) -> None:
    photo = Image.fromarray(big_garment())
    broken = b"Exif\x00\x00XX\x00*" + b"\x00" * 20 if fmt == "WEBP" else b"XX\x00*" + b"\x00" * 20
    seen = prepare(encode(photo, fmt, exif=broken), LIMIT_BYTES, LIMIT_PIXELS)
    assert framing_error(seen, garment()) < 20


def test_a_jpeg_with_more_pictures_is_read_as_a_jpeg() -> None:
    first, second = Image.fromarray(255 - big_garment()), Image.new("L", (112, 112), 128)
    mpo = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert framing_error(prepare(mpo, LIMIT_BYTES, LIMIT_PIXELS), garment()) < 20


def test_images_too_thin_for_a_garment_are_refused_before_decoding() -> None:
    thin = encode(Image.new("L", (2, 200), 255), "PNG")
    with pytest.raises(ImageRejected) as refused:
        prepare(thin, LIMIT_BYTES, LIMIT_PIXELS)
    assert refused.value.status == 422 and "2x200 is too thin" in str(refused.value)
    assert prepare(encode(Image.new("L", (4, 200), 255), "PNG"), LIMIT_BYTES,
                   LIMIT_PIXELS).shape == (28, 28)  # 50:1 is still a photo
