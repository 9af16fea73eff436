"""A tracking server that dies at any moment of a run, a sweep or a search: afterwards the
server holds every run FINISHED with exactly what an undisturbed run records, and nothing is
left RUNNING. The server (the team stack's `mlflow server` on PostgreSQL) is SIGKILLed when
the run reaches a phase, and started again a few seconds later."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow
import psutil
import pytest

from devtools import team

from .helpers import CLI_ENV, requires_real_data

pytestmark = [pytest.mark.slow, requires_real_data]

# Two short epochs with figures and the model: every phase of a run, in ~15 s. A killed
# server or a stopped database fails a call at once; the request timeout stays long enough
# that a busy machine's slow answer is not taken for an outage.
RUN = ["debug=fast", "data.limit=600", "trainer.epochs=2", "tracking=server",
       "tracking.retries=0", "tracking.request_timeout=15",
       "tracking.reconnect_seconds=120"]
DOWN_SECONDS = 3.0  # how long the server stays dead before it is started again


class Outage(threading.Thread):
    """Kill the stack's tracking server once `when()` is true, start it again after `down`
    seconds (never, with down=None).

    The command's processes (`proc` and its children) are paused (SIGSTOP) from the moment
    `when()` is seen until the fault is in place: on a machine of any speed the command meets
    the outage in the phase that `when()` names, not after it."""

    def __init__(self, stack: team.Stack, when: Callable[[], bool], proc: subprocess.Popen,
                 down: float | None = DOWN_SECONDS) -> None:
        super().__init__(daemon=True)
        self.stack, self.when, self.proc, self.down = stack, when, proc, down
        self.killed = self.restarted = False
        self.deadline = time.monotonic() + 600
        self.restarting = threading.Lock()  # the thread and the test's cleanup may both try

    def run(self) -> None:
        while not self.when():
            if time.monotonic() > self.deadline:
                return
            time.sleep(0.05)
        with paused(self.proc):
            self.fault()
        self.killed = True
        if self.down is not None:
            time.sleep(self.down)
            self.restart()

    def fault(self) -> None:
        team.kill_mlflow(self.stack)

    def restart(self) -> None:
        with self.restarting:
            if not team.server_up(self.stack.tracking_uri):
                team.restart_mlflow(self.stack)
            self.restarted = True


@contextmanager
def paused(proc: subprocess.Popen) -> Iterator[None]:
    """The process and its children stopped (SIGSTOP) inside, continued (SIGCONT) after."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # it has ended: nothing to pause
        procs = []
    for each in procs:
        with suppress(psutil.NoSuchProcess):
            each.suspend()
    try:
        yield
    finally:
        for each in procs:
            with suppress(psutil.NoSuchProcess):
                each.resume()


def logged(log: Path, text: str, times: int = 1) -> Callable[[], bool]:
    """A condition: `text` appears at least `times` times in the log."""
    return lambda: log.is_file() and log.read_text().count(text) >= times


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """fashion-exp-train in the background, its outbox in tmp_path/offline."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "fashion_exp.cli.train", *args,
           f"tracking.offline_dir={tmp_path / 'offline'}",
           f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=CLI_ENV)
    return proc, log


def finish(proc: subprocess.Popen, log: Path, outage: Outage, code: int = 0) -> str:
    """Wait for the command and the outage; the command's output."""
    try:
        assert proc.wait(timeout=600) == code, log.read_text()[-4000:]
    finally:
        proc.kill()
        outage.join(timeout=60)
        if not team.server_up(outage.stack.tracking_uri):
            outage.restart()
    assert outage.killed, "the server was never killed: the phase was not reached"
    return log.read_text()


def runs_of(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=100)


def artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(found)


def record(uri: str, run) -> dict:
    """What a run holds on the server: status, params, each metric's steps (one per value),
    its artifacts and its READY models."""
    client = mlflow.MlflowClient(uri)
    run_id = run.info.run_id
    ids = [out.model_id for out in (run.outputs.model_outputs if run.outputs else [])]
    models = [m for m in map(client.get_logged_model, ids) if m.status == "READY"]
    pending = [m for m in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if m.status == "PENDING"]  # begun as the server died, and never ended
    return {"status": run.info.status, "params": sorted(run.data.params),
            "metrics": {key: sorted(m.step for m in client.get_metric_history(run_id, key))
                        for key in run.data.metrics},
            "artifacts": artifacts(client, run_id), "models": len(models),
            "pending_models": len(pending),
            "tags": sorted(k for k in run.data.tags if not k.startswith(("mlflow.", "process.")))}


@pytest.fixture(scope="module")
def undisturbed(team_stack, tmp_path_factory) -> dict:
    """What an undisturbed run of RUN records on the server."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    proc, log = start(tmp, *RUN, f"tracking.uri={team_stack.tracking_uri}",
                      "tracking.experiment_name=outage_baseline")
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    (run,) = runs_of(team_stack.tracking_uri, "outage_baseline")
    baseline = record(team_stack.tracking_uri, run)
    assert baseline["models"] == 1 and baseline["metrics"]["epoch/val_accuracy"] == [1, 2]
    return baseline


def model_ready(uri: str, experiment: str) -> Callable[[], bool]:
    """A condition: the experiment's run has logged its model (the run is about to end)."""
    def ready() -> bool:
        try:
            (run,) = runs_of(uri, experiment)
            return bool(run.outputs and run.outputs.model_outputs)
        except Exception:  # noqa: BLE001 - not yet there
            return False
    return ready


# Where each phase begins, by the runner's own log lines.
PHASES = {
    "start": "Data <data>",  # after the store check, before the run exists on the server
    "epochs": "Epoch 1/",  # the first epoch's metrics
    "figures": "Logging figures",
    "model": "Logging the model",
}


@pytest.mark.parametrize("phase", [*PHASES, "end"])
def test_a_run_loses_nothing_when_the_server_dies(team_stack, undisturbed, tmp_path,
                                                  phase) -> None:
    uri, experiment = team_stack.tracking_uri, f"outage_{phase}"
    proc, log = start(tmp_path, *RUN, f"tracking.uri={uri}",
                      f"tracking.experiment_name={experiment}")
    when = model_ready(uri, experiment) if phase == "end" else logged(log, PHASES[phase])
    outage = Outage(team_stack, when, proc)
    outage.start()
    out = finish(proc, log, outage)
    (run,) = runs_of(uri, experiment)
    assert record(uri, run) == undisturbed, out[-3000:]
    assert not any((tmp_path / "offline").glob("*/journal.jsonl"))  # everything was sent
    assert "test_accuracy=" in out
    # The outage was met: the run waited for the server or buffered what it could not send.
    assert "waiting up to" in out or "unreachable" in out, out[-3000:]


def test_a_run_whose_model_cannot_be_sent_keeps_it_for_upload(team_stack, undisturbed,
                                                               tmp_path) -> None:
    """The server dies as the model is logged and stays away past reconnect_seconds: the
    model waits on disk, and `fashion-exp-runs upload` completes the run."""
    uri = team_stack.tracking_uri
    proc, log = start(tmp_path, *RUN[:-1], "tracking.reconnect_seconds=2", f"tracking.uri={uri}",
                      "tracking.experiment_name=outage_upload")
    outage = Outage(team_stack, logged(log, PHASES["model"]), proc, down=None)
    outage.start()
    try:
        out = finish(proc, log, outage)
    finally:
        outage.restart()
    (folder,) = [p for p in (tmp_path / "offline").iterdir()]
    assert f"send it with: fashion-exp-runs upload {folder}" in out
    assert (folder / "model.keras").is_file() or any(folder.rglob("model.keras"))
    upload = subprocess.run([sys.executable, "-m", "fashion_exp.cli.runs", "upload", str(folder)],
                            capture_output=True, text=True, env=CLI_ENV, cwd=tmp_path)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    (run,) = runs_of(uri, "outage_upload")
    assert record(uri, run) == undisturbed
    assert not folder.exists()


SWEEP = ["-m", "optimizer.lr=0.01,0.05", *RUN]


def check_sweep(uri: str, experiment: str, undisturbed: dict, jobs: int = 2) -> None:
    """One parent FINISHED with its leaderboard, `jobs` children each complete, nothing
    RUNNING."""
    runs = runs_of(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert len(parents) == 1 and len(children) == jobs, [r.info.run_name for r in runs]
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["jobs_total"] == str(jobs)
    assert "leaderboard.md" in artifacts(mlflow.MlflowClient(uri), parent.info.run_id)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        seen = record(uri, child)
        assert seen | {"tags": []} == undisturbed | {"tags": []}


def test_a_sweep_loses_nothing_when_the_server_dies_at_its_end(team_stack, undisturbed,
                                                               tmp_path) -> None:
    """Once the last job has finished, before the parent gets its leaderboard. (A job that
    starts during an outage is the run's `start` phase; the search's start covers a sweep's.)"""
    uri, experiment = team_stack.tracking_uri, "outage_sweep_end"
    proc, log = start(tmp_path, *SWEEP, f"tracking.uri={uri}",
                      f"tracking.experiment_name={experiment}")
    outage = Outage(team_stack, logged(log, "test_accuracy=", 2), proc)
    outage.start()
    finish(proc, log, outage)
    check_sweep(uri, experiment, undisturbed)


def test_a_sweep_whose_server_stays_away_at_the_end_is_finished_by_upload(
        team_stack, undisturbed, tmp_path) -> None:
    uri = team_stack.tracking_uri
    proc, log = start(tmp_path, *SWEEP[:-1], "tracking.reconnect_seconds=2", f"tracking.uri={uri}",
                      "tracking.experiment_name=outage_sweep_upload")
    outage = Outage(team_stack, logged(log, "test_accuracy=", 2), proc, down=None)
    outage.start()
    try:
        out = finish(proc, log, outage)
    finally:
        outage.restart()
    (kept,) = (tmp_path / "offline").glob("sweep-*")
    assert f"finish it with: fashion-exp-runs upload {kept}" in out
    assert "Traceback" not in out
    upload = subprocess.run([sys.executable, "-m", "fashion_exp.cli.runs", "upload", str(kept)],
                            capture_output=True, text=True, env=CLI_ENV, cwd=tmp_path)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    assert "sweep ended FINISHED" in upload.stdout
    check_sweep(uri, "outage_sweep_upload", undisturbed)
    assert not kept.exists()


@pytest.mark.parametrize("phase", ["start", "end"])
def test_a_search_loses_nothing_when_the_server_dies(team_stack, tmp_path, phase) -> None:
    uri, experiment = team_stack.tracking_uri, f"outage_search_{phase}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc, log = start(tmp_path, "-m", "hparams_search=mlp_optuna", *RUN,
                      "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
                      f"tracking.uri={uri}", f"tracking.experiment_name={experiment}")
    trials_ended = lambda: log.read_text().count("test_accuracy=") + log.read_text().count(  # noqa: E731
        "pruned at epoch") >= 2
    # end: both trials are over; the study's pictures and the leaderboard are next.
    when = logged(log, "Data <data>") if phase == "start" else trials_ended
    outage = Outage(team_stack, when, proc)
    outage.start()
    finish(proc, log, outage)
    runs = runs_of(uri, experiment)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_total"] == "2"
    assert len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert any(p.startswith("search/") for p in artifacts(mlflow.MlflowClient(uri),
                                                          parent.info.run_id))


class DatabaseOutage(Outage):
    """Stop the PostgreSQL server behind the tracking server (which keeps answering, 5xx)
    once `when()` is true, and start it again after `down` seconds."""

    def fault(self) -> None:
        team.stop_postgres(Path(self.stack.dir) / "pgdata")

    def restart(self) -> None:
        team.start_postgres(Path(self.stack.dir) / "pgdata", self.stack.pg_port)
        self.restarted = True


def test_a_run_loses_nothing_when_the_database_behind_the_server_fails(
        team_stack, undisturbed, tmp_path) -> None:
    uri = team_stack.tracking_uri
    proc, log = start(tmp_path, *RUN, f"tracking.uri={uri}",
                      "tracking.experiment_name=outage_database")
    outage = DatabaseOutage(team_stack, logged(log, PHASES["epochs"]), proc, down=8)
    outage.start()
    out = finish(proc, log, outage)
    (run,) = runs_of(uri, "outage_database")
    assert record(uri, run) == undisturbed, out[-3000:]
    assert "unreachable" in out and "Traceback" not in out


def test_a_search_whose_database_goes_away_stops_in_one_line_and_keeps_its_run(
        team_stack, tmp_path) -> None:
    """PostgreSQL (the tracking server's store and the study's) stops during the first trial
    and stays away: the trial trains on without pruning, its run waits in the outbox, the
    search stops in one line; once the database is back, upload completes run and sweep."""
    uri, experiment = team_stack.tracking_uri, "outage_search_database"
    proc, log = start(tmp_path, "-m", "hparams_search=mlp_optuna", *RUN[:-1],
                      "tracking.reconnect_seconds=2", "hydra.sweeper.n_trials=2",
                      f"hydra.sweeper.storage={team_stack.optuna_storage}",
                      f"hydra.sweeper.study_name=lost_{tmp_path.name}",
                      f"tracking.uri={uri}", f"tracking.experiment_name={experiment}")
    pgdata = Path(team_stack.dir) / "pgdata"
    deadline = time.monotonic() + 300
    while not logged(log, PHASES["epochs"])() and time.monotonic() < deadline:
        time.sleep(0.05)
    with paused(proc):  # the first trial meets the outage however fast the machine
        team.stop_postgres(pgdata)
    try:
        assert proc.wait(timeout=600) == 1, log.read_text()[-4000:]
    finally:
        proc.kill()
        team.start_postgres(pgdata, team_stack.pg_port)
    out = log.read_text()
    assert "Traceback" not in out, out[-4000:]
    (line,) = [x for x in out.splitlines() if "the study storage" in x and "error" in x]
    assert line.startswith("fashion-exp-train: error: the study storage postgresql+psycopg://")
    assert "the search stops; run the same command to resume it" in line
    kept = sorted((tmp_path / "offline").iterdir())
    assert len(kept) == 2 and kept[-1].name.startswith("sweep-")  # the run, then the sweep
    upload = subprocess.run([sys.executable, "-m", "fashion_exp.cli.runs", "upload",
                             *map(str, kept)], capture_output=True, text=True, env=CLI_ENV,
                            cwd=tmp_path)
    assert upload.returncode == 0, upload.stdout + upload.stderr
    runs = runs_of(uri, experiment)
    (child,) = [r for r in runs if r.data.tags.get("sweep") == "child"]
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert child.info.status == "FINISHED" and child.outputs.model_outputs
    assert "test_accuracy" in child.data.metrics
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_total"] == "1"
