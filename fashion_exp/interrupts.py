"""Ctrl-C and SIGTERM as a stop request that cannot get lost.

The handler raises KeyboardInterrupt at once, but Python drops an exception raised while a
finalizer runs (TensorFlow frees graphs in `__del__`), so the request is also remembered and
`check()` raises it again at the next safe point (each epoch, each job start). Inside a
`deferred()` section (a write to the tracking store) the handler only remembers the request,
and the section raises it when it ends: a write cut in half could leave the store locked and
the run RUNNING.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_requested: str | None = None
_requests = 0  # stop requests so far: deferred() raises those that came while it ran
_deferring = 0  # deferred() sections the main thread is in


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler: remember the stop and raise KeyboardInterrupt, unless deferred."""
    global _requested, _requests
    _requested = f"signal {signal.Signals(signum).name}"
    _requests += 1
    if not _deferring:
        raise KeyboardInterrupt(_requested)


@contextmanager
def deferred() -> Iterator[None]:
    """A section that a stop request does not cut: one that arrives inside is raised as
    KeyboardInterrupt when the (outermost) section ends."""
    global _deferring
    before = _requests
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _requests != before:
        raise KeyboardInterrupt(_requested)


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested earlier."""
    if _requested:
        raise KeyboardInterrupt(_requested)


def install() -> None:
    """Route SIGINT and SIGTERM through request_stop (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
