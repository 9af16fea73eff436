"""The runner: config -> data -> model -> training -> evaluation -> one MLflow run.

    fashion-exp-train [overrides]          e.g. fashion-exp-train experiment=original trainer.seed=1
    python -m fashion_exp.train [overrides]

The config and the tracking store (fashion_exp/stores.py) are checked before TensorFlow or
MLflow are imported and before Hydra makes an output folder, so a bad value costs a second,
not a run.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fashion_exp import interrupts, metrics, sweeps
from fashion_exp.config import CONF_DIR, ConfigError, precheck, register_configs, validate
from fashion_exp.stores import StoreError, check_store

log = logging.getLogger("fashion_exp")


def run_name_and_tags(cfg: DictConfig) -> tuple[str, dict[str, str], Path | None]:
    """Run name (the command-line overrides that shape the model: not where it is logged,
    tracking.*), tags (all overrides), and Hydra's output folder."""
    if not HydraConfig.initialized():
        return "defaults", {}, None
    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    tags = {"overrides": " ".join(task), "hydra_output_dir": str(output_dir)}
    shaping = [o for o in task if not o.lstrip("+~").startswith("tracking.")]
    return " ".join(shaping) or "defaults", tags, output_dir


def train(cfg: DictConfig) -> float:
    """Train and evaluate one model as `cfg` says, logged as one MLflow run; returns
    cfg.optimized_metric. With trainer.resume, continue a stopped run with its own config."""
    interrupts.check()  # a sweep stopped during the previous job starts no new one
    from fashion_exp import checkpoints, tracking  # MLflow, not TensorFlow yet

    # --- Resume or start; the tracking server must answer before anything is trained ------
    resumed: dict | None = None
    ckpt: Path | None = None  # this run's checkpoint folder
    if cfg.trainer.resume:
        ckpt_root = checkpoints.root(cfg.trainer.checkpoint_dir,
                                     tracking.resolve_uri(cfg.tracking.uri))
        ckpt = checkpoints.find(ckpt_root, cfg.trainer.resume, tracking.resumable)
        cfg, resumed = checkpoints.saved_config(ckpt), checkpoints.load_state(ckpt)
        log.info("Resuming run %s after epoch %d of %d <trainer.resume>", resumed["run_id"],
                 resumed["epochs_done"], cfg.trainer.epochs)
    uri = tracking.connect(cfg.tracking)

    # --- Data (NumPy only: bad files are reported before TensorFlow starts) -----------------
    from fashion_exp import data

    seed = cfg.trainer.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed
    splits = data.load(cfg.data.dir, cfg.data.val_split, seed, cfg.data.limit,
                       cfg.data.verify_checksums, cfg.data.download)
    log.info("Data <data>: %d train, %d validation, %d test images from %s",
             len(splits.x_train), len(splits.x_val), len(splits.x_test), splits.source)

    # --- Set up TensorFlow: CPU kernels, seeds, threads -----------------------------------
    from fashion_exp import runtime

    runtime.use_onednn(cfg.trainer.onednn)  # read by TensorFlow when it loads, just below
    from fashion_exp import models, optim, plots, training

    threads = sweeps.job_threads(cfg.trainer.threads)  # shares the cores among parallel jobs
    training.configure_runtime(cfg.trainer, threads)

    uri, exp_id = tracking.setup(uri, cfg.tracking.experiment_name,
                                 cfg.tracking.connect_timeout)
    run_name, tags, output_dir = run_name_and_tags(cfg)
    tags |= {"git_commit": tracking.git_commit(), "data_source": str(splits.source),
             "tf_threads": str(threads or "auto"), "tf_onednn": runtime.onednn_state()}
    child_name, child_tags = sweeps.child_name_and_tags(cfg)  # set in a multirun only
    run_name, tags = child_name or run_name, tags | child_tags
    if resumed:
        tags["resumed_from_epoch"] = str(resumed["epochs_done"])

    run_id = resumed["run_id"] if resumed else None
    try:
        with tracking.tracked_run(run_name, tags, cfg.tracking, run_id) as run:
            run_id = run.info.run_id
            if cfg.trainer.checkpoint and not resumed:
                ckpt = checkpoints.root(cfg.trainer.checkpoint_dir, uri) / run_id
            if not resumed:  # a resumed run has its params already: MLflow keeps them once
                tracking.log_config(cfg, output_dir)
                if ckpt:
                    checkpoints.start(ckpt, cfg, uri, run_id)

            # --- Model and optimizer ---------------------------------------------------------
            log.info("Building model <model.name=%s>, optimizer <optimizer.name=%s lr=%g>",
                     cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr)
            steps_per_epoch = math.ceil(len(splits.x_train) / cfg.trainer.batch_size)
            with training.distribution(cfg.trainer).scope():
                model = models.build_model(cfg.model, cfg.augment)
                optimizer = optim.build_optimizer(cfg.optimizer, cfg.schedule, steps_per_epoch,
                                                  cfg.trainer.epochs)
                training.compile_model(model, optimizer, cfg.trainer, cfg.model,
                                       augmented=models.augments(cfg.augment))
                if resumed and resumed["epochs_done"]:  # none if stopped in its first epoch
                    checkpoints.restore(ckpt, model)
            if not resumed:
                tracking.log_model_info(model)

            # --- Train ------------------------------------------------------------------------
            log.info("Training <trainer.epochs=%d trainer.batch_size=%d schedule.name=%s "
                     "augment: shift=%g flip=%s erasing=%g>", cfg.trainer.epochs,
                     cfg.trainer.batch_size, cfg.schedule.name, cfg.augment.shift,
                     cfg.augment.flip, cfg.augment.erasing)
            before = resumed["history"] if resumed else {}
            extra = [optim.plateau_callback(cfg.schedule, cfg.optimizer.lr),
                     training.CheckpointSaver(ckpt, before) if ckpt else None]
            history = training.fit(model, splits, cfg.trainer, [c for c in extra if c], before)

            # --- Evaluate ---------------------------------------------------------------------
            log.info("Evaluating on %d test images", len(splits.x_test))
            result = training.evaluate(model, splits)
            test = {"test_loss": result.loss, "test_accuracy": result.accuracy}
            tracking.log_evaluation(result, epochs_trained=len(history["loss"]))

            # The value a sweep optimizes, beside the test metrics at the last epoch's step.
            value = training.best_value(history, test, cfg.optimized_metric)
            last_epoch = len(history["loss"])
            objective = metrics.objective_metric(cfg.optimized_metric)
            if objective != cfg.optimized_metric:  # a test metric is logged already
                tracking.log_metrics({objective: value}, last_epoch)

            # --- Figures and model ------------------------------------------------------------
            if cfg.tracking.figures:
                log.info("Logging figures <tracking.figures=true>")
                tracking.log_figures({
                    "curves.png": plots.curves(history),
                    "confusion_matrix.png": plots.confusion(result.confusion),
                    "predictions.png": plots.predictions(splits.x_test, splits.y_test,
                                                         result.probs),
                    "dataset_sample.png": plots.dataset_sample(splits.x_train, splits.y_train),
                })
            if cfg.tracking.log_model:
                log.info("Logging the model <tracking.log_model=true>")
                tracking.log_model(model, cfg.tracking.registered_model_name, last_epoch)
    except BaseException:
        if ckpt is not None and (ckpt / checkpoints.WEIGHTS_FILE).is_file():
            done = checkpoints.load_state(ckpt)["epochs_done"]
            print(f"fashion-exp-train: run {run_id} stopped; its checkpoint after epoch {done} "
                  f"is kept: resume with  fashion-exp-train trainer.resume={run_id}",
                  file=sys.stderr, flush=True)
        raise
    if ckpt is not None:
        checkpoints.remove(ckpt)  # finished: the model is logged

    print(f"test_accuracy={result.accuracy:.4f}  {objective}={value:.4f}  "
          f"run_id={run_id}  view: {tracking.ui_hint(uri, exp_id, run_id)}", flush=True)
    return value


register_configs()


def _exit_invalid(err: ConfigError) -> None:
    """The one-line error for a bad config, exit status 2."""
    print(f"fashion-exp-train: invalid config: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as err:
        if sweeps.job_sweep_dir() is not None:
            raise  # one failed job of a sweep; the others go on
        _exit_invalid(err)
    try:
        return train(cfg)
    except Exception as err:
        if sweeps.job_sweep_dir() is not None or not _user_error(err):
            raise
        print(f"fashion-exp-train: error: {err}", file=sys.stderr)
        sys.exit(1)


def _user_error(err: Exception) -> bool:
    """Errors the user can fix (data, tracking store or server, resume): one line, no
    traceback."""
    from fashion_exp.checkpoints import ResumeError
    from fashion_exp.data import DataError
    from fashion_exp.tracking import TrackingUnavailable

    return isinstance(err, DataError | TrackingUnavailable | ResumeError | StoreError)


def _check_stores(configs: list[DictConfig]) -> None:
    """The tracking store of every checked config must take runs, before Hydra makes an
    output folder and before TensorFlow or MLflow loads: one line and exit status 1 if not
    (like missing data or an unreachable server)."""
    checked = set()
    for cfg in configs:
        uri, timeout = cfg.tracking.uri, cfg.tracking.connect_timeout
        if (uri, timeout) in checked:
            continue
        checked.add((uri, timeout))
        try:
            check_store(uri, write=True, create=True, connect_timeout=timeout)
        except StoreError as err:
            print(f"fashion-exp-train: error: {err}", file=sys.stderr)
            sys.exit(1)


def main() -> None:
    """Console-script entry point: check a single run's overrides, then hand over to Hydra."""
    args = sys.argv[1:]
    flags = {a for a in args if a.startswith("-")}
    # Hydra's other flags (--cfg, --help, ...) run no job: those go to Hydra unchecked.
    if flags <= {"-m", "--multirun"}:
        try:
            configs = precheck([a for a in args if a not in flags], multirun=bool(flags))
        except ConfigError as err:
            _exit_invalid(err)
        _check_stores(configs)
    # SIGTERM stops like Ctrl-C, also between the jobs of a sweep, so every run gets an end.
    interrupts.install()
    try:
        _hydra_main()
    except KeyboardInterrupt as err:
        sweeps.finish_open_sweeps(interrupted=True)
        print(f"fashion-exp-train: stopped ({err or 'interrupted'})", file=sys.stderr)
        sys.exit(130)
    finally:
        # A multirun whose job raised never reaches Hydra's on_multirun_end: end its parent.
        sweeps.finish_open_sweeps()


if __name__ == "__main__":
    main()
