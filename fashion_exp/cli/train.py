"""The runner: config -> data -> model -> training -> evaluation -> one MLflow run.

    fashion-exp-train [overrides]          e.g. fashion-exp-train experiment=original trainer.seed=1
    python -m fashion_exp.cli.train [overrides]

The config and the tracking store (fashion_exp/tracking/store_checks.py) are checked before
TensorFlow or MLflow are imported and before Hydra makes an output folder, so a bad value costs
a second, not a run.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fashion_exp import interrupts
from fashion_exp.config import (
    CONF_DIR,
    ConfigError,
    command_line,
    hydra_argv,
    precheck,
    register_configs,
    register_resolvers,
    validate,
)
from fashion_exp.core import metrics
from fashion_exp.sweeps import multirun
from fashion_exp.sweeps.study_storage import register_resolver
from fashion_exp.tracking.store_checks import StoreError, check_store, request_settings

if TYPE_CHECKING:  # loaded when a run needs them: a bad config costs a second, not a minute
    import keras
    from matplotlib.figure import Figure

    from fashion_exp.core.data import Splits
    from fashion_exp.core.training import Evaluation
    from fashion_exp.sweeps.pruning import JobTrial
    from fashion_exp.tracking.recorder import Recorder

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
    """Train and evaluate one model as `cfg` says, logged as one MLflow run; returns the value
    of cfg.optimized_metric. With trainer.resume, continue a stopped run with its own config."""
    interrupts.check()  # a sweep stopped during the previous job starts no new one
    from fashion_exp.tracking import store  # MLflow, not TensorFlow yet

    cfg, saved = resume_point(cfg)
    os.environ.update(request_settings(cfg.tracking))  # this job's, in a worker too
    uri = store.connect(cfg.tracking)  # the store answers before anything is trained
    splits = load_data(cfg)
    threads = start_tensorflow(cfg.trainer)
    from fashion_exp.core import models, optim, plots, training

    exp_id = store.setup(uri, cfg.tracking.experiment_name, cfg.tracking.connect_timeout,
                         checked=True, wait_seconds=cfg.tracking.reconnect_seconds)
    run_name, tags, output_dir = describe_run(cfg, splits, threads, saved)
    ckpt = saved or RunCheckpoints(cfg, uri)
    with ckpt.kept_if_stopped(), store.tracked_run(uri, exp_id, run_name, tags, cfg.tracking,
                                                      ckpt.run_id) as run:
        if not ckpt.resumed:  # a resumed run has its params already: MLflow keeps them once
            run.log_config(cfg, output_dir)
            ckpt.begin(run.run_id)

        log.info("Building model <model.name=%s>, optimizer <optimizer.name=%s lr=%.4g>",
                 cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr)
        steps_per_epoch = math.ceil(len(splits.x_train) / cfg.trainer.batch_size)
        with training.distribution(cfg.trainer).scope():
            model = models.build_model(cfg.model, cfg.augment, cfg.trainer.fused_batch_norm)
            optimizer = optim.build_optimizer(cfg.optimizer, cfg.schedule, steps_per_epoch,
                                              cfg.trainer.epochs)
            training.compile_model(model, optimizer, cfg.trainer, cfg.model,
                                   augmented=models.augments(cfg.augment))
            ckpt.restore(model)
        if not ckpt.resumed:
            logged = models.inference_model(model, cfg.augment)
            run.log_model_info(logged, models.network(logged))  # as it will be logged

        log.info("Training <trainer.epochs=%d trainer.batch_size=%d schedule.name=%s "
                 "augment: shift=%g flip=%s erasing=%g test_flip=%s>", cfg.trainer.epochs,
                 cfg.trainer.batch_size, cfg.schedule.name, cfg.augment.shift,
                 cfg.augment.flip, cfg.augment.erasing, cfg.augment.test_flip)
        trial = search_trial(cfg)  # a trial of a search reports every epoch
        extra = [optim.plateau_callback(cfg.schedule, cfg.optimizer.lr), ckpt.saver(),
                 trial and trial.callback()]
        history = training.fit(model, splits, cfg.trainer, run.log_epoch,
                               [c for c in extra if c], ckpt.history)
        if trial is not None:
            run.set_tags(trial.tags)  # its trial, and whether and where it was pruned
            if trial.pruned_at is not None:
                return end_pruned(run, cfg, history, trial, ckpt)

        model = models.inference_model(model, cfg.augment)  # evaluated, saved and served
        log.info("Evaluating on %d test images", len(splits.x_test))
        result = training.evaluate(model, splits)
        last_epoch = len(history["loss"])
        run.log_evaluation(result, epochs_trained=last_epoch)
        objective, value = log_objective(run, cfg, history, result, last_epoch)

        if cfg.tracking.figures:
            log.info("Logging figures <tracking.figures=true>")
            run.log_figures(figures(plots, history, result, splits))
        if cfg.tracking.log_model:
            log.info("Logging the model <tracking.log_model=true>")
            run.log_model(model, cfg.tracking.registered_model_name, last_epoch)
    ckpt.finish()  # the model is logged: its checkpoints are no longer needed

    print(f"test_accuracy={result.accuracy:.4f}  {objective}={value:.4f}  "
          f"run_id={run.run_id}  view: {store.ui_hint(uri, exp_id, run.run_id)}",
          flush=True)
    return value


# --- The runner's steps, in the order train() takes them --------------------------------------

class RunCheckpoints:
    """This run's checkpoint folder (trainer.checkpoint), or a stopped run's (trainer.resume):
    created when the run starts, saved after each epoch, kept if the run stops, removed when
    it finishes."""

    def __init__(self, cfg: DictConfig, uri: str, folder: Path | None = None,
                 state: dict | None = None) -> None:
        self.cfg, self.uri, self.folder = cfg, uri, folder
        self.state = state or {}
        self.resumed = state is not None
        self.run_id: str | None = self.state.get("run_id")
        self.history: dict[str, list[float]] = self.state.get("history", {})

    def begin(self, run_id: str) -> None:
        """A new run: its folder, with its config, when trainer.checkpoint is on."""
        from fashion_exp.core import checkpoints

        self.run_id = run_id
        if self.cfg.trainer.checkpoint:
            self.folder = checkpoints.root(self.cfg.trainer.checkpoint_dir, self.uri) / run_id
            checkpoints.start(self.folder, self.cfg, self.uri, run_id)

    def restore(self, model: keras.Model) -> None:
        """A resumed run's weights and optimizer state (none if stopped in its first epoch)."""
        from fashion_exp.core import checkpoints

        if self.resumed and self.state["epochs_done"]:
            checkpoints.restore(self.folder, model)

    def saver(self) -> keras.callbacks.Callback | None:
        """The Keras callback that saves every epoch, or None without checkpoints."""
        from fashion_exp.core import training

        return training.CheckpointSaver(self.folder, self.history) if self.folder else None

    @contextmanager
    def kept_if_stopped(self) -> Iterator[None]:
        """On any stop or error, say how to resume when an epoch's checkpoint is there."""
        from fashion_exp.core import checkpoints

        try:
            yield
        except BaseException:
            if self.folder is not None and (self.folder / checkpoints.WEIGHTS_FILE).is_file():
                done = checkpoints.load_state(self.folder)["epochs_done"]
                print(f"fashion-exp-train: run {self.run_id} stopped; its checkpoint after "
                      f"epoch {done} is kept: resume with  fashion-exp-train "
                      f"trainer.resume={self.run_id}", file=sys.stderr, flush=True)
            raise

    def finish(self) -> None:
        """The run finished: remove its checkpoints."""
        from fashion_exp.core import checkpoints

        if self.folder is not None:
            checkpoints.remove(self.folder)


def resume_point(cfg: DictConfig) -> tuple[DictConfig, RunCheckpoints | None]:
    """With trainer.resume: the stopped run's own config and its checkpoints; else (cfg, None).
    ResumeError when there is nothing to resume."""
    if not cfg.trainer.resume:
        return cfg, None
    from fashion_exp.core import checkpoints
    from fashion_exp.tracking import store
    from fashion_exp.tracking.store_checks import resolve_uri

    uri = resolve_uri(cfg.tracking.uri)
    folder = checkpoints.find(checkpoints.root(cfg.trainer.checkpoint_dir, uri),
                              cfg.trainer.resume, store.resumable)
    saved, state = checkpoints.saved_config(folder), checkpoints.load_state(folder)
    log.info("Resuming run %s after epoch %d of %d <trainer.resume>", state["run_id"],
             state["epochs_done"], saved.trainer.epochs)
    return saved, RunCheckpoints(saved, uri, folder, state)


def load_data(cfg: DictConfig) -> Splits:
    """The train/validation/test splits (NumPy only: bad files are reported before
    TensorFlow starts)."""
    from fashion_exp.core import data

    seed = cfg.trainer.seed if cfg.data.shuffle_seed is None else cfg.data.shuffle_seed
    splits = data.load(cfg.data.dir, cfg.data.val_split, seed, cfg.data.limit,
                       cfg.data.verify_checksums, cfg.data.download)
    log.info("Data <data>: %d train, %d validation, %d test images from %s",
             len(splits.x_train), len(splits.x_val), len(splits.x_test), splits.source)
    return splits


def start_tensorflow(trainer: DictConfig) -> int:
    """Load TensorFlow with the chosen CPU kernels, seeds and threads; returns the threads
    (shared out among a sweep's parallel jobs; 0: TensorFlow decides)."""
    from fashion_exp.core import runtime

    runtime.use_onednn(trainer.onednn)  # read by TensorFlow when it loads, just below
    runtime.load_tensorflow()
    from fashion_exp.core import training

    threads = multirun.job_threads(trainer.threads)
    training.configure_runtime(trainer, threads)
    return threads


def describe_run(cfg: DictConfig, splits: Splits, threads: int, saved: RunCheckpoints | None,
                 ) -> tuple[str, dict[str, str], Path | None]:
    """The run's name, its tags (where it came from, how TensorFlow ran, its sweep) and
    Hydra's output folder."""
    from fashion_exp.core import runtime
    from fashion_exp.paths import git_commit
    from fashion_exp.sweeps import slurm

    run_name, tags, output_dir = run_name_and_tags(cfg)
    tags |= {"git_commit": git_commit(), "data_source": str(splits.source),
             "tf_threads": str(threads or "auto"), "tf_onednn": runtime.onednn_state()}
    tags |= slurm.job_tags()  # its SLURM job id and node when it runs as one
    child_name, child_tags = multirun.child_name_and_tags(cfg)  # set in a multirun only
    if saved is not None:
        tags["resumed_from_epoch"] = str(saved.state["epochs_done"])
    return child_name or run_name, tags | child_tags, output_dir


def search_trial(cfg: DictConfig) -> JobTrial | None:
    """The Optuna trial this job runs in a search (tagged on its run), else None."""
    from fashion_exp.sweeps import pruning

    if multirun.job_sweep_dir() is None or cfg.optimized_metric not in pruning.PER_EPOCH:
        return None
    return pruning.job_trial(cfg.optimized_metric)


def end_pruned(run: Recorder, cfg: DictConfig, history: dict[str, list[float]],
               trial: JobTrial, ckpt: RunCheckpoints) -> float:
    """A trial its pruner stopped: the run ends FINISHED with its epochs' metrics, its best
    value so far and the tags pruned=true, pruned_at_epoch; no test evaluation, no model."""
    from fashion_exp.core import training

    value = training.best_value(history, {}, cfg.optimized_metric)
    objective = metrics.objective_metric(cfg.optimized_metric)
    run.log_metrics({objective: value}, len(history["loss"]))
    trial.end_pruned()
    ckpt.finish()
    print(f"pruned at epoch {trial.pruned_at} (trial {trial.trial.number}): "
          f"{objective}={value:.4f}  run_id={run.run_id}", flush=True)
    return value


def log_objective(run: Recorder, cfg: DictConfig, history: dict[str, list[float]],
                  result: Evaluation, last_epoch: int) -> tuple[str, float]:
    """The value a sweep optimizes (optimized_metric), logged as best_<metric> beside the test
    metrics at the last epoch's step; returns (its MLflow name, the value)."""
    from fashion_exp.core import training

    test = {"test_loss": result.loss, "test_accuracy": result.accuracy}
    value = training.best_value(history, test, cfg.optimized_metric)
    objective = metrics.objective_metric(cfg.optimized_metric)
    if objective != cfg.optimized_metric:  # a test metric is logged already
        run.log_metrics({objective: value}, last_epoch)
    return objective, value


def figures(plots: ModuleType, history: dict[str, list[float]], result: Evaluation,
            splits: Splits) -> dict[str, Figure]:
    """The run's figures by file name."""
    return {
        "curves.png": plots.curves(history),
        "confusion_matrix.png": plots.confusion(result.confusion),
        "predictions.png": plots.predictions(splits.x_test, splits.y_test, result.probs),
        "dataset_sample.png": plots.dataset_sample(splits.x_train, splits.y_train),
    }


# The job processes of a sweep (hydra/launcher=parallel, slurm) run _hydra_main by importing
# this module, and Hydra resolves their config (${pid:} in the output folder) before any of
# our code runs there: the resolvers are registered on import (main() registers the rest).
register_resolvers()
register_resolver()  # ${study_storage:} of conf/hparams_search/


def _exit_invalid(err: ConfigError) -> None:
    """The one-line error for a bad config, exit status 2."""
    print(f"fashion-exp-train: invalid config: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as err:
        if multirun.job_sweep_dir() is not None:
            raise  # one failed job of a sweep; the others go on
        _exit_invalid(err)
    try:
        return train(cfg)
    except Exception as err:
        if not _user_error(err):
            raise
        if multirun.job_sweep_dir() is not None:
            log.error("job failed: %s", err)  # in the job's log; the others go on
            raise
        print(f"fashion-exp-train: error: {err}", file=sys.stderr)
        sys.exit(1)


def _user_error(err: Exception) -> bool:
    """Errors the user can fix (data, tracking store or server, resume): one line, no
    traceback."""
    from fashion_exp.core.checkpoints import ResumeError
    from fashion_exp.core.data import DataError
    from fashion_exp.tracking.store import TrackingUnavailable

    return isinstance(err, DataError | TrackingUnavailable | ResumeError | StoreError)


def check_search(cfg: DictConfig) -> None:
    """An Optuna search's sweeper settings (pruner, budget), before Hydra starts it."""
    if "pruner" in cfg.hydra.sweeper:
        from fashion_exp.sweeps import pruning, settings

        pruning.check_search(cfg.hydra.sweeper, cfg.optimized_metric)
        settings.check_stored_pruner(cfg.hydra.sweeper)  # a study keeps its first pruner


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
    """Console-script entry point: check the overrides of a run or a sweep, then hand over
    to Hydra."""
    register_configs()
    try:
        line = command_line(sys.argv[1:])  # None: --cfg, --help... show things, run no job
        if line is not None:
            overrides, sweep = line
            configs = precheck(overrides, multirun=sweep)
            sys.argv[1:] = hydra_argv(overrides, sweep)  # `a=1 -m b=1,2` as Hydra reads it
            if sweep:
                check_search(configs[-1])
    except ConfigError as err:
        _exit_invalid(err)
    if line is not None:
        if sweep:  # hydra/launcher=slurm: the cluster answers and can run this sweep
            from fashion_exp.sweeps.slurm import check_launcher

            check_launcher(configs[-1])
        _check_stores(configs)
        # MLflow's request timeout and retries, for a sweep's parent run as for its jobs.
        os.environ.update(request_settings(configs[-1].tracking))
    # SIGTERM stops like Ctrl-C, also between the jobs of a sweep, so every run gets an end.
    interrupts.install()
    try:
        _hydra_main()
    except KeyboardInterrupt as err:
        multirun.finish_open_sweeps(interrupted=True)
        print(f"fashion-exp-train: stopped ({err or 'interrupted'})", file=sys.stderr)
        sys.exit(130)
    finally:
        # A multirun whose job raised never reaches Hydra's on_multirun_end: end its parent.
        multirun.finish_open_sweeps()


if __name__ == "__main__":
    main()
