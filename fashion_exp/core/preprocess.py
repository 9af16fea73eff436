"""From a real photo to the 28x28 image a Fashion-MNIST model was trained on.

Fashion-MNIST images are light garments on a black background, cropped to the garment, padded
to a square around it and scaled so that the garment's longest side spans the whole 28 pixels
(the median longest side in the test set is 28). Product photos are the opposite: a dark
garment on a light background, anywhere in a large colour frame. `to_fashion_mnist` undoes
that difference; `open_image` decodes an upload safely first. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fashion_exp.schemas import IMAGE_SIDE as SIZE  # side of a Fashion-MNIST image, pixels

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what uploads may be
# Pillow's name for a JPEG that carries more pictures (phones, 3D cameras); its first is read.
JPEG_FORMATS = ("JPEG", "MPO")
# Longest side over shortest, at most: no photo of a garment is thinner, and a 1-pixel-wide
# PNG of 40 million rows holds the decoder (and Python's GIL) for 0.2 s per block of rows.
MAX_ASPECT = 50
WORK_SIDE = 512  # large photos are shrunk to this before analysis; 18x the final side
BORDER = 0.03  # fraction of each side read as background
OBJECT_THRESHOLD = 0.15  # pixels this fraction of the peak above background belong to the garment


class ImageRejected(ValueError):
    """An upload that cannot be used, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


# --- Decoding an upload ------------------------------------------------------------------------

def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF bytes, refusing empty, oversized, bomb-like or corrupt ones."""
    allowed = ", ".join(FORMATS)
    if not data:
        raise ImageRejected(400, f"empty upload: send a {allowed} image")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"image of {len(data)} bytes is over the limit of "
                                 f"{max_bytes} bytes")
    with warnings.catch_warnings():  # we enforce our own, lower pixel limit below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise ImageRejected(415, f"not a readable image: send {allowed}") from None
        except Image.DecompressionBombError as err:
            raise ImageRejected(413, f"image too large: {err}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # a header cut short
            raise ImageRejected(400, f"corrupt or truncated image: {err}") from None
    if image.format not in FORMATS + JPEG_FORMATS:
        raise ImageRejected(415, f"{image.format} images are not accepted: send {allowed}")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(413, f"image of {width}x{height} = {width * height} pixels is over "
                                 f"the limit of {max_pixels} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageRejected(422, f"image of {width}x{height} is too thin to be a photo of a "
                                 f"garment: its longer side may be at most {MAX_ASPECT} times "
                                 "its shorter one")
    check_consistent(image, data)
    if max(width, height) > 2 * WORK_SIDE:
        image.draft("RGB", (WORK_SIDE, WORK_SIDE))  # JPEG only: decode at a reduced scale
    try:
        image.load()  # decodes the first frame; a truncated file fails here
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejected(400, f"corrupt or truncated {image.format} image: {err}") from None
    return image


def check_consistent(image: Image.Image, data: bytes) -> None:
    """Refuse a JPEG or PNG whose data cannot be the image its header claims.

    Both decoders fill what is missing with a flat colour instead of failing, so a file with
    an edited or corrupt header would be answered as if it were a real, featureless photo.
    A Huffman-coded JPEG spends at least one bit on the DC coefficient of every 8x8 block of
    its first component, baseline or progressive: n blocks need n/8 bytes at the least. A
    PNG's compressed data must inflate to exactly the rows its header describes."""
    width, height = image.size
    if image.format in JPEG_FORMATS and len(data) * 8 < -(-width // 8) * -(-height // 8):
        raise ImageRejected(400, f"corrupt JPEG: {len(data)} bytes cannot hold the "
                                 f"{width}x{height} pixels its header claims")
    if image.format == "PNG":
        expected, got = png_raw_sizes(data)
        if got != expected:
            raise ImageRejected(400, f"corrupt or truncated PNG: its data holds {got} bytes of "
                                     f"rows, its {width}x{height} header needs {expected}")


PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))  # interlacing passes: first column and row, steps across and down


def png_raw_sizes(data: bytes) -> tuple[int, int]:
    """(bytes of filtered rows the PNG header describes, bytes its IDAT data inflates to);
    the data is inflated in 1 MB steps and counted, never held, and counting stops past the
    expected size."""
    width, height, depth, colour, interlace = struct.unpack(">IIBBxxB", data[16:29])
    bits = PNG_CHANNELS.get(colour, 1) * depth
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-max(width - x0, 0) // dx), -(-max(height - y0, 0) // dy)
        if columns and rows:
            expected += rows * (1 + -(-columns * bits // 8))
    inflate, got, at = zlib.decompressobj(), 0, 8
    try:
        while at + 8 <= len(data) and got <= expected:
            length, kind = struct.unpack(">I4s", data[at:at + 8])
            pending = data[at + 8:at + 8 + length] if kind == b"IDAT" else b""
            while pending and got <= expected:
                got += len(inflate.decompress(pending, 1 << 20))
                pending = inflate.unconsumed_tail
            at += 12 + length
        got += len(inflate.flush())
    except zlib.error:
        return expected, -1
    return expected, got


# --- Photo to Fashion-MNIST framing ------------------------------------------------------------

def eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit grayscale ("I;16", "I;16B", ... and "I") as 8-bit "L", its high byte.
    Pillow's own convert("L") clips 16-bit values at 255, and its reduce() refuses them."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is when the EXIF is unreadable
    (the orientation is optional metadata: browsers ignore a broken one too)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, ValueError, struct.error...
        return image


def grayscale(image: Image.Image) -> np.ndarray:
    """Luminance as float32 0-255; transparent areas become background opposite the garment."""
    if image.mode.startswith("I"):
        image = eight_bit(image)
    # Shrink first, in place, then turn upright: no full-size copy of a large photo is made.
    image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
    image = upright(image)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    if image.mode not in ("RGBA", "LA"):
        return gray
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    opaque = alpha > 0.5
    garment_is_light = opaque.any() and gray[opaque].mean() > 127
    fill = 0.0 if garment_is_light else 255.0
    return gray * alpha + fill * (1.0 - alpha)


def border_level(gray: np.ndarray) -> float:
    """Median of the pixels in a thin frame around the image: the background's brightness."""
    h, w = gray.shape
    bh, bw = max(1, round(h * BORDER)), max(1, round(w * BORDER))
    frame = np.concatenate([gray[:bh].ravel(), gray[-bh:].ravel(),
                            gray[:, :bw].ravel(), gray[:, -bw:].ravel()])
    return float(np.median(frame))


def to_fashion_mnist(image: Image.Image, object_size: int = SIZE) -> np.ndarray:
    """The (28, 28) uint8 image the model expects: light garment, black ground, centred."""
    gray = grayscale(image)
    if border_level(gray) > 127:  # light background: invert so the garment is light
        gray = 255.0 - gray
    ink = np.clip(gray - border_level(gray), 0.0, None)
    peak = float(ink.max())
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    if peak < 1.0:  # a blank image: nothing to frame
        return canvas
    rows = np.flatnonzero((ink > OBJECT_THRESHOLD * peak).any(axis=1))
    cols = np.flatnonzero((ink > OBJECT_THRESHOLD * peak).any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] * (255.0 / peak)
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    small = Image.fromarray(square.astype(np.uint8)).resize(
        (object_size, object_size), Image.Resampling.LANCZOS)
    offset = (SIZE - object_size) // 2
    canvas[offset:offset + object_size, offset:offset + object_size] = np.asarray(small)
    return canvas


def prepare(data: bytes, max_bytes: int, max_pixels: int, object_size: int = SIZE) -> np.ndarray:
    """Upload bytes to the model's (28, 28) uint8 input."""
    return to_fashion_mnist(open_image(data, max_bytes, max_pixels), object_size)


# --- The reverse, for measuring ----------------------------------------------------------------

def render_product_photo(image: np.ndarray, rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    """A Fashion-MNIST image as a product photo: enlarged, dark garment in colour on an
    off-white background, placed off-centre in a larger frame, compressed."""
    side = int(rng.integers(160, 420))
    garment = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    ink = np.asarray(garment, dtype=np.float32) / 255.0
    frame_w, frame_h = side + int(rng.integers(40, 400)), side + int(rng.integers(40, 300))
    left, top = int(rng.integers(0, frame_w - side)), int(rng.integers(0, frame_h - side))
    background = rng.uniform(225, 255)
    tint = rng.uniform(0.55, 1.0, size=3)  # how strongly each channel is darkened by the dye
    photo = np.full((frame_h, frame_w, 3), background, dtype=np.float32)
    region = photo[top:top + side, left:left + side]
    photo[top:top + side, left:left + side] = region * (1.0 - ink[..., None] * tint)
    out = io.BytesIO()
    Image.fromarray(photo.round().astype(np.uint8), "RGB").save(
        out, fmt, quality=int(rng.integers(70, 92)))
    return out.getvalue()
