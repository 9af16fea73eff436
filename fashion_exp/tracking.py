"""MLflow: where runs go, what a run records, and how a run always ends with a final status."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import RunStatus
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf

from fashion_exp import interrupts, procs, views
from fashion_exp.config import project_root
from fashion_exp.locks import file_lock
from fashion_exp.logged_models import MODEL_ARTIFACT
from fashion_exp.metrics import PER_CLASS_PREFIX, epoch_metric, tidy
from fashion_exp.offline import Outbox
from fashion_exp.stores import check_store, resolve_uri, server_up, sqlite_path

# The outbox of the active run on a tracking server (None for local stores).
_outbox: Outbox | None = None


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; nothing was started."""

log = logging.getLogger(__name__)

OWNER_TAGS = ("host", "pid", "started")  # process.* tags of a run: see procs.alive
MAX_RUN_NAME = 250  # MLflow's column size: a database server (PostgreSQL) rejects longer names
# MLflow's UI opens experiments of this kind in its model-training view (not the GenAI one).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# --- Where runs go -----------------------------------------------------------------------------

# resolve_uri (tracking URI to use) and sqlite_path (its SQLite file) live in stores.py, which
# checks a store before MLflow is imported; imported above for this module's callers.


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


def is_server(uri: str) -> bool:
    """Whether a resolved tracking URI is a tracking server."""
    return uri.startswith(("http://", "https://"))


def connect(cfg: DictConfig) -> str:
    """The resolved tracking URI of cfg.tracking, once the store is usable for recording runs
    (stores.StoreError if not); for a server, MLflow's request timeout and retries are set
    from the config and the server must answer (TrackingUnavailable)."""

    uri = resolve_uri(cfg.uri)
    if cfg.mode == "server" and not is_server(uri):
        raise TrackingUnavailable(f"tracking=server needs an http(s):// URI, got {uri}")
    check_store(cfg.uri, write=True, create=True, connect_timeout=cfg.connect_timeout)
    if is_server(uri):
        # MLflow retries a failed request 7 times with backoff 2 (minutes of stalled training);
        # fewer, shorter retries here, and the outbox keeps the data of a longer outage.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, cfg.request_timeout)))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        if not server_up(uri, timeout=cfg.request_timeout):
            raise TrackingUnavailable(
                f"the tracking server {uri} does not answer (GET /health); start it (e.g. "
                "python scripts/team_stack.py start) or set tracking.uri")
    return uri


def offline_root(cfg: DictConfig) -> Path:
    """Where runs' data wait while the server is unreachable (tracking.offline_dir)."""
    return Path(cfg.offline_dir) if cfg.offline_dir else project_root() / "mlruns" / "offline"


def _send(live: Any, entry: Any) -> None:
    """A logging call of the active run, through its outbox when it logs to a server."""
    if _outbox is None:
        live()
    else:
        _outbox.send(live, entry)


def _file_entry(name: str, write: Any) -> Any:
    """A journal entry for artifact `name` (a file, or a folder when it names one):
    write(path) puts it in the offline folder."""
    def entry(folder: Path) -> dict[str, Any]:
        path = folder / "files" / uuid.uuid4().hex[:12] / Path(name).name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        parent = str(Path(name).parent)
        return {"kind": "artifact", "file": str(path.relative_to(folder)),
                "artifact_path": None if parent == "." else parent}
    return entry


def _metrics_entry(metrics: dict[str, float], step: int) -> Any:
    stamp = int(time.time() * 1000)
    return lambda folder: {"kind": "metrics", "metrics": metrics, "step": step,
                           "timestamp": stamp}


def setup(uri: str | None, experiment_name: str,
          connect_timeout: float = 5.0) -> tuple[str, str]:
    """Point MLflow at the store (creating it if new) and return (uri, experiment id).

    Every path that may create or migrate a store comes through here, so the store is
    checked here too (StoreError): whatever skipped the entry points' early check (Hydra
    flags, a sweep's callback), MLflow never writes its tables into a file that is not a
    usable store of its own."""
    uri = check_store(uri, write=True, create=True, connect_timeout=connect_timeout)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            exp_id = mlflow.create_experiment(experiment_name, artifact_root(uri),
                                              tags=EXPERIMENT_KIND)
        else:
            exp_id = experiment.experiment_id
            if not any(key in experiment.tags for key in EXPERIMENT_KIND):  # a user's choice stays
                for key, value in EXPERIMENT_KIND.items():
                    mlflow.MlflowClient().set_experiment_tag(exp_id, key, value)
    mlflow.set_experiment(experiment_id=exp_id)
    return uri, exp_id


def fit_run_name(text: str) -> str:
    """A run name that fits any store (the full overrides are kept in the `overrides` tag)."""
    return text if len(text) <= MAX_RUN_NAME else text[:MAX_RUN_NAME - 3] + "..."


def ui_hint(uri: str, exp_id: str, run_id: str) -> str:
    """How to open a run in the MLflow UI."""
    return views.ui_hint(uri, views.run_link(exp_id, run_id))


# --- What a run records ------------------------------------------------------------------------

def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as MLflow params with dot keys: {'optimizer.lr': '0.02', ...}."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = "null" if node is None else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_commit() -> str:
    """The checked-out commit of the project, with '-dirty' when files changed; 'unknown'."""
    root = project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_params(params: dict[str, Any]) -> None:
    """Params of the active run."""
    params = {key: str(value) for key, value in params.items()}
    _send(lambda: mlflow.log_params(params), lambda folder: {"kind": "params", "params": params})


def set_tags(tags: dict[str, str]) -> None:
    """Tags of the active run."""
    _send(lambda: mlflow.set_tags(tags), lambda folder: {"kind": "tags", "tags": tags})


def log_text(text: str, name: str) -> None:
    """A text artifact of the active run."""
    _send(lambda: mlflow.log_text(text, name), _file_entry(name, lambda p: p.write_text(text)))


def log_config(cfg: DictConfig, hydra_dir: Path | None) -> None:
    """Params (flattened config), the resolved YAML, and Hydra's .hydra/ files."""
    log_params(flatten(cfg))
    log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
        source = str(hydra_dir / ".hydra")
        _send(lambda: mlflow.log_artifacts(source, "hydra"),
              _file_entry("hydra/files", lambda p: shutil.copytree(source, p)))


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """Metrics of the active run at `step`, float32 values tidied."""
    metrics = {key: tidy(value) for key, value in metrics.items()}
    _send(lambda: mlflow.log_metrics(metrics, step=step), _metrics_entry(metrics, step))


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """One epoch's Keras metrics under their epoch_metric names, step = epoch counted from 1
    (the figures count epochs the same way)."""
    log_metrics({epoch_metric(key): value for key, value in metrics.items()}, epoch)


def log_model_info(model: Any) -> None:
    """Parameter and layer counts as tags (they follow from params, so they are not params:
    a sweep's comparison would count them as varied), the Keras summary as a text artifact."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    set_tags({"model.param_count": str(model.count_params()),
              "model.num_layers": str(len(model.layers))})
    log_text("\n".join(lines), "model_summary.txt")


def metric_key(class_name: str) -> str:
    """A class name as a metric-name suffix: 'T-shirt/top' -> 't_shirt_top'."""
    return "".join(c if c.isalnum() else "_" for c in class_name.lower())


def log_evaluation(result: Any, epochs_trained: int) -> None:
    """Test loss and accuracy, accuracy per class, and the classification report, at the step
    of the last epoch (the step the logged model links its metrics from)."""
    per_class = {PER_CLASS_PREFIX + metric_key(name): acc
                 for name, acc in result.per_class_accuracy.items()}
    # Six decimals: finer than one image of a 10,000-image test set, and readable in the UI.
    metrics = {key: round(float(value), 6) for key, value in
               ({"test_loss": result.loss, "test_accuracy": result.accuracy} | per_class).items()}
    metrics["epochs_trained"] = epochs_trained
    log_metrics(metrics, epochs_trained)
    log_text(result.report, "classification_report.txt")


def log_figures(figures: dict[str, Any]) -> None:
    """Each matplotlib figure as a PNG artifact under its file name."""
    for name, fig in figures.items():
        _send(lambda: mlflow.log_figure(fig, name),  # noqa: B023 - called before the next fig
              _file_entry(name, lambda p: fig.savefig(p)))  # noqa: B023


def model_signature() -> ModelSignature:
    """Raw uint8 images (N, 28, 28) in, class probabilities (N, 10) out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_model(model: Any, registered_name: str | None, step: int) -> None:
    """Log the model at artifact path 'model' (and register it); MLflow links to it the run's
    metrics at `step` (the last epoch's, and the test metrics logged there)."""
    def entry(folder: Path) -> dict[str, Any]:
        model.save(folder / "model.keras")
        return {"kind": "model", "file": "model.keras", "registered_name": registered_name,
                "step": step}

    _send(lambda: _log_keras_model(model, registered_name, step), entry)


def log_saved_model(path: Path, entry: dict[str, Any]) -> None:
    """Log a Keras model saved by the outbox into its run (replaying an offline journal)."""
    import keras

    model = keras.models.load_model(path, compile=False)
    mlflow.set_tracking_uri(entry["tracking_uri"])
    active = mlflow.active_run()
    step = entry.get("step", 0)  # journals written before models carried a step
    if active is not None and active.info.run_id == entry["run_id"]:
        _log_keras_model(model, entry["registered_name"], step)
        return
    with mlflow.start_run(run_id=entry["run_id"]):  # the journal's "end" entry sets the status
        _log_keras_model(model, entry["registered_name"], step)


def _log_keras_model(model: Any, registered_name: str | None, step: int) -> str:
    """mlflow.tensorflow.log_model with our signature and explicit requirements."""
    import keras
    import mlflow.tensorflow
    import tensorflow as tf

    # Explicit requirements: inferring them costs ~11 s per run in a subprocess.
    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}",
                    f"mlflow=={mlflow.__version__}"]
    info = mlflow.tensorflow.log_model(
        model, name=MODEL_ARTIFACT, signature=model_signature(),
        pip_requirements=requirements, registered_model_name=registered_name, step=step,
    )
    return info.model_uri


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

def _record_error(err: BaseException) -> None:
    """Put the error on the run (tag and traceback artifact); never raises."""
    try:
        set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        log_text("".join(traceback.format_exception(type(err), err, err.__traceback__)),
                 "error.txt")
    except Exception as inner:  # noqa: BLE001 - the original error matters more
        log.warning("could not record the error on the run: %s", inner)


def _end(status: RunStatus) -> None:
    """End the active run with a status (journaled if the server is unreachable)."""
    name = RunStatus.to_string(status)

    def offline(folder: Path) -> dict[str, Any]:
        # MLflow has no public way to leave a run without telling the store; its fluent API
        # keeps active runs on this stack (end_run pops it before calling the store).
        stack = mlflow.tracking.fluent._active_run_stack.get()
        if stack and _outbox is not None and stack[-1].info.run_id == _outbox.run_id:
            stack.pop()
        return {"kind": "end", "status": name}

    _send(lambda: mlflow.end_run(name), offline)


@contextmanager
def tracked_run(run_name: str, tags: dict[str, str], cfg: DictConfig | None = None,
                resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, FAILED (error recorded) or KILLED (Ctrl-C, SIGTERM).

    The run carries its process (host, pid, start time), so that a run whose process was
    killed without a chance to end it can be found later (fashion-exp-runs interrupted).
    `resume_run_id` continues an existing run instead of starting one. When `cfg` (the
    tracking config) is given and the store is a server, logging goes through an outbox that
    survives outages."""
    global _outbox
    interrupts.install()
    owner = {f"process.{key}": value for key, value in procs.this_process().items()}
    if resume_run_id:
        stopped_by = mlflow.MlflowClient().get_run(resume_run_id).data.tags.get("error")
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags(owner | {k: v for k, v in tags.items() if k.startswith("resum")})
        if stopped_by:  # the run goes on: its stop is history, not its error
            mlflow.set_tag("stopped_by", stopped_by)
            mlflow.MlflowClient().delete_tag(resume_run_id, "error")
    else:
        run = mlflow.start_run(run_name=fit_run_name(run_name), tags=tags | owner)
    uri = mlflow.get_tracking_uri()
    if cfg is not None and is_server(uri):
        _outbox = Outbox(uri, run.info.run_id, offline_root(cfg))
    try:
        yield run
    except KeyboardInterrupt as err:
        _record_error(err)
        _end(RunStatus.KILLED)
        raise
    except BaseException as err:
        _record_error(err)
        _end(RunStatus.FAILED)
        raise
    else:
        _end(RunStatus.FINISHED)
    finally:
        if _outbox is not None:
            outbox, _outbox = _outbox, None
            outbox.finish(cfg.reconnect_seconds)
