"""fashion-exp-serve: serve a logged model over HTTP, with a web page to try your own photo.

    fashion-exp-serve                                  the experiment's best run (test accuracy)
    fashion-exp-serve model_uri=runs:/<run_id>/model port=8080
    fashion-exp-serve model_uri=models:/<name>@<alias> tracking.uri=sqlite:////path/mlflow.db

Options are the keys of conf/serve.yaml, given as key=value. Open http://127.0.0.1:8000/ for
the page, /docs for the API. The model is loaded and checked before the port is opened: a
URI that names nothing fails here, in one line, with exit status 2.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from fashion_exp.config import CONF_DIR, ConfigError, compose_checked
from fashion_exp.config import ServiceSettings as Settings

if TYPE_CHECKING:
    from fashion_exp.service import ServedModel

log = logging.getLogger("fashion_exp")
LISTED_RUNS = 20  # best runs offered by the page's model picker


def load_served_model(client: Any, uri: str) -> ServedModel:
    """Load a logged Keras model and compile its forward pass once; ModelNotFound if it cannot."""
    import mlflow.tensorflow
    import numpy as np
    import tensorflow as tf
    from mlflow.exceptions import MlflowException

    from fashion_exp import tracking
    from fashion_exp.service import ModelNotFound, ServedModel

    try:
        ref = tracking.resolve_model(client, uri)
        model = mlflow.tensorflow.load_model(uri)
    except (MlflowException, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFound(f"model_uri={uri!r}: {first}") from None

    # One traced graph for every batch size: no retracing as batches grow and shrink.
    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8)])
    def forward(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)

    def predict(images: np.ndarray) -> np.ndarray:
        return forward(images).numpy()

    try:
        predict(np.zeros((1, 28, 28), np.uint8))  # trace now, not on the first request
    except (ValueError, TypeError, tf.errors.OpError) as err:
        raise ModelNotFound(f"model_uri={uri!r} does not take (n, 28, 28) uint8 images: "
                            f"{str(err).splitlines()[0]}") from None
    run = client.get_run(ref.run_id)
    metrics = {k: v for k, v in run.data.metrics.items()
               if k.startswith(("test_", "val_")) or k in ("accuracy", "loss")}
    return ServedModel(ref, run.info.run_name or ref.run_id, metrics, predict)


def model_choices(client: Any, experiment_name: str, default_uri: str) -> list[dict[str, str]]:
    """What the page offers: the default, every registered version, the best logged runs."""
    choices = [{"uri": default_uri, "label": f"default: {default_uri}"}]
    for version in client.search_model_versions(max_results=100):
        choices.append({"uri": f"models:/{version.name}/{version.version}",
                        "label": f"{version.name} v{version.version}"})
    from itertools import islice

    from fashion_exp import tracking

    for run in islice(tracking.runs_with_models(client, experiment_name), LISTED_RUNS):
        choices.append({"uri": f"runs:/{run.info.run_id}/{tracking.MODEL_ARTIFACT}",
                        "label": f"{run.info.run_name} "
                                 f"(test {run.data.metrics['test_accuracy']:.4f})"})
    seen: set[str] = set()  # a URI listed twice keeps its first label
    return [c for c in choices if not (c["uri"] in seen or seen.add(c["uri"]))]


def check_port_free(host: str, port: int) -> None:
    """ConfigError now, rather than a server that dies after loading the model."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError("port", port, f"cannot listen on {host}:{port} ({err.strerror}); "
                                            "choose another port=") from None


def test_images(cfg: DictConfig) -> tuple[Any, Any] | None:
    """Test images and labels for the page's random samples; None when the data is missing."""
    from fashion_exp import data

    if not cfg.samples:
        return None
    try:
        folder = data.locate(cfg.data.dir, download=False)
        return (data.read_idx(folder / data.FILES["x_test"], cfg.data.verify_checksums),
                data.read_idx(folder / data.FILES["y_test"], cfg.data.verify_checksums))
    except data.DataError as err:
        log.warning("No random test images on the page: %s", str(err).splitlines()[0])
        return None


def build(cfg: DictConfig) -> tuple[Any, str]:
    """The app for this config and the URI of its default model; ConfigError if none loads."""
    import mlflow

    from fashion_exp import tracking

    uri = tracking.resolve_uri(cfg.tracking.uri)
    store = tracking.sqlite_path(uri)
    if store is not None and not store.is_file():  # checked before TensorFlow is imported
        raise ConfigError("tracking.uri", uri, "no tracking store there: train a model first "
                                               "or point tracking.uri at your store")
    import tensorflow as tf

    from fashion_exp import service
    from fashion_exp.service import ModelNotFound

    if cfg.threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    default_uri = cfg.model_uri or tracking.best_model_uri(client, cfg.tracking.experiment_name)
    if default_uri is None:
        raise ConfigError("model_uri", None, "no finished run with a logged model in experiment "
                          f"{cfg.tracking.experiment_name!r} of {uri}: train one first or pass "
                          "model_uri=runs:/<run_id>/model")
    try:
        default = load_served_model(client, default_uri)
    except ModelNotFound as err:
        raise ConfigError("model_uri", default_uri, f"cannot load it from {uri}: "
                          f"{str(err).split(': ', 1)[-1]}") from None
    settings = Settings(**{k: cfg[k] for k in Settings.__dataclass_fields__})
    app = service.create_app(
        default, lambda u: load_served_model(client, u), settings,
        choices=lambda: model_choices(client, cfg.tracking.experiment_name, default_uri),
        samples=test_images(cfg))
    return app, default_uri


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(f"{__doc__}\nConfig: {CONF_DIR / 'serve.yaml'}")
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        cfg = compose_checked("serve", args)
        check_port_free(cfg.host, cfg.port)
        logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(message)s")
        app, default_uri = build(cfg)
    except ConfigError as err:
        print(f"fashion-exp-serve: {err}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    print(f"Serving {default_uri} on http://{cfg.host}:{cfg.port}/ (page), "
          f"http://{cfg.host}:{cfg.port}/docs (API)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False)


if __name__ == "__main__":
    main()
