"""Which process owns a run or a trial, and whether that process is still alive.

A process is named by host, pid and its start time (psutil's create_time), so that a pid
reused by a later process is not mistaken for the original owner.
"""

from __future__ import annotations

import os
import socket

import psutil


def start_time(pid: int) -> str | None:
    """The process's start time (seconds since the epoch, as text); None if it is gone."""
    try:
        return repr(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def this_process() -> dict[str, str]:
    """host, pid and start time of the current process, as tag/attribute values."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "started": start_time(pid) or ""}


def alive(owner: dict[str, str]) -> bool | None:
    """Whether the process described by `this_process()` values still runs: None when it ran
    on another host (it cannot be checked from here) or is not described."""
    if not owner.get("pid") or owner.get("host") != socket.gethostname():
        return None
    started = start_time(int(owner["pid"]))
    return started is not None and started == owner.get("started", started)
