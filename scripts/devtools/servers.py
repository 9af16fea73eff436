"""Start and stop local HTTP servers (this service, `mlflow models serve`) for benchmarks and
tests: a free port, a readiness wait that notices a server dying, a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    """Poll `url` until it answers 200; RuntimeError with the log's tail if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"no answer from {url} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(command: list[str], health_url: str, log: Path, env: dict[str, str] | None = None,
            timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Run a server for the duration of a with-block; it is stopped (SIGINT, then SIGKILL)."""
    # The environment's bin/ first: `mlflow models serve` starts `uvicorn` by name.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_until_up(proc, health_url, timeout, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def serve_command(model_uri: str, port: int, tracking_uri: str, *overrides: str) -> list[str]:
    """fashion-exp-serve for one model on 127.0.0.1:port."""
    return [sys.executable, "-m", "fashion_exp.cli.serve", f"model_uri={model_uri}", f"port={port}",
            f"tracking.uri={tracking_uri}", "log_level=warning", *overrides]


def mlflow_serve_command(model_uri: str, port: int) -> list[str]:
    """`mlflow models serve` for the same model, in this environment (no new one built)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
