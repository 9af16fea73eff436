"""Which process owns a run or a trial, and whether that process is still alive.

A process is named by host, pid and its start time (psutil's create_time), so that a pid
reused by a later process is not mistaken for the original owner.
"""

from __future__ import annotations

import datetime
import os
import socket

import psutil


def start_time(pid: int) -> str | None:
    """The process's start time, ISO 8601 in UTC to the microsecond
    (2026-12-05T14:01:20.481920+00:00); None if it is gone."""
    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None
    return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(
        timespec="microseconds")


def seconds(started: str) -> float | None:
    """A recorded start time as seconds since the epoch: ISO 8601, or the bare number that
    runs and trials recorded before; None if it is neither."""
    try:
        return float(started)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(started).timestamp()
    except ValueError:
        return None


SAME_START_S = 1e-3  # a recorded start kept to the microsecond: the same process within this


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
    if started is None:
        return False
    if "started" not in owner:
        return True
    now, then = seconds(started), seconds(owner["started"])
    return now is not None and then is not None and abs(now - then) < SAME_START_S
