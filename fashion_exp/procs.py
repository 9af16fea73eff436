"""Which process owns a run or a trial, and whether that process is still alive.

A process is named by host, pid and its start time (from /proc), so that a pid reused by a
later process is not mistaken for the original owner.
"""

from __future__ import annotations

import os
import socket


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat); None if gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


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
