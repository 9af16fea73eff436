"""Model references: from a `runs:/` or `models:/` URI to one logged model of the store.

A reference names a model, never a path. `resolve` looks it up in the tracking store (a run's
logged model, a registered version or alias, a logged model id) and answers where the store
keeps it; no part of the URI is ever joined to a path. `load_keras` loads the model from that
place: in place for a local store, through a temporary folder that is removed for a server.
Every reference that names nothing gets the same `UnknownModel`, whatever the reason, so an
answer says nothing about the files of the machine.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fashion_exp.schemas import IMAGE_SIDE
from fashion_exp.uris import MODEL_FORMS

MODEL_ARTIFACT = "model"  # the name fashion-exp-train logs its model under
MAX_URI = 512  # characters; longer references are refused without a look-up

# The forms accepted, each matched whole. Names follow MLflow's rules: no '/' in a registered
# model name, letters, digits, '_' and '-' in an alias.
_RUN = re.compile(r"runs:/(?P<run_id>[0-9a-f]{32})/(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]{0,255})")
_VERSION = re.compile(r"models:/(?P<name>[^/@\x00-\x1f]{1,256})/(?P<version>[1-9][0-9]{0,9})")
_ALIAS = re.compile(r"models:/(?P<name>[^/@\x00-\x1f]{1,256})@(?P<alias>[A-Za-z0-9_-]{1,255})")
_MODEL_ID = re.compile(r"models:/(?P<model_id>m-[0-9a-f]{32})")


class UnknownModel(LookupError):
    """A reference that names no logged model of this store (the same message for all)."""

    reason = f"is not a model of this tracking store: use {MODEL_FORMS}"

    def __init__(self, uri: object) -> None:
        shown = repr(uri) if len(str(uri)) <= 120 else repr(str(uri)[:117] + "...")
        super().__init__(f"model={shown} {self.reason}")


@dataclass(frozen=True)
class ModelRef:
    """A reference as asked, and the logged model it stands for."""

    uri: str  # as the user or the request spelled it
    run_id: str  # the run that logged the model
    model_id: str  # MLflow's logged model id: the same for every spelling of one model
    location: str  # where the store keeps the model's files (artifact URI)
    name: str | None = None  # registered model name, for models:/ references
    version: str | None = None  # registered version, for models:/ references


def resolve(client: Any, uri: str) -> ModelRef:
    """The logged model `uri` names in `client`'s store; UnknownModel if it names none.

    Errors of the store itself (unreachable, corrupt) are MlflowExceptions of other kinds and
    pass through."""
    from mlflow.entities import LoggedModelStatus

    if not isinstance(uri, str) or len(uri) > MAX_URI:
        raise UnknownModel(uri)
    name = version = None
    try:
        if match := _RUN.fullmatch(uri):
            run = client.get_run(match["run_id"])
            ids = [out.model_id for out in (run.outputs.model_outputs if run.outputs else [])]
            models = [m for m in map(client.get_logged_model, ids) if m.name == match["name"]]
            if not models:
                raise UnknownModel(uri)
            model = models[-1]  # logged twice under one name: the latest, as MLflow does
        elif match := _MODEL_ID.fullmatch(uri):
            model = client.get_logged_model(match["model_id"])
        elif (match := _VERSION.fullmatch(uri)) or (match := _ALIAS.fullmatch(uri)):
            if "alias" in match.groupdict():
                found = client.get_model_version_by_alias(match["name"], match["alias"])
            else:
                found = client.get_model_version(match["name"], match["version"])
            model = _version_model(client, found, uri)
            name, version = found.name, str(found.version)
        else:
            raise UnknownModel(uri)
    except Exception as err:
        if isinstance(err, UnknownModel) or _not_found(err):
            raise UnknownModel(uri) from None
        raise
    if model.status != LoggedModelStatus.READY or not model.source_run_id:
        raise UnknownModel(uri)
    try:  # a deleted run's models are gone too, whichever way they are named
        if client.get_run(model.source_run_id).info.lifecycle_stage != "active":
            raise UnknownModel(uri)
    except Exception as err:
        if isinstance(err, UnknownModel) or _not_found(err):
            raise UnknownModel(uri) from None
        raise
    return ModelRef(uri, model.source_run_id, model.model_id, model.artifact_location, name,
                    version)


def is_alias(uri: str) -> bool:
    """Whether `uri` names a registered model by alias (models:/<name>@<alias>)."""
    return bool(_ALIAS.fullmatch(uri))


def _version_model(client: Any, version: Any, uri: str) -> Any:
    """The logged model a registered version points at (MLflow 3 versions name it)."""
    model_id = getattr(version, "model_id", None)
    if not model_id and (match := _MODEL_ID.fullmatch(version.source or "")):
        model_id = match["model_id"]
    if not model_id or version.status != "READY":
        raise UnknownModel(uri)
    return client.get_logged_model(model_id)


def _not_found(err: Exception) -> bool:
    """Whether MLflow said the thing asked for does not exist (or could not be named)."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in (
        "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "BAD_REQUEST")


def load_keras(ref: ModelRef, tracking_uri: str | None = None) -> Any:
    """The Keras model of a resolved reference, loaded from where the store keeps it.

    A local store's model is read in place (MLflow copies nothing for file:// locations); a
    server's is downloaded from `tracking_uri` to a temporary folder that is removed once the
    model is in memory."""
    import mlflow.artifacts
    import mlflow.tensorflow

    if ref.location.startswith("file:"):
        return mlflow.tensorflow.load_model(ref.location)
    with tempfile.TemporaryDirectory(prefix="fashion-exp-model-") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref.location, dst_path=folder,
                                                    tracking_uri=tracking_uri)
        return mlflow.tensorflow.load_model(local)


@contextmanager
def _logging_to(tracking_uri: str, run_id: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `tracking_uri` while inside (then put back),
    and its active experiment set to the run's.

    MLflow 3.x logs a model (mlflow.<flavor>.log_model: the logged model, its files, its
    registration) only through the process-wide tracking URI, and creates the logged model in
    the active experiment, not the run's (experiment 0 if none is set); it has no
    client-level log_model. This is the one place that sets either."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri)
                              .get_run(run_id).info.experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(before)


# --- Logging a Keras model ---------------------------------------------------------------------

def signature() -> Any:
    """Raw uint8 images (N, 28, 28) in, class probabilities (N, 10) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIDE, IMAGE_SIDE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_keras(model: Any, tracking_uri: str, run_id: str, registered_name: str | None,
              step: int) -> str:
    """Log a Keras model to a run of the store at `tracking_uri` under MODEL_ARTIFACT (and
    register it); MLflow links to it the run's metrics at `step`. Returns the model's URI."""
    import keras
    import mlflow.tensorflow
    import tensorflow as tf

    # Explicit requirements: inferring them costs ~11 s per run in a subprocess.
    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}",
                    f"mlflow=={mlflow.__version__}"]
    with _logging_to(tracking_uri, run_id):
        info = mlflow.tensorflow.log_model(
            model, name=MODEL_ARTIFACT, signature=signature(), pip_requirements=requirements,
            registered_model_name=registered_name, step=step, run_id=run_id,
        )
    return info.model_uri


def log_saved_keras(path: str, tracking_uri: str, run_id: str, registered_name: str | None,
                    step: int) -> str:
    """log_keras for a model saved to a .keras file (kept while the server was away)."""
    import keras

    return log_keras(keras.models.load_model(path, compile=False), tracking_uri, run_id,
                     registered_name, step)


def fail_unfinished(client: Any, run_id: str) -> list[str]:
    """Mark FAILED the models a run began to log but never finished (the server died while
    their files were sent): MLflow would list them as pending for good. Returns their ids."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    stuck = [model.model_id for model in client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if model.status == LoggedModelStatus.PENDING]
    for model_id in stuck:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    return stuck
