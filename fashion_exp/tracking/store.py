"""MLflow: where runs go, what a run records, and how a run always ends with a final status."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking.context.registry import resolve_tags
from omegaconf import DictConfig

from fashion_exp import interrupts, procs
from fashion_exp.config import project_root
from fashion_exp.files import file_lock
from fashion_exp.tracking import views
from fashion_exp.tracking.logged_models import MODEL_ARTIFACT
from fashion_exp.tracking.offline import Outbox, server_gone
from fashion_exp.tracking.recorder import Recorder
from fashion_exp.tracking.store_checks import (
    check_store,
    resolve_uri,
    server_message,
    server_problem,
    sqlite_path,
)
from fashion_exp.uris import is_server


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot take runs (and did not come back in time); nothing was
    started."""

log = logging.getLogger(__name__)

OWNER_TAGS = ("host", "pid", "started")  # process.* tags of a run: see procs.alive
MAX_RUN_NAME = 250  # MLflow's column size: a database server (PostgreSQL) rejects longer names
# MLflow's UI opens experiments of this kind in its model-training view (not the GenAI one).
# Private API (mlflow 3.17.2): an undocumented tag its UI reads; no public setting of the view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# --- Where runs go -----------------------------------------------------------------------------

def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside the database; servers choose their own."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while it may be created or migrated.

    MLflow creates and migrates a new SQLite store on first use; two processes doing that at
    once leave it half-migrated ("duplicate column name") and every later run fails. Parallel
    jobs therefore take turns for this step; ordinary writes afterwards need no lock.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(db.name + ".lock")):
        yield


def connect(cfg: DictConfig) -> str:
    """The resolved tracking URI of cfg.tracking, once the store is usable for recording runs
    (store_checks.StoreError if not); a server that cannot take runs now is waited for
    (wait_for_server)."""
    uri = resolve_uri(cfg.uri)
    if cfg.mode == "server" and not is_server(uri):
        raise TrackingUnavailable(f"tracking=server needs an http(s):// URI, got {uri}")
    if is_server(uri):
        wait_for_server(uri, cfg.reconnect_seconds, cfg.connect_timeout)
    return check_store(uri, write=True, create=True, connect_timeout=cfg.connect_timeout)


def wait_for_server(uri: str, seconds: float, timeout: float = 5.0) -> None:
    """Wait up to `seconds` (tracking.reconnect_seconds) for a tracking server that cannot take
    runs now, saying so in one line; TrackingUnavailable (one line) if it is not back by then.

    A job of a sweep (or an ending sweep) that meets an outage waits for the server like a run
    whose server goes away mid-way, instead of failing at once and leaving nothing."""
    problem = server_problem(uri, timeout)
    if problem is None:
        return
    deadline = time.monotonic() + seconds
    if seconds > 0:
        log.warning("the tracking server %s %s; waiting up to %g s for it "
                    "<tracking.reconnect_seconds>", uri, problem, seconds)
    while problem is not None and time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        problem = server_problem(uri, timeout)
    if problem is not None:
        raise TrackingUnavailable(server_message(uri, problem))
    log.warning("the tracking server %s is back", uri)


def offline_root(cfg: DictConfig | None) -> Path:
    """Where runs' data wait while the server is unreachable (tracking.offline_dir)."""
    if cfg is not None and cfg.offline_dir:
        return Path(cfg.offline_dir)
    return project_root() / "mlruns" / "offline"


def setup(uri: str, experiment_name: str, connect_timeout: float = 5.0,
          checked: bool = False, wait_seconds: float = 0.0) -> str:
    """The id of the experiment `experiment_name` in the store at `uri`, created if new.

    Every path that may create or migrate a store comes through here, so the store is
    checked here (store_checks.StoreError) unless the caller has just checked it (`checked`:
    a URI that check_store or connect returned): whatever skipped the entry points' early
    check (Hydra flags, a sweep's callback), MLflow never writes its tables into a file that
    is not a usable store of its own. A tracking server that cannot take runs is waited for
    up to `wait_seconds`."""
    if not checked:
        uri = check_store(uri, write=True, create=True, connect_timeout=connect_timeout)
    if is_server(uri):
        wait_for_server(uri, wait_seconds, connect_timeout)
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)  # its first request creates a new store's tables
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return client.create_experiment(experiment_name, artifact_root(uri),
                                            tags=EXPERIMENT_KIND)
    if not any(key in experiment.tags for key in EXPERIMENT_KIND):  # a user's choice stays
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def fit_run_name(text: str) -> str:
    """A run name that fits any store (the full overrides are kept in the `overrides` tag)."""
    return text if len(text) <= MAX_RUN_NAME else text[:MAX_RUN_NAME - 3] + "..."


def ui_hint(uri: str, exp_id: str, run_id: str) -> str:
    """How to open a run in the MLflow UI."""
    return views.ui_hint(uri, views.run_link(exp_id, run_id))


# --- Finding logged models --------------------------------------------------------------------

def runs_with_models(client: mlflow.MlflowClient, experiment_name: str) -> Iterator[Any]:
    """The experiment's finished training runs that logged a model, best test accuracy first."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["metrics.test_accuracy DESC"], max_results=500)
    for run in runs:
        trained = run.data.tags.get("evaluation") != "true" and run.outputs is not None
        if trained and run.outputs.model_outputs and "test_accuracy" in run.data.metrics:
            yield run


def best_model_uri(client: mlflow.MlflowClient, experiment_name: str) -> str | None:
    """runs:/<id>/model of the experiment's finished training run with the best test accuracy."""
    best = next(runs_with_models(client, experiment_name), None)
    return None if best is None else f"runs:/{best.info.run_id}/{MODEL_ARTIFACT}"


# --- Runs whose process ended without ending them ----------------------------------------------

def owner(run: Any) -> dict[str, str]:
    """The process that ran a run (host, pid, started), from its tags."""
    return {key: run.data.tags.get(f"process.{key}", "") for key in OWNER_TAGS}


def orphaned(run: Any) -> bool | None:
    """For a RUNNING run: True if its process is gone (killed without ending the run), False
    if it still runs, None if it ran on another host. False for ended runs."""
    if run.info.status != "RUNNING":
        return False
    alive = procs.alive(owner(run))
    return None if alive is None else not alive


def resumable(run_id: str, uri: str) -> bool:
    """Whether a run can be resumed: in the store, not finished, and not running elsewhere."""
    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return run.info.status in ("KILLED", "FAILED") or orphaned(run) is True


# --- How a run ends ----------------------------------------------------------------------------

def _begin(client: mlflow.MlflowClient, experiment_id: str, run_name: str,
           tags: dict[str, str], resume_run_id: str | None) -> str:
    """Create the run, or set a stopped one RUNNING again, with this process as its owner."""
    owner = {f"process.{key}": value for key, value in procs.this_process().items()}
    if resume_run_id:
        stopped_by = client.get_run(resume_run_id).data.tags.get("error")
        client.update_run(resume_run_id, status="RUNNING")
        resumed = owner | {k: v for k, v in tags.items() if k.startswith("resum")}
        for key, value in resumed.items():
            client.set_tag(resume_run_id, key, value)
        if stopped_by:  # the run goes on: its stop is history, not its error
            client.set_tag(resume_run_id, "stopped_by", stopped_by)
            client.delete_tag(resume_run_id, "error")
        return resume_run_id
    # MLflow's run-context tags (source, user, git commit), as its own start_run adds.
    # Private API (mlflow 3.17.2): resolve_tags; MlflowClient.create_run has no public way to
    # add them.
    return client.create_run(experiment_id, run_name=fit_run_name(run_name),
                             tags=resolve_tags(tags | owner)).info.run_id


def _begun_before(client: mlflow.MlflowClient, experiment_id: str) -> str | None:
    """The run an earlier, failed try of _begin created (the server wrote it, its answer was
    lost): RUNNING and owned by this process. A process runs one run at a time, so runs of
    its earlier jobs have ended."""
    owner = " and ".join(f"tags.`process.{key}` = '{value}'"
                         for key, value in procs.this_process().items())
    runs = client.search_runs([experiment_id], f"{owner} and attributes.status = 'RUNNING'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def _end(recorder: Recorder, err: BaseException) -> None:
    """End a run that `err` stopped: KILLED for a stop (Ctrl-C, SIGTERM), else FAILED, with
    the error recorded; another stop meanwhile waits until the run has ended."""
    with interrupts.deferred():
        recorder.record_error(err)
        recorder.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")


@contextmanager
def tracked_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
                cfg: DictConfig | None = None,
                resume_run_id: str | None = None) -> Iterator[Recorder]:
    """A run in experiment `experiment_id` of the store at `uri` (as setup() returned them),
    ending FINISHED, FAILED (error recorded) or KILLED
    (Ctrl-C, SIGTERM); yields its Recorder.

    The run carries its process (host, pid, start time), so that a run whose process was
    killed without a chance to end it can be found later (fashion-exp-runs interrupted).
    `resume_run_id` continues an existing run instead of starting one. When `cfg` (the
    tracking config) is given and the store is a server, logging goes through an outbox that
    survives outages."""
    interrupts.install()
    client = mlflow.MlflowClient(uri)
    run_id: str | None = None
    outbox: Outbox | None = None
    try:
        with interrupts.deferred():  # a stop while the run starts is raised once it has
            try:
                run_id = _begin(client, experiment_id, run_name, tags, resume_run_id)
            except Exception as err:
                if cfg is None or not server_gone(uri, err):
                    raise
                # The server went away since setup(): wait for it, as at setup. The first
                # try may have created the run before its answer was lost: that run is used.
                wait_for_server(uri, cfg.reconnect_seconds, cfg.connect_timeout)
                run_id = (None if resume_run_id else _begun_before(client, experiment_id)) \
                    or _begin(client, experiment_id, run_name, tags, resume_run_id)
            outbox = (Outbox(uri, run_id, offline_root(cfg))
                      if cfg is not None and is_server(uri) else None)
            recorder = Recorder(client, run_id, outbox)
    except KeyboardInterrupt as err:
        if run_id is not None:  # ... and then the run ends KILLED, not RUNNING
            _end(Recorder(client, run_id), err)
        raise
    try:
        yield recorder
    except BaseException as err:
        stop = interrupts.stop_behind(err)  # a stop that surfaced as another error ends KILLED
        _end(recorder, stop)
        if stop is err:
            raise
        raise stop from err
    else:
        # A stop while the run ends FINISHED lets it finish; the next check() (the next job of
        # a sweep) raises it.
        with interrupts.deferred(raise_stop=False):
            recorder.end("FINISHED")
    finally:
        if outbox is not None:
            outbox.finish(cfg.reconnect_seconds)
