"""Is the tracking store usable? One cheap check, before TensorFlow or MLflow is imported.

Every entry point calls `check_store` with the store it is about to use. It answers with the
resolved URI, or raises `StoreError` with one line that names the store, where its URI came
from and what to do:

- the URI: a scheme of URI_SCHEMES, `sqlite:///` with three slashes;
- a SQLite store: there (unless the command may create it), a SQLite file (its header), not
  cut short (the header's page count against the file's size), `PRAGMA quick_check` within a
  time budget, MLflow's tables present; opened read-only (`mode=ro`), so asking never writes;
- a database server (PostgreSQL, MySQL, SQL Server): one connection, with a timeout
  (tracking.connect_timeout) instead of MLflow's retries for minutes;
- a tracking server: answers GET /health within the same timeout;
- for commands that record runs (`write=True`): the store's file and folder are writable.

Nothing here imports TensorFlow or MLflow; SQLAlchemy is imported for database servers only.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from fashion_exp.files import file_lock
from fashion_exp.paths import project_root
from fashion_exp.uris import DATABASES, SERVERS, URI_SCHEMES, lower_scheme, scheme, shown

ENV_VAR = "MLFLOW_TRACKING_URI"
SQLITE_HEADER = b"SQLite format 3\x00"
# MLflow's core tables: a store without them is not MLflow's (or was never finished).
MLFLOW_TABLES = ("alembic_version", "experiments", "runs", "metrics", "params", "tags")
# Most seconds spent on PRAGMA quick_check; a bigger store gets the rest of the checks only.
QUICK_CHECK_SECONDS = 0.25
# A SQLite store that looks half-written is asked again after this pause (a write in flight).
SETTLE_SECONDS = 0.25


class StoreError(RuntimeError):
    """The tracking store cannot be used as asked; the message is one line."""


class StoreInFlux(StoreError):
    """A SQLite store looks half-written (tables missing, file shorter than its header says):
    broken, or caught while another process creates or writes it."""


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use, with relative SQLite and file paths made absolute."""
    uri = lower_scheme(uri or os.environ.get(ENV_VAR) or "")  # as MLflow accepts it
    if not uri:
        return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a resolved sqlite:/// URI; None for any other store."""
    uri = lower_scheme(uri)
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None



def connect_seconds(text: str) -> float:
    """--connect-timeout of the argparse commands: seconds in (0, 600], as the config's
    tracking.connect_timeout (argparse.ArgumentTypeError otherwise)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r}: must be seconds in (0, 600]")
    return value


def request_settings(cfg: Any) -> dict[str, str]:
    """MLflow's HTTP request settings for `cfg` (cfg.tracking), as the environment variables
    MLflow reads them from (it has no per-client setting); the entry points set them.

    MLflow retries a failed request 7 times with backoff 2 (minutes of stalled training);
    fewer, shorter retries here, and the outbox keeps the data of a longer outage."""
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, cfg.request_timeout))),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def check_store(uri: str | None, *, write: bool, connect_timeout: float, create: bool = False,
                option: str = "tracking.uri") -> str:
    """The resolved URI of the store that `uri` (else $MLFLOW_TRACKING_URI, else the repo's
    store) names, once it is usable: StoreError (one line) if it is not.

    write: the command records runs, so the store must be writable. create: the command may
    create a SQLite store that is not there yet (training); otherwise a missing store is an
    error. option: how the user sets the URI (tracking.uri or --tracking-uri), for messages.
    """
    source = option if uri else ENV_VAR if os.environ.get(ENV_VAR) else "the default store"
    raw = uri or os.environ.get(ENV_VAR) or ""
    kind = scheme(raw)  # lower case, as every scheme compared below
    if kind and kind not in URI_SCHEMES:
        raise StoreError(f"{source}={shown(raw)!r} has an unknown scheme {kind!r}; use a path or "
                         f"a URI of scheme {', '.join(URI_SCHEMES)}")
    if kind == "sqlite" and not lower_scheme(raw).startswith("sqlite:///"):
        raise StoreError(f"{source}={shown(raw)!r} is not a SQLite file URI; use "
                         "sqlite:///relative/path.db or sqlite:////absolute/path.db")
    if kind == "sqlite" and ("?" in raw or "%" in raw):
        # SQLAlchemy cuts the path at '?' and decodes %xx: the file checked here would not be
        # the file MLflow opens.
        raise StoreError(f"{source}={shown(raw)!r}: query strings and %-escapes are not "
                         "supported in a SQLite store's URI; give the plain path")
    if raw.strip() and kind in ("", "file") and not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
        # MLflow 3 refuses its legacy file store unless told otherwise.
        raise StoreError(f"{source}={shown(raw)!r} names a file store (a folder of runs), which "
                         "MLflow 3 no longer opens; use sqlite:////path/mlflow.db (or set "
                         "MLFLOW_ALLOW_FILE_STORE=true)")
    try:
        resolved = resolve_uri(uri)
        where = f"{shown(resolved)} ({source})"
        db = sqlite_path(resolved)
        if db is not None:
            _check_sqlite_settled(db, where, option, write=write, create=create,
                                  timeout=connect_timeout)
        elif kind in DATABASES:
            _check_database(resolved, where, option, need_tables=not write,
                            timeout=connect_timeout)
        elif kind in SERVERS:
            problem = server_problem(resolved, timeout=connect_timeout)
            if problem is not None:
                raise StoreError(server_message(shown(resolved), problem, option))
        else:  # a file store: a folder (a path without a scheme becomes one)
            _check_folder(Path(urllib.parse.unquote(urllib.parse.urlsplit(resolved).path)),
                          where, option, write=write, create=create)
    except (OSError, ValueError) as err:  # a malformed URL or path: bad port, NUL, too long
        reason = getattr(err, "strerror", None) or first_line(err)
        raise StoreError(f"{source}={shown(raw)!r} names no usable tracking store ({reason}); "
                         f"fix {option}") from None
    return resolved


def first_line(err: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _timeout_option(option: str) -> str:
    return "--connect-timeout" if option.startswith("--") else "tracking.connect_timeout"


def _missing(where: str, option: str) -> StoreError:
    # "no tracking store at <uri>" and "no tracking store there": messages users grep for.
    return StoreError(f"no tracking store at {where}; this command creates no tracking store "
                      f"there: train a model first or point {option} at your store")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _not_writable(path: Path) -> str | None:
    """Why `path` cannot be written ('<path>: <reason>'), or None if it can.

    A file is opened for writing (and closed, nothing written), as SQLite opens it; a folder
    is asked with access(2), which also answers for a read-only file system."""
    if path.is_dir():
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path}: folder not writable"
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as err:
        return f"{path}: {err.strerror}"
    return None


def _check_writable(paths: list[Path], where: str, option: str) -> None:
    for path in paths:
        reason = _not_writable(path)
        if reason:
            raise StoreError(f"tracking store {where} is not writable ({reason}); this command "
                             f"writes to it: make it writable or point {option} at a writable "
                             "store")


def _check_folder(folder: Path, where: str, option: str, *, write: bool, create: bool) -> None:
    """A file store (a folder of runs)."""
    if folder.is_file():
        raise StoreError(f"tracking store {where} is a file, not a file store's folder; for a "
                         f"SQLite database use {option}=sqlite:///{folder}")
    if not folder.exists() and not create:
        raise _missing(where, option)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"tracking store {where} is not a folder; point {option} at another "
                         "store")
    if write:
        _check_writable([_nearest_existing(folder)], where, option)


def _sqlite_header(db: Path, where: str, todo: str) -> bytes:
    """The file's first 100 bytes, once they are SQLite's and the file is not cut short."""
    with open(db, "rb") as f:
        header = f.read(100)
    size = db.stat().st_size
    if size == 0:
        return header  # SQLite's empty database: no tables yet
    if not header.startswith(SQLITE_HEADER):
        raise StoreError(f"tracking store {where} is not a SQLite database (the file does not "
                         f"start with SQLite's header); {todo} (sqlite:////path/mlflow.db)")
    if len(header) < 100:
        raise StoreError(f"tracking store {where} is cut short ({size} bytes, less than a "
                         f"SQLite header); restore it from a backup or {todo}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid when its version number matches the change counter (SQLite
    # >= 3.7.0 keeps it so); a WAL file may hold pages the database file does not have yet.
    counted = header[92:96] == header[24:28]
    wal = db.with_name(db.name + "-wal")
    if counted and pages and size < pages * page_size and not wal.exists():
        raise StoreInFlux(f"tracking store {where} is cut short: {size} of the "
                          f"{pages * page_size} bytes its header announces; restore it from a "
                          f"backup or {todo}")
    return header


def _check_sqlite_settled(db: Path, where: str, option: str, *, write: bool, create: bool,
                          timeout: float) -> None:
    """_check_sqlite; a store that looks half-written is asked again before it is refused.

    Parallel jobs create and migrate a new store under the store's lock file
    (tracking.store.store_lock): a command that may create the store waits for that lock. A
    write in progress can also show a header that announces pages not yet on disk: anyone
    asks again after a moment (SETTLE_SECONDS). Only a store still half-written then is
    refused, and nothing is written beside a store nobody is creating."""
    lock = db.with_name(db.name + ".lock")
    try:
        _check_sqlite(db, where, option, write=write, create=create, timeout=timeout)
    except StoreInFlux:
        if create and lock.is_file():
            with file_lock(lock):
                _check_sqlite(db, where, option, write=write, create=create, timeout=timeout)
        else:
            time.sleep(SETTLE_SECONDS)
            _check_sqlite(db, where, option, write=write, create=create, timeout=timeout)


def _check_sqlite(db: Path, where: str, option: str, *, write: bool, create: bool,
                  timeout: float) -> None:
    todo = f"point {option} at another store"
    if db.is_symlink() and not db.exists():
        raise StoreError(f"tracking store {where} is a broken symbolic link (or a loop); {todo}")
    if not db.exists():
        existing = _nearest_existing(db.parent)
        if existing.exists() and not existing.is_dir():
            raise StoreError(f"tracking store {where} lies under {existing}, which is a file, "
                             f"not a folder; {todo}")
        if not create:
            raise _missing(where, option)
        if write:  # created on first use, with its folder
            _check_writable([_nearest_existing(db.parent)], where, option)
        return
    if not db.is_file():
        raise StoreError(f"tracking store {where} is not a file; {todo} "
                         "(sqlite:////path/mlflow.db)")
    try:
        _sqlite_header(db, where, todo)
    except OSError as err:
        raise StoreError(f"tracking store {where} cannot be read ({err.strerror}); "
                         f"{todo}") from None
    tables = _sqlite_tables(db, where, option, timeout)
    _check_tables(tables, where, todo, fresh_ok=create)
    if write:
        lock = db.with_name(db.name + ".lock")  # tracking.store_lock
        artifacts = db.parent / "artifacts"
        _check_writable([db, db.parent] + [p for p in (lock, artifacts) if p.exists()],
                        where, option)


def _sqlite_tables(db: Path, where: str, option: str, timeout: float) -> set[str]:
    """Its table names, after PRAGMA quick_check (within QUICK_CHECK_SECONDS) of the database
    opened read-only."""
    todo = f"point {option} at another store"
    ro = f"file:{urllib.parse.quote(str(db))}?mode=ro"
    try:
        conn = sqlite3.connect(ro, uri=True, timeout=timeout)
    except sqlite3.Error as err:
        raise StoreError(f"tracking store {where} cannot be opened ({err}); {todo}") from None
    # quick_check walks the whole file in one step of SQLite's VM, where a progress handler is
    # not called (SQLite < 3.43): interrupted from a timer instead.
    timer = threading.Timer(QUICK_CHECK_SECONDS, _interrupt, [conn])
    try:
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        timer.start()
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(1)")]
        except sqlite3.OperationalError as err:
            if "interrupt" not in str(err):
                raise
            problems = ["ok"]  # a big store: checked as far as the time budget went
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(" ".join(problems).replace("\n", " ")[:200])
    except sqlite3.DatabaseError as err:
        if "locked" in str(err):
            raise StoreError(f"tracking store {where} stayed locked by another process for "
                             f"{timeout:g} s; try again or raise {_timeout_option(option)}") \
                from None
        raise StoreError(f"tracking store {where} is corrupt ({err}); restore it from a "
                         f"backup or {todo}") from None
    finally:
        timer.cancel()
        if timer.is_alive():
            timer.join()
        conn.close()
    return tables


def _interrupt(conn: sqlite3.Connection) -> None:
    try:
        conn.interrupt()
    except sqlite3.Error:  # closed in the meantime: nothing left to stop
        pass


def _check_tables(tables: set[str], where: str, todo: str, *, fresh_ok: bool) -> None:
    """MLflow's tables must all be there; a database without any tables is a store that
    MLflow creates on first use, which only training may do."""
    missing = [t for t in MLFLOW_TABLES if t not in tables]
    if not missing:
        return
    if not tables and fresh_ok:
        return
    if not tables:
        raise StoreError(f"tracking store {where} is an empty database without runs; "
                         f"{todo}")
    if len(missing) == len(MLFLOW_TABLES):
        others = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreError(f"tracking store {where} is a database but not an MLflow store (its "
                         f"tables: {others}); {todo}")
    raise StoreInFlux(f"tracking store {where} lacks MLflow's tables {', '.join(missing)} (a "
                      f"half-created store); restore it from a backup or {todo}")


def connect_args(url: Any, timeout: float) -> dict[str, Any]:
    """SQLAlchemy's connect_args that make a connection to the database server of `url` (a
    sqlalchemy URL) give up after `timeout` seconds, in whole seconds: each driver names its
    timeout differently, and libpq's minimum is 2 s."""
    seconds = max(1, math.ceil(timeout))
    return {"postgresql": {"connect_timeout": max(2, seconds)},
            "mysql": {"connect_timeout": seconds},
            "mssql": {"timeout": seconds}}.get(url.get_backend_name(), {})


def _check_database(uri: str, where: str, option: str, *, need_tables: bool,
                    timeout: float) -> None:
    """One connection to a database server, within `timeout` seconds; readers also need
    MLflow's tables there (MLflow would create them: a write)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    url = sqlalchemy.make_url(uri)
    todo = f"start the database, fix {option}, or raise {_timeout_option(option)}"
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args(url, timeout),
                                          poolclass=NullPool)
    except (ImportError, sqlalchemy.exc.ArgumentError) as err:
        raise StoreError(f"tracking store {where} cannot be used: {err} (install its database "
                         f"driver or fix {option})") from None
    try:
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names()) if need_tables else None
    except sqlalchemy.exc.SQLAlchemyError as err:
        first = first_line(getattr(err, "orig", None) or err)
        raise StoreError(f"cannot connect to the tracking database {where} within "
                         f"{timeout:g} s: {first}; {todo}") from None
    finally:
        engine.dispose()
    if tables is not None:
        _check_tables(tables, where, f"point {option} at another store", fresh_ok=False)


# A request that reads the server's store: a server whose database is gone still answers
# /health (MLflow's handler touches no database) but 5xx to every call that logs.
STORE_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def server_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why an MLflow tracking server cannot take runs now, in a few words; None when it can.
    Unreachable (GET /health) or failing on its side (5xx on a request that reads its store);
    any 4xx (authentication, say) is the caller's to see, not an outage."""
    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as answer:
            if answer.status != 200:
                return f"GET /health answered {answer.status}"
    except urllib.error.HTTPError as err:
        return f"GET /health answered {err.code}"
    except OSError:  # a malformed URL (ValueError) is the caller's to report
        return "does not answer (GET /health)"
    try:  # a slow answer from its store is not an outage: thrice the connect timeout
        with urllib.request.urlopen(f"{base}{STORE_PROBE}", timeout=3 * timeout):
            return None
    except urllib.error.HTTPError as err:
        return None if err.code < 500 else f"answers but its store fails (HTTP {err.code})"
    except OSError as err:
        return f"answers GET /health but not a request to its store ({first_line(err)})"


def server_message(url: str, problem: str, option: str = "tracking.uri") -> str:
    """The one line for a tracking server with a problem (server_problem), saying what to do."""
    todo = ("start it (e.g. python scripts/team_stack.py start)"
            if problem.startswith("does not answer") else "check the server and its database")
    return f"the tracking server {url} {problem}; {todo} or set {option}"


def server_up(url: str, timeout: float = 5.0) -> bool:
    """Whether an MLflow tracking server answers and can reach its store (server_problem)."""
    return server_problem(url, timeout) is None
