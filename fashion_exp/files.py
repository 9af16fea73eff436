"""Files shared by processes: an exclusive lock, and small state files replaced whole.

A state file (a checkpoint folder's state.json, an outbox's run.json, a sweep folder's
mlflow_sweep.json) says which run of which tracking store its folder belongs to, so that the
folder can be resumed, replayed or finished on its own. It is written to a temporary file and
renamed over the old one: a reader sees the old state or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on `path` across processes (its folder made if missing), used as
    `with file_lock(path): ...`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp) then rename tmp over `path`."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # each writer its own temporary
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace the state file `path` with `data`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)))


def read_json(path: Path) -> dict[str, Any]:
    """A state file written by write_json."""
    return json.loads(path.read_text())
