"""Ctrl-C and SIGTERM as a stop request that cannot get lost.

The handler raises KeyboardInterrupt at once, but Python drops an exception raised while a
finalizer runs (TensorFlow frees graphs in `__del__`), so the request is also remembered and
`check()` raises it again at the next safe point (each epoch, each job start).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_requested: str | None = None


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler: remember the stop and raise KeyboardInterrupt."""
    global _requested
    _requested = f"signal {signal.Signals(signum).name}"
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
