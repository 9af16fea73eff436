"""Per-connection limits for the prediction service: header size, header time, body time.

uvicorn bounds none of these for its fast httptools parser (its only header limit,
h11_max_incomplete_event_size, applies to the slower h11 parser), so a client could send
endless headers or hold a connection open by sending a byte now and then. Its `http=` setting
takes a protocol class; `limited_protocol` makes one that adds the three limits to uvicorn's
own httptools protocol. Idle keep-alive connections are closed by uvicorn itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

# Private in uvicorn 0.54.0 (pinned in pyproject.toml), which has no public API for these limits
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def _json_response(status: bytes, message: str) -> bytes:
    """A whole HTTP response {"detail": message} that closes the connection, as the app's own
    error answers are shaped."""
    body = json.dumps({"detail": message}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            + body)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Counts header bytes and times each request's headers and body, within the limits
    that `limited_protocol` sets on a subclass."""

    max_header_bytes: int  # request line and headers
    header_timeout: float  # seconds for the request line and headers
    body_timeout: float  # seconds for the body, from the end of the headers

    def connection_made(self, transport: Any) -> None:  # noqa: D102
        super().connection_made(transport)
        self._in_headers = True
        self._header_bytes = 0  # received while the headers are incomplete
        self._parsed_bytes = 0  # request line and headers the parser has handed over
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self._refused:
            return
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Headers still incomplete after all of this: every byte so far was header.
        if self._in_headers and self._header_bytes > self.max_header_bytes:
            self._refuse_headers()

    def on_message_begin(self) -> None:  # noqa: D102
        super().on_message_begin()
        self._parsed_bytes = 0
        if not self._in_headers:  # the next request on a kept-alive connection
            self._in_headers, self._header_bytes = True, 0
            self._arm(self.header_timeout, self._headers_too_slow)

    def on_url(self, url: bytes) -> None:  # noqa: D102
        self._parsed_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # noqa: D102
        self._parsed_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:  # noqa: D102
        self._in_headers, self._header_bytes = False, 0
        if self._parsed_bytes > self.max_header_bytes:  # all of it came in one piece
            self._refuse_headers()
            return
        self._arm(self.body_timeout, self._body_too_slow)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:  # noqa: D102
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:  # noqa: D102
        self._disarm()
        if not self._refused:
            super().on_message_complete()

    def _refuse_headers(self) -> None:
        self._refuse(b"431 Request Header Fields Too Large",
                     f"request line and headers are over {self.max_header_bytes} bytes")

    def _arm(self, seconds: float, then: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, status: bytes, message: str, logged: bool = False) -> None:
        self._disarm()
        self._refused = True
        if not self.transport.is_closing():
            if not logged:
                log.info("%s: %s", self._peer(), message)
            self.transport.write(_json_response(status, message))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # noqa: D102
        # uvicorn's answer to a request its parser rejects, as JSON like every other.
        self._refuse(b"400 Bad Request", f"{msg.rstrip('.')}: not a valid HTTP/1.1 request",
                     logged=True)  # uvicorn has logged it

    def _headers_too_slow(self) -> None:
        self._refuse(b"408 Request Timeout",
                     f"request line and headers not received within {self.header_timeout:g} s")

    def _body_too_slow(self) -> None:
        # The app is already handling the request: closing the connection ends its read
        # (and the app logs the one line about it).
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"


def limited_protocol(max_header_bytes: int, header_timeout: float,
                     body_timeout: float) -> type[LimitedHttpToolsProtocol]:
    """uvicorn's httptools protocol with limits on header size and header and body time."""
    limits = {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout,
              "body_timeout": body_timeout}
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), limits)
