"""Evaluate a logged or registered model on the test set, logged as an MLflow run.

    fashion-exp-evaluate model_uri=runs:/<run_id>/model
    fashion-exp-evaluate model_uri=models:/<name>/<version>  tracking.experiment_name=fashion_exp
    fashion-exp-evaluate -m model_uri=runs:/<run_id>/model,models:/<name>/<version>

With -m, one evaluation run per listed value (Hydra's basic sweeper, one after the other);
every listed value is checked, models included, before the first one starts.

The evaluation run is tagged with the model URI and the run that produced the model
(`source_run_id`), and records test metrics, accuracy per class, the confusion matrix, a
gallery of misclassified images and the pairs of classes most often confused.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from fashion_exp import interrupts
from fashion_exp.config import (
    CONF_DIR,
    ConfigError,
    command_line,
    compose_checked,
    hydra_argv,
    register_configs,
    register_resolvers,
    sweep_variants,
)
from fashion_exp.tracking.store_checks import StoreError, check_store

if TYPE_CHECKING:
    from fashion_exp.tracking.logged_models import ModelRef

log = logging.getLogger("fashion_exp")


def evaluate(cfg: DictConfig) -> float:
    """Load the model, score the test set, log the evaluation run; returns test accuracy."""
    import mlflow

    from fashion_exp.tracking import logged_models, store

    # Resolve the model before TensorFlow loads and before anything is written: a bad URI or
    # an unusable store (missing, corrupt, unreachable, read-only) leaves the store as it was.
    uri = check_store(cfg.tracking.uri, write=True, connect_timeout=cfg.tracking.connect_timeout)
    ref = model_ref(uri, cfg.model_uri)

    from fashion_exp.core import runtime

    runtime.load_tensorflow()  # its start-up lines in the log, not the terminal
    from fashion_exp.core import data, plots, training

    splits = data.load(cfg.data.dir, cfg.data.val_split, 0, cfg.data.limit,
                       cfg.data.verify_checksums, cfg.data.download)
    try:
        model = logged_models.load_keras(ref, uri)  # the Keras model itself, read in place
    except (mlflow.exceptions.MlflowException, OSError, ValueError) as err:
        raise ConfigError("model_uri", cfg.model_uri,
                          f"{str(err).splitlines()[0]} (tracking store {uri})") from None
    exp_id = store.setup(uri, cfg.tracking.experiment_name, checked=True)

    source = ref.run_id
    tags = {"model_uri": cfg.model_uri, "source_run_id": source, "evaluation": "true"}
    with store.tracked_run(uri, exp_id, f"evaluate {cfg.model_uri}", tags) as run:
        probs = model.predict(splits.x_test, batch_size=cfg.batch_size, verbose=0)
        result = training.score(probs, splits.y_test)
        run.log_evaluation(result, epochs_trained=0)
        # How many images the accuracy is of: a data.limit run scores a part of the test set.
        run.log_params({"test_images": len(splits.y_test)})
        pairs = training.most_confused(result.confusion)
        lines = [f"{true} predicted as {pred}: {count}" for true, pred, count in pairs]
        run.log_text("\n".join(lines) + "\n", "confused_pairs.txt")
        run.log_figures({
            "confusion_matrix.png": plots.confusion(result.confusion),
            "misclassified.png": plots.predictions(splits.x_test, splits.y_test, result.probs,
                                                   n=0, n_wrong=cfg.gallery_size),
        })
    print(f"test_accuracy={result.accuracy:.4f}  test_loss={result.loss:.4f}  on "
          f"{len(splits.y_test):,} test images  most confused: "
          f"{'; '.join(lines[:3])}  run_id={run.run_id}  source_run_id={source}  view: "
          f"{store.ui_hint(uri, exp_id, run.run_id)}", flush=True)
    return result.accuracy


# The job processes of a multirun on hydra/launcher=parallel run _hydra_main by importing this
# module, and Hydra resolves their config (${pid:}) before any of our code runs there.
register_resolvers()


def _exit(err: ConfigError | StoreError) -> None:
    """The one-line error for a bad config value or an unusable store, exit status 2."""
    kind = "error: " if isinstance(err, StoreError) else ""
    print(f"fashion-exp-evaluate: {kind}{err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        OmegaConf.to_object(cfg)  # the schema's checks, when Hydra's flags skipped precheck
        return evaluate(cfg)
    except (ConfigError, StoreError) as err:
        _exit(err)


def precheck(overrides: list[str], multirun: bool = False) -> list[DictConfig]:
    """The configs of these command-line overrides (each checked variant of a multirun:
    config.sweep_variants), their values (the schema's checks), their tracking stores and the
    models they name, checked (ConfigError, StoreError) before Hydra makes an output folder or
    TensorFlow loads."""
    if multirun:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for override in OverridesParser.create().parse_overrides(overrides):
            if override.is_sweep_override() and not override.is_discrete_sweep():
                raise ConfigError("overrides", override.input_line,
                                  "an evaluation sweep lists its values (key=a,b, "
                                  "range(1,4), choice(a,b)); it draws none from an interval")
    configs = [compose_checked("evaluate", variant)  # every value first, then the stores
               for variant in (sweep_variants(overrides) if multirun else [overrides])]
    checked = set()
    for cfg in configs:
        key = (cfg.tracking.uri, cfg.tracking.connect_timeout, cfg.model_uri)
        if key not in checked:
            checked.add(key)
            uri = check_store(cfg.tracking.uri, write=True,
                              connect_timeout=cfg.tracking.connect_timeout)
            model_ref(uri, cfg.model_uri)  # MLflow, not TensorFlow yet
    return configs


def model_ref(uri: str, model_uri: str) -> ModelRef:
    """The logged model `model_uri` names in the store at `uri`; ConfigError if none."""
    import mlflow

    from fashion_exp.tracking import logged_models

    try:
        return logged_models.resolve(mlflow.MlflowClient(uri), model_uri)
    except logged_models.UnknownModel as err:
        raise ConfigError("model_uri", model_uri,
                          f"{err.reason} (tracking store {uri})") from None


def main() -> None:
    """Console-script entry point: check the overrides of an evaluation or of a multirun of
    evaluations (-m), then hand over to Hydra."""
    register_configs()
    try:
        line = command_line(sys.argv[1:])  # None: --cfg, --help... show things, run no job
        if line is not None:
            precheck(*line)
            sys.argv[1:] = hydra_argv(*line)  # `a=1 -m b=1,2` as Hydra reads it
    except (ConfigError, StoreError) as err:
        _exit(err)
    interrupts.install()
    _hydra_main()


if __name__ == "__main__":
    main()
