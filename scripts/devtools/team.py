"""A local team stack: a PostgreSQL server (Debian's packages) and an `mlflow server` that
stores runs in it and serves artifacts, both on 127.0.0.1, for trying team tracking and for
the tests.

    python scripts/team_stack.py start [--dir .team]   prints the tracking and Optuna URIs
    python scripts/team_stack.py stop  [--dir .team]

Everything lives in one folder: `pgdata/` (the database cluster), `artifacts/` (what the
tracking server stores), `*.log` and `stack.json` (ports, process ids, URIs).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devtools.servers import free_port, wait_until_up
from fashion_exp.tracking.store_checks import server_problem, server_up

STATE_FILE = "stack.json"
DATABASES = ("mlflow", "optuna")  # one for the tracking server, one for Optuna studies


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Stack:
    """A running stack: where to log runs and keep studies, and how to stop it."""

    dir: str
    pg_port: int
    mlflow_port: int
    mlflow_pid: int

    @property
    def tracking_uri(self) -> str:
        """The tracking server, for tracking.uri or MLFLOW_TRACKING_URI."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    def database_uri(self, name: str) -> str:
        """SQLAlchemy URL of one of the stack's databases (mlflow, optuna)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/{name}"

    @property
    def optuna_storage(self) -> str:
        """The study storage, for hydra.sweeper.storage."""
        return self.database_uri("optuna")


def pg_bin(tool: str) -> str:
    """Path of a PostgreSQL server program (Debian keeps them out of PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if found:
        return found[-1]
    if shutil.which(tool):
        return str(shutil.which(tool))
    raise StackError(f"PostgreSQL's {tool} not found; install it: apt-get install -y postgresql")


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the `postgres` user then."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _run(command: list[str], what: str) -> None:
    """Run a set-up step; StackError with its output if it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"{what} failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-2000:]}")


def _init_cluster(pgdata: Path) -> None:
    """A new database cluster owned by the user that runs the server; local trust auth."""
    pgdata.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(pgdata, "postgres", "postgres")
        probe = subprocess.run(_as_postgres(["test", "-w", str(pgdata)]))
        if probe.returncode != 0:
            raise StackError(f"user postgres cannot reach {pgdata}; use a --dir whose parent "
                             "folders are readable by all (e.g. under /tmp)")
    _run(_as_postgres([pg_bin("initdb"), "-D", str(pgdata), "-U", "postgres",
                       "--auth=trust", "-E", "UTF8", "--no-instructions"]), "initdb")


def _pg_ctl(pgdata: Path, *args: str) -> list[str]:
    return _as_postgres([pg_bin("pg_ctl"), "-D", str(pgdata), *args])


def start_postgres(pgdata: Path, port: int) -> None:
    """Start the cluster on 127.0.0.1:port (socket in pgdata) and create the databases."""
    if not pgdata.exists():
        _init_cluster(pgdata)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {pgdata}"
    _run(_pg_ctl(pgdata, "-l", str(pgdata / "server.log"), "-o", options, "-w", "-t", "60",
                 "start"), "pg_ctl start")
    for name in DATABASES:
        exists = subprocess.run(_as_postgres([
            pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{name}'"]),
            capture_output=True, text=True)
        if exists.stdout.strip() != "1":
            _run(_as_postgres([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port),
                               "-U", "postgres", name]), f"createdb {name}")


def mlflow_server_command(backend_uri: str, artifacts: Path, port: int,
                          workers: int = 2) -> list[str]:
    """`mlflow server` on 127.0.0.1 with a database backend and artifacts served by it."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", str(artifacts), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]


def start_mlflow(stack_dir: Path, backend_uri: str, port: int) -> int:
    """Start the tracking server in its own session; returns its process id once it answers."""
    log = stack_dir / "mlflow.log"
    bin_dir = str(Path(sys.executable).parent)  # it starts uvicorn/gunicorn by name
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    with open(log, "a") as out:
        proc = subprocess.Popen(
            mlflow_server_command(backend_uri, stack_dir / "artifacts", port),
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/health", 120, log)
        # Its first request to the database opens the connection pool: a few seconds on a busy
        # machine, which a client's first probe should not have to wait for.
        server_problem(f"http://127.0.0.1:{port}", timeout=60)
    except RuntimeError as err:
        _kill_group(proc.pid)
        raise StackError(f"mlflow server did not start: {err}") from None
    return proc.pid


def start(stack_dir: Path, pg_port: int | None = None, mlflow_port: int | None = None) -> Stack:
    """Start PostgreSQL and the tracking server (or return the stack already running there)."""
    stack_dir = stack_dir.resolve()
    running = status(stack_dir)
    if running is not None:
        return running
    stack_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # PostgreSQL runs as `postgres`: it must be able to enter the folder
        stack_dir.chmod(stack_dir.stat().st_mode | 0o711)
    pg_port = pg_port or free_port()
    start_postgres(stack_dir / "pgdata", pg_port)
    stack = Stack(str(stack_dir), pg_port, mlflow_port or free_port(), 0)
    try:
        pid = start_mlflow(stack_dir, stack.database_uri("mlflow"), stack.mlflow_port)
    except StackError:
        stop_postgres(stack_dir / "pgdata")
        raise
    stack = Stack(str(stack_dir), pg_port, stack.mlflow_port, pid)
    (stack_dir / STATE_FILE).write_text(json.dumps(asdict(stack), indent=2))
    return stack


def load(stack_dir: Path) -> Stack | None:
    """The stack recorded in a folder, running or not; None if none was started there."""
    state = stack_dir.resolve() / STATE_FILE
    return Stack(**json.loads(state.read_text())) if state.is_file() else None


def status(stack_dir: Path) -> Stack | None:
    """The stack of a folder if its tracking server answers, else None."""
    stack = load(stack_dir)
    return stack if stack is not None and server_up(stack.tracking_uri) else None


def _kill_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM a process group, SIGKILL it if it is still there after `timeout` seconds (at
    once with timeout 0)."""
    try:
        os.killpg(pid, signal.SIGTERM if timeout else signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    while time.monotonic() < deadline + 20:  # gone only once they are all reaped
        try:
            os.waitpid(pid, os.WNOHANG)  # the leader is this process's child when it started it
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def stop_mlflow(stack: Stack) -> None:
    """Stop the tracking server (its workers are in its process group). The process is the
    one recorded in the stack's folder: a restart may have replaced the one in `stack`."""
    current = load(Path(stack.dir)) or stack
    if current.mlflow_pid:
        _kill_group(current.mlflow_pid)


def kill_mlflow(stack: Stack) -> None:
    """SIGKILL the tracking server's whole process group at once, as a crash would; returns
    when no process of it is left (its children keep the port otherwise)."""
    current = load(Path(stack.dir)) or stack
    if current.mlflow_pid:
        _kill_group(current.mlflow_pid, timeout=0)


def restart_mlflow(stack: Stack) -> Stack:
    """Start the tracking server again on the same port (after stop_mlflow)."""
    pid = start_mlflow(Path(stack.dir), stack.database_uri("mlflow"), stack.mlflow_port)
    stack = Stack(stack.dir, stack.pg_port, stack.mlflow_port, pid)
    (Path(stack.dir) / STATE_FILE).write_text(json.dumps(asdict(stack), indent=2))
    return stack


def stop_postgres(pgdata: Path) -> None:
    """Fast shutdown of the cluster (open sessions are rolled back, data is kept)."""
    if (pgdata / "postmaster.pid").exists():
        _run(_pg_ctl(pgdata, "-m", "fast", "-w", "stop"), "pg_ctl stop")


def stop(stack_dir: Path) -> bool:
    """Stop the stack of a folder; False if none was started there. Data stays on disk."""
    stack = load(stack_dir)
    if stack is None:
        return False
    stop_mlflow(stack)
    stop_postgres(Path(stack.dir) / "pgdata")
    (Path(stack.dir) / STATE_FILE).unlink(missing_ok=True)
    return True
