"""Evaluate a logged or registered model on the test set, logged as an MLflow run.

    fashion-exp-evaluate model_uri=runs:/<run_id>/model
    fashion-exp-evaluate model_uri=models:/<name>/<version>  tracking.experiment_name=fashion_exp

The evaluation run is tagged with the model URI and the run that produced the model
(`source_run_id`), and records test metrics, accuracy per class, the confusion matrix, a
gallery of misclassified images and the pairs of classes most often confused.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from fashion_exp import interrupts
from fashion_exp.config import CONF_DIR, ConfigError, register_configs

log = logging.getLogger("fashion_exp")


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for a missing or malformed model_uri or bad numbers."""
    if OmegaConf.is_missing(cfg, "model_uri"):
        raise ConfigError("model_uri", "???", "required: runs:/<run_id>/model or "
                                               "models:/<name>/<version>")
    if not str(cfg.model_uri).startswith(("runs:/", "models:/")):
        raise ConfigError("model_uri", cfg.model_uri, "use runs:/<run_id>/model or "
                                                      "models:/<name>/<version|@alias>")
    for key in ("batch_size", "gallery_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(key, cfg[key], "must be >= 1")


def evaluate(cfg: DictConfig) -> float:
    """Load the model, score the test set, log the evaluation run; returns test accuracy."""
    import mlflow

    from fashion_exp import tracking

    # Resolve the model before TensorFlow loads and before anything is written: a bad URI or
    # a missing store leaves the store as it was.
    uri = tracking.resolve_uri(cfg.tracking.uri)
    db = tracking.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError("tracking.uri", uri, "no tracking store there; pass the store that "
                                               "holds the model")
    client = mlflow.MlflowClient(uri)
    try:
        source = tracking.resolve_model(client, cfg.model_uri).run_id
    except (mlflow.exceptions.MlflowException, ValueError) as err:
        raise ConfigError("model_uri", cfg.model_uri,
                          f"{str(err).splitlines()[0]} (tracking store {uri})") from None

    import mlflow.tensorflow

    from fashion_exp import data, plots, training

    splits = data.load(cfg.data.dir, cfg.data.val_split, 0, cfg.data.limit,
                       cfg.data.verify_checksums, cfg.data.download)
    mlflow.set_tracking_uri(uri)  # where runs:/ and models:/ URIs are looked up
    try:
        model = mlflow.tensorflow.load_model(cfg.model_uri)  # the Keras model itself
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as err:
        raise ConfigError("model_uri", cfg.model_uri,
                          f"{str(err).splitlines()[0]} (tracking store {uri})") from None
    uri, exp_id = tracking.setup(uri, cfg.tracking.experiment_name)

    tags = {"model_uri": cfg.model_uri, "source_run_id": source, "evaluation": "true"}
    with tracking.tracked_run(f"evaluate {cfg.model_uri}", tags) as run:
        probs = model.predict(splits.x_test, batch_size=cfg.batch_size, verbose=0)
        result = training.score(probs, splits.y_test)
        tracking.log_evaluation(result, epochs_trained=0)
        pairs = training.most_confused(result.confusion)
        lines = [f"{true} predicted as {pred}: {count}" for true, pred, count in pairs]
        mlflow.log_text("\n".join(lines) + "\n", "confused_pairs.txt")
        tracking.log_figures({
            "confusion_matrix.png": plots.confusion(result.confusion),
            "misclassified.png": plots.predictions(splits.x_test, splits.y_test, result.probs,
                                                   n=0, n_wrong=cfg.gallery_size),
        })
    print(f"test_accuracy={result.accuracy:.4f}  test_loss={result.loss:.4f}  most confused: "
          f"{'; '.join(lines[:3])}  run_id={run.info.run_id}  source_run_id={source}  view: "
          f"{tracking.ui_hint(uri, exp_id, run.info.run_id)}", flush=True)
    return result.accuracy


register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        check(cfg)
        return evaluate(cfg)
    except ConfigError as err:
        print(f"fashion-exp-evaluate: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    interrupts.install()
    _hydra_main()


if __name__ == "__main__":
    main()
