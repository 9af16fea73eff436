"""MLflow: where runs go, what a run records, and how a run always ends with a final status."""

from __future__ import annotations

import logging
import os
import subprocess
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import RunStatus
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf

from fashion_exp import interrupts
from fashion_exp.config import project_root
from fashion_exp.locks import file_lock

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


# --- Where runs go -----------------------------------------------------------------------------

def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use, with relative SQLite and file paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a resolved sqlite:/// URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


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


def setup(uri: str | None, experiment_name: str) -> tuple[str, str]:
    """Point MLflow at the store (creating it if new) and return (uri, experiment id)."""
    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            exp_id = mlflow.create_experiment(experiment_name, artifact_root(uri))
        else:
            exp_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return uri, exp_id


def ui_hint(uri: str, exp_id: str, run_id: str) -> str:
    """How to open a run in the MLflow UI."""
    store = f" --backend-store-uri {uri}" if "://" in uri and not uri.startswith("http") else ""
    link = f"#/experiments/{exp_id}/runs/{run_id}"
    if uri.startswith("http"):
        return f"open {uri.rstrip('/')}/{link}"
    return f"mlflow ui{store}  then open http://127.0.0.1:5000/{link}"


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


def log_config(cfg: DictConfig, hydra_dir: Path | None) -> None:
    """Params (flattened config), the resolved YAML, and Hydra's .hydra/ files."""
    mlflow.log_params(flatten(cfg))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    if hydra_dir is not None and (hydra_dir / ".hydra").is_dir():
        mlflow.log_artifacts(str(hydra_dir / ".hydra"), "hydra")


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """One epoch's metrics, step=epoch."""
    mlflow.log_metrics(metrics, step=epoch)


def log_model_info(model: Any) -> None:
    """Parameter and layer counts as params, the Keras summary as a text artifact."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    mlflow.log_params({"model.param_count": model.count_params(),
                       "model.num_layers": len(model.layers)})
    mlflow.log_text("\n".join(lines), "model_summary.txt")


def metric_key(class_name: str) -> str:
    """A class name as a metric-name suffix: 'T-shirt/top' -> 't_shirt_top'."""
    return "".join(c if c.isalnum() else "_" for c in class_name.lower())


def log_evaluation(result: Any, epochs_trained: int) -> None:
    """Test loss and accuracy, accuracy per class, and the classification report."""
    per_class = {f"test_accuracy.{metric_key(name)}": acc
                 for name, acc in result.per_class_accuracy.items()}
    mlflow.log_metrics({"test_loss": result.loss, "test_accuracy": result.accuracy,
                        "epochs_trained": epochs_trained} | per_class)
    mlflow.log_text(result.report, "classification_report.txt")


def log_figures(figures: dict[str, Any]) -> None:
    """Each matplotlib figure as a PNG artifact under its file name."""
    for name, fig in figures.items():
        mlflow.log_figure(fig, name)


def log_metric(key: str, value: float) -> None:
    """One final metric of the active run."""
    mlflow.log_metric(key, value)


def model_signature() -> ModelSignature:
    """Raw uint8 images (N, 28, 28) in, class probabilities (N, 10) out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_model(model: Any, registered_name: str | None) -> str:
    """Log the model at artifact path 'model' (and register it); returns its URI."""
    import keras
    import mlflow.tensorflow
    import tensorflow as tf

    # Explicit requirements: inferring them costs ~11 s per run in a subprocess.
    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}",
                    f"mlflow=={mlflow.__version__}"]
    info = mlflow.tensorflow.log_model(
        model, name=MODEL_ARTIFACT, signature=model_signature(),
        pip_requirements=requirements, registered_model_name=registered_name,
    )
    return info.model_uri


# --- Finding logged models --------------------------------------------------------------------

MODEL_SCHEMES = ("runs:/", "models:/")


@dataclass(frozen=True)
class ModelRef:
    """A model URI with the run that logged it and, for registry URIs, its name and version."""

    uri: str
    run_id: str
    name: str | None = None
    version: str | None = None


def resolve_model(client: mlflow.MlflowClient, uri: str) -> ModelRef:
    """The run behind runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>.

    Raises MlflowException when the store has no such run or version, ValueError when the
    URI is not of one of these forms."""
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        client.get_run(run_id)
        return ModelRef(uri, run_id)
    name_version = uri.removeprefix("models:/")
    if not uri.startswith("models:/") or ("@" not in name_version and "/" not in name_version):
        raise ValueError("use runs:/<run_id>/model, models:/<name>/<version> or "
                         "models:/<name>@<alias>")
    if "@" in name_version:
        version = client.get_model_version_by_alias(*name_version.split("@", 1))
    else:
        version = client.get_model_version(*name_version.rsplit("/", 1))
    return ModelRef(uri, version.run_id, version.name, str(version.version))


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


# --- How a run ends ----------------------------------------------------------------------------

def _record_error(err: BaseException) -> None:
    """Put the error on the run (tag and traceback artifact); never raises."""
    try:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        mlflow.log_text(text, "error.txt")
    except Exception as inner:  # noqa: BLE001 - the original error matters more
        log.warning("could not record the error on the run: %s", inner)


@contextmanager
def tracked_run(run_name: str, tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, FAILED (error recorded) or KILLED (Ctrl-C, SIGTERM)."""
    interrupts.install()
    run = mlflow.start_run(run_name=run_name, tags=tags)
    try:
        yield run
    except KeyboardInterrupt as err:
        _record_error(err)
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as err:
        _record_error(err)
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
