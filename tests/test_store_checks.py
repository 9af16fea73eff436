"""A tracking store that cannot be used, for every command-line tool: one line on stderr, a
non-zero exit, no output folder, nothing written to the store, TensorFlow never loaded.

Stores: a SQLite file cut in half, a file that is not SQLite, a database server that does not
answer, a mistyped scheme (flag and $MLFLOW_TRACKING_URI), a read-only store (the tools that
write runs refuse it, the tools that read keep working), and no store at all. The check
itself (fashion_exp/tracking/store_checks.py) is tested in-process below the command-line table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from devtools.servers import free_port
from fashion_exp.files import file_lock
from fashion_exp.tracking import store_checks

from .helpers import CLI_ENV

BIN = Path(sys.executable).parent  # the console scripts of this environment
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/db"  # nothing listens on port 1
MISTYPED = "sqlit:///x"
TOOLS = ("train", "evaluate", "serve", "runs", "compare")
# Exit status for an unusable store: training says it like missing data or an unreachable
# server (1); the other tools like their other bad inputs (2). A mistyped flag value is a
# config error for training (2, "invalid config").
STATUS = {"train": 1, "evaluate": 2, "serve": 2, "runs": 2, "compare": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A SQLite MLflow store with one finished run (no model): its database file."""
    import mlflow

    folder = tmp_path_factory.mktemp("store_errors") / "store"
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.create_experiment("fashion_exp", (folder / "artifacts").as_uri())
    run = client.create_run(exp, run_name="kept")
    client.log_metric(run.info.run_id, "val_accuracy", 0.5)
    client.log_text(run.info.run_id, "hello", "note.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    return folder / "mlflow.db"


def half_cut(store: Path, tmp: Path) -> Path:
    data = store.read_bytes()
    bad = tmp / "bad" / "mlflow.db"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def not_sqlite(store: Path, tmp: Path) -> Path:
    bad = tmp / "bad" / "mlflow.db"
    bad.parent.mkdir()
    bad.write_text("name,accuracy\nmlp,0.88\n" * 100)
    return bad


def state(folder: Path) -> dict[str, str]:
    """Every file under a folder with the MD5 of its contents."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def command(tool: str, uri: str | None, tmp: Path, runs_command: str = "interrupted",
            ) -> list[str]:
    """The real console script of `tool` with the store `uri` (None: from the environment),
    set up so that a check that let a bad store through would fail fast, not train."""
    script = str(BIN / f"fashion-exp-{tool}")
    if tool in ("runs", "compare"):
        flag = [] if uri is None else ["--tracking-uri", uri]
        rest = [runs_command] if tool == "runs" else ["--all", "--out", str(tmp / "compared")]
        return [script, *flag, *rest]
    flag = [] if uri is None else [f"tracking.uri={uri}"]
    if tool == "serve":
        return [script, *flag, f"port={free_port()}", "samples=false"]
    data = [f"data.dir={tmp / 'no_data'}", "data.download=false"]
    if tool == "evaluate":
        return [script, f"model_uri=runs:/{UNKNOWN_RUN}/model", *flag, *data]
    return [script, "debug=fast", *flag, *data]


def run(cmd: list[str], tmp: Path, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env or CLI_ENV,
                          timeout=120)


def assert_refused(result: subprocess.CompletedProcess, tool: str, status: int,
                   *names: str) -> str:
    """One non-empty line on stderr from this tool, naming the bad value; returns it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"fashion-exp-{tool}: "), lines[0]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def assert_nothing_made(tmp: Path) -> None:
    assert not (tmp / "outputs").exists()  # Hydra's run folder (train, evaluate)
    assert not (tmp / "compared").exists()  # compare's --out


# --- Corrupt stores ------------------------------------------------------------------------

@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("corrupt,problem", [(half_cut, "is cut short"),
                                             (not_sqlite, "is not a SQLite database")],
                         ids=["half_cut", "not_sqlite"])
def test_corrupt_store(tool, corrupt, problem, store, tmp_path) -> None:
    bad = corrupt(store, tmp_path)
    before = state(bad.parent)
    result = run(command(tool, f"sqlite:///{bad}", tmp_path), tmp_path)
    assert_refused(result, tool, STATUS[tool], f"sqlite:///{bad}", problem)
    assert state(bad.parent) == before  # no lock file, no journal, not a byte changed
    assert_nothing_made(tmp_path)


# --- A database server that does not answer ------------------------------------------------

@pytest.mark.parametrize("tool", TOOLS)
def test_unreachable_database(tool, tmp_path) -> None:
    result = run(command(tool, UNREACHABLE, tmp_path), tmp_path)
    line = assert_refused(result, tool, STATUS[tool], UNREACHABLE, "cannot connect")
    assert "connect-timeout" in line or "connect_timeout" in line  # how to wait longer
    assert_nothing_made(tmp_path)


# --- A mistyped scheme ---------------------------------------------------------------------

@pytest.mark.parametrize("tool", TOOLS)
def test_mistyped_scheme_flag(tool, tmp_path) -> None:
    result = run(command(tool, MISTYPED, tmp_path), tmp_path)
    status = 2 if tool == "train" else STATUS[tool]  # training: an invalid config value
    line = assert_refused(result, tool, status, MISTYPED)
    assert "sqlite, file, http" in line  # the schemes allowed
    assert_nothing_made(tmp_path)


@pytest.mark.parametrize("tool", TOOLS)
def test_mistyped_scheme_environment(tool, tmp_path) -> None:
    result = run(command(tool, None, tmp_path), tmp_path,
                 {**CLI_ENV, "MLFLOW_TRACKING_URI": MISTYPED})
    assert_refused(result, tool, STATUS[tool], f"MLFLOW_TRACKING_URI='{MISTYPED}'",
                   "unknown scheme 'sqlit'")
    assert_nothing_made(tmp_path)


# --- No store ------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["evaluate", "serve", "runs", "compare"])
def test_missing_store(tool, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "mlflow.db"
    result = run(command(tool, f"sqlite:///{missing}", tmp_path), tmp_path)
    assert_refused(result, tool, STATUS[tool], f"no tracking store at sqlite:///{missing}")
    assert not missing.parent.exists()  # not created by asking
    assert_nothing_made(tmp_path)


# --- A read-only store ---------------------------------------------------------------------

@contextmanager
def read_only(*paths: Path):
    """Make files and folders unwritable for this process: without write permission, or,
    for root (whom permissions do not stop), immutable (chattr +i), which stops root too."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in paths:
                p.chmod(modes[p])
        return
    made = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if made.returncode != 0:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
        pytest.skip(f"running as root and cannot make files immutable here: {made.stderr}")
    try:
        probe = paths[-1] / "probe" if paths[-1].is_dir() else paths[-1]
        with pytest.raises(OSError):  # the test means nothing if root can still write
            probe.open("a").close()
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


@pytest.fixture
def ro_store(store, tmp_path) -> Path:
    """A copy of the store (database and artifacts) in a read-only folder."""
    folder = tmp_path / "ro_store"
    shutil.copytree(store.parent, folder)
    return folder / "mlflow.db"


@pytest.mark.parametrize("tool,runs_command", [("train", ""), ("evaluate", ""),
                                               ("runs", "mark-failed")])
def test_read_only_store_refused_by_writers(tool, runs_command, ro_store, tmp_path) -> None:
    before = state(ro_store.parent)
    with read_only(ro_store, ro_store.parent):
        result = run(command(tool, f"sqlite:///{ro_store}", tmp_path, runs_command), tmp_path)
    assert_refused(result, tool, STATUS[tool], f"sqlite:///{ro_store}", "is not writable")
    assert state(ro_store.parent) == before
    assert_nothing_made(tmp_path)


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("tool,expected", [
    ("runs", "no interrupted runs"),  # exit 0: listed
    ("compare", "1 runs (all: "),  # exit 0: compared (into --out, not into the store)
    # exit 2 after TensorFlow loaded: the store was read (it has no model to serve)
    ("serve", "no finished run with a logged model"),
])
def test_read_only_store_read_by_readers(tool, expected, ro_store, tmp_path) -> None:
    before = state(ro_store.parent)
    with read_only(ro_store, ro_store.parent):
        result = run(command(tool, f"sqlite:///{ro_store}", tmp_path), tmp_path)
    assert expected in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.returncode == (2 if tool == "serve" else 0)
    assert state(ro_store.parent) == before  # no lock file, no journal, no default experiment


# --- Before TensorFlow and MLflow ----------------------------------------------------------

DRIVER = """
import json, sys
from fashion_exp.cli import compare, evaluate, runs, serve, train

uri, port = sys.argv[1], sys.argv[2]
codes = {}
for name, main, argv in [
    ("train", train.main, ["debug=fast", f"tracking.uri={uri}"]),
    ("evaluate", evaluate.main, ["model_uri=runs:/0123456789abcdef0123456789abcdef/model",
                                 f"tracking.uri={uri}"]),
    ("serve", serve.main, [f"tracking.uri={uri}", f"port={port}"]),
    ("runs", lambda: runs.main(["--tracking-uri", uri, "interrupted"]), []),
    ("compare", lambda: compare.main(["--tracking-uri", uri, "--all"]), []),
]:
    sys.argv = [name, *argv]
    try:
        codes[name] = main()
    except SystemExit as stop:
        codes[name] = stop.code
print(json.dumps({"codes": codes, "loaded": sorted(
    m for m in ("tensorflow", "keras", "mlflow") if m in sys.modules)}))
"""


@pytest.mark.parametrize("uri", ["bad", UNREACHABLE, MISTYPED], ids=["corrupt", "unreachable",
                                                                      "mistyped"])
def test_refused_before_tensorflow_and_mlflow_load(uri, store, tmp_path) -> None:
    """Every tool's entry point, in one fresh interpreter: all refuse the store, and none has
    imported TensorFlow, Keras or MLflow by then."""
    if uri == "bad":
        uri = f"sqlite:///{half_cut(store, tmp_path)}"
    result = subprocess.run([sys.executable, "-c", DRIVER, uri, str(free_port())],
                            cwd=tmp_path, capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = dict(STATUS) | ({"train": 2} if uri == MISTYPED else {})
    assert report["codes"] == expected, result.stderr
    assert report["loaded"] == []
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 5


# --- The check itself ----------------------------------------------------------------------

def check(uri: str, **kwargs) -> str:
    return store_checks.check_store(uri, connect_timeout=5, **kwargs)


def test_a_good_store_passes_read_only_and_unchanged(store) -> None:
    before = state(store.parent)
    assert check(f"sqlite:///{store}", write=False) == f"sqlite:///{store}"
    assert check(f"sqlite:///{store}", write=True) == f"sqlite:///{store}"
    assert state(store.parent) == before


def test_corrupt_pages_are_found(store, tmp_path) -> None:
    """The right size, SQLite's header, every page after the first garbage: quick_check."""
    data = bytearray(store.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xa5" * (len(data) - page)
    bad = tmp_path / "mlflow.db"
    bad.write_bytes(bytes(data))
    with pytest.raises(store_checks.StoreError, match="is corrupt"):
        check(f"sqlite:///{bad}", write=False)


def test_a_big_store_is_checked_within_the_time_budget(store, tmp_path, monkeypatch) -> None:
    """quick_check of a store too big to scan within QUICK_CHECK_SECONDS is stopped, and the
    store passes on the other checks."""
    big = tmp_path / "mlflow.db"
    shutil.copy(store, big)
    with sqlite3.connect(big) as conn:  # 200,000 metric values: about 45 MB, 50-100 ms to scan
        (run,) = conn.execute("SELECT run_uuid FROM runs").fetchone()
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                     "WHERE i < 200000) INSERT INTO metrics (key, value, timestamp, run_uuid, "
                     "step, is_nan) SELECT 'm' || (i % 50), i * 0.5, i, ?, i, 0 FROM n", (run,))
    stopped = []
    monkeypatch.setattr(store_checks, "QUICK_CHECK_SECONDS", 0.005)
    monkeypatch.setattr(store_checks, "_interrupt", lambda conn: stopped.append(conn.interrupt()))
    assert check(f"sqlite:///{big}", write=False)
    assert len(stopped) == 1


def test_databases_that_are_not_mlflow_stores(tmp_path) -> None:
    other = tmp_path / "optuna.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE studies (study_id INTEGER)")
    with pytest.raises(store_checks.StoreError,
                       match=r"not an MLflow store \(its tables: studies\)"):
        check(f"sqlite:///{other}", write=True, create=True)  # MLflow would add its tables
    half = tmp_path / "half.db"
    with sqlite3.connect(half) as conn:
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    with pytest.raises(store_checks.StoreError,
                       match="lacks MLflow's tables alembic_version, runs"):
        check(f"sqlite:///{half}", write=False)
    empty = tmp_path / "empty.db"
    empty.touch()
    assert check(f"sqlite:///{empty}", write=True, create=True)  # training starts it
    with pytest.raises(store_checks.StoreError, match="empty database"):
        check(f"sqlite:///{empty}", write=False)


def test_a_read_only_store_for_writers(ro_store) -> None:
    with read_only(ro_store, ro_store.parent):
        assert check(f"sqlite:///{ro_store}", write=False)
        with pytest.raises(store_checks.StoreError, match="is not writable"):
            check(f"sqlite:///{ro_store}", write=True)
    new = ro_store.parent / "sub" / "new.db"  # a store to be created in a read-only folder
    with read_only(ro_store.parent), pytest.raises(store_checks.StoreError, match="not writable"):
        check(f"sqlite:///{new}", write=True, create=True)


@pytest.mark.parametrize("uri", ["postgresql://mlflow:s3cret@127.0.0.1:1/mlflow",
                                 "postgresql+psycopg://mlflow:s3/cr:et@127.0.0.1:1/mlflow",
                                 "postgresql://mlflow:s3cret@[::1/mlflow",
                                 "http://mlflow:s3cret@127.0.0.1:1"])
def test_uris_are_shown_without_passwords(uri) -> None:
    with pytest.raises(store_checks.StoreError) as err:
        check(uri, write=False)
    assert "s3" not in str(err.value) and "mlflow:***@" in str(err.value)


@pytest.mark.parametrize("uri,message", [
    ("sqlite://relative.db", "sqlite:////absolute/path.db"),
    ("ftp://example.org/store", "unknown scheme 'ftp'"),
    ("http://[oops", "Invalid IPv6 URL"),
    ("postgresql://h:notaport/db", "notaport"),
    ("sqlite:///\x00.db", "embedded null byte"),
    ("x" * 5000, "File name too long"),
    ("file:///dev/null", "is not a folder"),
])
def test_other_malformed_uris(uri, message, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store's own checks
    with pytest.raises(store_checks.StoreError, match=re.escape(message)) as err:
        check(uri, write=False)
    assert "\n" not in str(err.value) and len(str(err.value)) < 500


def test_a_path_to_a_database_is_not_a_file_store(store, monkeypatch) -> None:
    # A plain path means a file store (a folder); a SQLite file there needs sqlite:///.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(store_checks.StoreError, match=f"use tracking.uri=sqlite:///{store}"):
        check(str(store), write=False)


def test_connect_timeout_is_checked() -> None:
    from fashion_exp.schemas import ConfigError, TrackingConfig

    assert TrackingConfig().connect_timeout == 5.0
    for bad in (0, -1, 601):
        with pytest.raises(ConfigError, match="connect_timeout"):
            TrackingConfig(connect_timeout=bad)


# --- One output folder per run -------------------------------------------------------------

def test_output_folders_are_per_process(tmp_path) -> None:
    """Hydra's run and sweep folders carry the process id, so runs that start in the same
    second never share one (their logs and .hydra/overrides.yaml stay their own)."""
    from hydra import compose, initialize_config_dir

    from fashion_exp.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose("config", return_hydra_config=True).hydra
    for folder in (hydra_cfg.run.dir, hydra_cfg.sweep.dir):
        assert folder.endswith(f"_pid{os.getpid()}"), folder


def test_two_runs_started_together_get_their_own_folders(tmp_path) -> None:
    """Two real runs started at once (they stop at the missing data, after Hydra has made
    their folders): two folders, each with its own overrides."""
    procs = [subprocess.Popen(
        [str(BIN / "fashion-exp-train"), f"trainer.seed={seed}", f"data.dir={tmp_path / 'none'}",
         "data.download=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "lacks train-images" in err, err[-2000:]
    folders = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(folders) == 2
    overrides = sorted((f / ".hydra" / "overrides.yaml").read_text() for f in folders)
    assert "trainer.seed=1" in overrides[0] and "trainer.seed=2" in overrides[1]


@pytest.mark.parametrize("uri", ["/some/folder", "file:///some/folder"])
def test_file_stores_are_refused_as_mlflow_3_refuses_them(uri, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(store_checks.StoreError, match="names a file store"):
        check(uri, write=False)


def test_paths_mlflow_would_read_differently_are_refused(store, tmp_path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "mlflow.db")
    (tmp_path / "plainfile").write_text("S")
    for uri, message in ((f"sqlite:///{tmp_path / 'loop'}", "broken symbolic link"),
                         (f"sqlite:///{tmp_path / 'dangling'}", "broken symbolic link"),
                         (f"sqlite:///{tmp_path / 'plainfile' / 'mlflow.db'}", "which is a file"),
                         (f"sqlite:///{store}?cache=shared", "query strings and %-escapes"),
                         (f"sqlite:///{tmp_path}/p%70/mlflow.db", "query strings and %-escapes")):
        for write in (False, True):
            with pytest.raises(store_checks.StoreError, match=message):
                check(uri, write=write, create=write)


def test_no_path_past_the_early_check_writes_into_a_foreign_database(tmp_path) -> None:
    import sqlite3

    foreign = tmp_path / "app.db"  # somebody's database, not an MLflow store
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE customers (name TEXT)")
    before = foreign.read_bytes()
    # -m skips the entry point's early check (Hydra flags go to Hydra): the sweep callback
    # and the job still meet the check in tracking.setup before MLflow touches the file.
    result = run([str(BIN / "fashion-exp-evaluate"), "-m",
                  f"model_uri=runs:/{UNKNOWN_RUN}/model", f"tracking.uri=sqlite:///{foreign}",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode != 0 and "not an MLflow store" in result.stderr
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "sweep") == ["app.db"]


def test_passwords_are_masked_in_config_errors() -> None:
    from fashion_exp.schemas import ConfigError, TrackingConfig

    with pytest.raises(ConfigError) as err:
        TrackingConfig(uri="postgres://bob:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(err.value) and "bob:***@" in str(err.value)


def test_a_store_being_created_by_another_job_is_asked_again_once_it_is_done(tmp_path) -> None:
    """Parallel jobs: one creates a new store's tables under the store's lock while another
    checks it. The checker waits for the lock and finds the finished store; a command that
    may not create stores, or a store still half-made once the lock is free, is refused."""
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE experiments (id INTEGER)")  # MLflow's first step
    uri = f"sqlite:///{db}"
    creator_holds = threading.Event()

    def create_the_rest() -> None:
        with file_lock(db.with_name(db.name + ".lock")):
            creator_holds.set()
            time.sleep(1.0)
            with sqlite3.connect(db) as conn:
                for table in store_checks.MLFLOW_TABLES:
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER)")

    with pytest.raises(store_checks.StoreError, match="half-created"):
        store_checks.check_store(uri, write=False, connect_timeout=5)
    creator = threading.Thread(target=create_the_rest)
    creator.start()
    creator_holds.wait(5)
    assert store_checks.check_store(uri, write=True, create=True, connect_timeout=5) == uri
    creator.join()

    half = tmp_path / "half.db"
    with sqlite3.connect(half) as conn:
        conn.execute("CREATE TABLE experiments (id INTEGER)")
    with pytest.raises(store_checks.StoreError, match="half-created"):
        store_checks.check_store(f"sqlite:///{half}", write=True, create=True, connect_timeout=5)
