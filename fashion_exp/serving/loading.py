"""Where the service's models come from: a request's model reference looked up in the tracking
store, the logged model loaded and checked before it serves, the models the page offers; and
the test images of the page's random samples.

`StoreModels` answers these for one store; `OneModel` for a service of a single model (the
serving image's model folder), which requests may name but not leave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from fashion_exp.serving.batching import output_problem
from fashion_exp.serving.models import (
    ModelUnusable,
    ServedModel,
    StoreUnavailable,
    graph_predictor,
    probe_images,
)
from fashion_exp.tracking import logged_models
from fashion_exp.tracking.logged_models import ModelRef, UnknownModel
from fashion_exp.tracking.store_checks import first_line
from fashion_exp.uris import is_server

log = logging.getLogger(__name__)

LISTED_RUNS = 20  # best runs offered by the page's model picker
LOCAL_UI = "http://127.0.0.1:5000"  # where `./dev.sh ui` (mlflow ui) shows a local store


@dataclass(frozen=True)
class StoreModels:
    """The models of one tracking store, as the service looks them up, loads and lists them."""

    client: Any  # an MlflowClient
    experiment_name: str  # whose best runs the page offers

    def resolve(self, uri: str) -> ModelRef:
        """A request's model URI as a reference of the store (see `resolve`)."""
        return resolve(self.client, uri)

    def load(self, ref: ModelRef) -> ServedModel:
        """The referenced model, loaded and checked (see `load_served_model`)."""
        return load_served_model(self.client, ref)

    def choices(self, default: ServedModel) -> list[dict[str, str]]:
        """The models the page offers (see `model_choices`)."""
        return model_choices(self.client, self.experiment_name, default)


@dataclass(frozen=True)
class OneModel:
    """A service of one model: requests may name it, and nothing else."""

    model: ServedModel

    def resolve(self, uri: str) -> ModelRef:
        """The model's reference when `uri` is its URI; UnknownModel otherwise."""
        if uri == self.model.ref.uri:
            return self.model.ref
        raise UnknownModel(uri)

    def load(self, _ref: ModelRef) -> ServedModel:
        """The one model, already loaded."""
        return self.model

    def choices(self, current: ServedModel) -> list[dict[str, str]]:
        """The page's only choice: the model served."""
        return [{"uri": current.ref.uri, "label": f"default: {current.run_name}"}]


# --- Looking a model up and loading it ---------------------------------------------------------

def resolve(client: Any, uri: str) -> ModelRef:
    """A request's model reference looked up in the store: UnknownModel if it names no
    model there, StoreUnavailable if the store does not answer."""
    try:
        return logged_models.resolve(client, uri)
    except UnknownModel:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the store raised, the request gets 503
        raise StoreUnavailable(f"{type(err).__name__}: {first_line(err)}") from None


def load_served_model(client: Any, ref: ModelRef) -> ServedModel:
    """Load a logged Keras model, compile its forward pass once and check that it answers;
    ModelUnusable if it cannot be served. Every load goes through here (start-up, a request's
    `model=`, a followed alias), so a model serves only once it has answered a probe batch
    with 10 finite class probabilities per image."""
    try:
        model = logged_models.load_keras(ref, client.tracking_uri)
    except Exception as err:  # noqa: BLE001 - any failure to load means the same to a client
        log.warning("cannot load %s (%s): %s: %s", ref.uri, ref.model_id, type(err).__name__,
                    first_line(err))
        raise ModelUnusable(ref.uri) from None

    predict = graph_predictor(model)

    probe = probe_images()
    try:
        answer = predict(probe)  # traced now, not on the first request
    except Exception as err:  # noqa: BLE001 - whatever fails on images cannot serve them
        log.warning("%s does not take (n, 28, 28) uint8 images: %s: %s", ref.uri,
                    type(err).__name__, first_line(err))
        raise ModelUnusable(ref.uri) from None
    if problem := output_problem(answer, len(probe), "probe images"):
        log.warning("refused %s (%s): %s", ref.uri, ref.model_id, problem)
        raise ModelUnusable(ref.uri, problem)
    run = client.get_run(ref.run_id)
    return ServedModel(ref, run.info.run_name or ref.run_id, model_metrics(client, ref), predict,
                       run_url=run_page(client.tracking_uri, run))


def run_page(tracking_uri: str, run: Any) -> str:
    """The run's page in the MLflow UI: on the tracking server, or in the local UI."""
    from fashion_exp.tracking.views import run_link

    base = tracking_uri.rstrip("/") if is_server(tracking_uri) else LOCAL_UI
    return f"{base}/{run_link(run.info.experiment_id, run.info.run_id)}"


def model_metrics(client: Any, ref: Any) -> dict[str, float]:
    """The logged model's own metrics (those of its run at the step it was logged), without
    the per-class ones: test_accuracy, test_loss, epoch/val_accuracy, best_val_accuracy..."""
    from fashion_exp.core.metrics import PER_CLASS_PREFIX

    logged = client.get_logged_model(ref.model_id)
    return {m.key: m.value for m in logged.metrics or []
            if not m.key.startswith(PER_CLASS_PREFIX)}


# --- What the page offers ----------------------------------------------------------------------

def choice_label(model: ServedModel) -> str:
    """How the page's model picker names a model: `name vN` when registered, else its run's
    name and test accuracy (the labels of the other choices)."""
    if model.ref.name:
        return f"{model.ref.name} v{model.ref.version}"
    accuracy = model.metrics.get("test_accuracy")
    return model.run_name + ("" if accuracy is None else f" (test {accuracy:.4f})")


def model_choices(client: Any, experiment_name: str, default: ServedModel,
                  ) -> list[dict[str, str]]:
    """What the page offers: the default, every registered version, the best logged runs."""
    choices = [{"uri": default.ref.uri, "label": f"default: {choice_label(default)}"}]
    for version in client.search_model_versions(max_results=100):
        choices.append({"uri": f"models:/{version.name}/{version.version}",
                        "label": f"{version.name} v{version.version}"})
    from fashion_exp.tracking import store

    for run in islice(store.runs_with_models(client, experiment_name), LISTED_RUNS):
        choices.append({"uri": f"runs:/{run.info.run_id}/{store.MODEL_ARTIFACT}",
                        "label": f"{run.info.run_name} "
                                 f"(test {run.data.metrics['test_accuracy']:.4f})"})
    seen: set[str] = set()  # a URI listed twice keeps its first label
    return [c for c in choices if not (c["uri"] in seen or seen.add(c["uri"]))]


def sample_images(data_dir: str | Path, verify_checksums: bool,
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Test images and labels for the page's random samples; None when the data is missing."""
    from fashion_exp.core import data

    try:
        folder = data.locate(data_dir, download=False)
        return (data.read_idx(folder / data.FILES["x_test"], verify_checksums),
                data.read_idx(folder / data.FILES["y_test"], verify_checksums))
    except data.DataError as err:
        log.warning("No random test images on the page: %s", str(err).splitlines()[0])
        return None
