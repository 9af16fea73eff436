"""Turning a request into images: bodies bounded before they are parsed, JSON validated, photos
in a multipart form decoded, each refusal a one-line answer that says what to send instead.

Parsing and decoding run off the event loop (worker threads), so /health answers while they
work; a request never sends more than max_images images, nor a body over its limit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import HTTPException, Request
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from fashion_exp.core import preprocess
from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.serving.payloads import SIDE, ArrayRequest
from fashion_exp.uris import printable

log = logging.getLogger(__name__)

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
    """413 when a request holds more than max_images images."""
    if count > settings.max_images:
        raise HTTPException(413, f"{count} images in one request: the limit is "
                                 f"{settings.max_images}")
