"""Ctrl-C and SIGTERM as a stop request that cannot get lost.

The handler raises KeyboardInterrupt at once, but Python drops an exception raised while a
finalizer runs (TensorFlow frees graphs in `__del__`), so the request is also remembered and
`check()` raises it again at the next safe point (each epoch, each job start). Inside a
`deferred()` section (a write to the tracking store) the handler only remembers the first
request, and the section raises it when it ends: a write cut in half could leave the store
locked and the run RUNNING. A second request inside the section stops at once. Training is
one such section (core.training.fit) whose stop is raised by the next check(), at a batch's
or an epoch's end.
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
_entered_at = 0  # _requests when the outermost section began
_stopping = False  # a stop with its own reason is under way (stopping()): later signals wait


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler: remember the stop and raise KeyboardInterrupt, unless it is the first
    one inside a deferred() section (a second one there stops at once: a way out of a write
    that hangs)."""
    global _requested, _requests
    _requests += 1
    if _stopping:  # the stop under way keeps its reason; this one adds nothing
        return
    _requested = f"signal {signal.Signals(signum).name}"
    if not (_deferring and _requests - _entered_at == 1):
        raise KeyboardInterrupt(_requested)


def stopping(reason: str) -> KeyboardInterrupt:
    """The stop for `reason` (e.g. SLURM requeued the job), to raise: remembered like a
    signal's, and later SIGINT/SIGTERM (SLURM's own, sent as it requeues) no longer replace it
    while the run ends."""
    global _requested, _stopping
    _requested, _stopping = reason, True
    return KeyboardInterrupt(reason)


@contextmanager
def deferred(raise_stop: bool = True) -> Iterator[None]:
    """A section that a stop request does not cut: one that arrives inside is raised as
    KeyboardInterrupt when the (outermost) section ends, even if the section failed
    (raise_stop=False: only remembered, for the next check()). Main thread only: signal
    handlers run there; elsewhere the section is an ordinary one."""
    global _deferring, _entered_at
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _deferring:
        _entered_at = _requests
    _deferring += 1
    try:
        yield
    except BaseException as err:
        _deferring -= 1
        if raise_stop and not _deferring and _requests != _entered_at \
                and not isinstance(err, KeyboardInterrupt):
            raise KeyboardInterrupt(_requested) from err  # the stop, not what it cut short
        raise
    _deferring -= 1
    if raise_stop and not _deferring and _requests != _entered_at:
        raise KeyboardInterrupt(_requested)


def stop_behind(err: BaseException) -> BaseException:
    """The stop request as KeyboardInterrupt if one came and `err` is another error (the
    stop cut something short that failed in its own way: TensorFlow can turn a Ctrl-C inside
    its ops into an error of its own), else `err` itself."""
    if _requested and not isinstance(err, KeyboardInterrupt):
        stop = KeyboardInterrupt(_requested)
        stop.__cause__ = err
        return stop
    return err


def deferring() -> bool:
    """Whether the main thread is inside a deferred() section."""
    return bool(_deferring)


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested earlier."""
    if _requested:
        raise KeyboardInterrupt(_requested)


def install() -> None:
    """Route SIGINT and SIGTERM through request_stop (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
