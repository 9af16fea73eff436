"""A search trial seen from its job: report every epoch's value to Optuna, stop when pruned.

The search loop (fashion_exp/sweeps/search_loop.py) starts each job with the environment
variable TRIAL_ENV naming its trial; the job opens the same study with the same pruner (a
pruner is code, not stored in the study) and, after every epoch, reports the optimized
metric and asks whether to go on. A pruned trial stops at the end of that epoch and is told
PRUNED here, by the process that knows the epoch. A trial is never pruned at its last epoch:
it has trained every epoch, so it ends complete (tested, its model logged) like any other.

A search's jobs are named by their trial (`trial 12`): the values they try are the view's
columns. A pruned trial's run is renamed `trial 12 (pruned at epoch 3)`, so the runs table
tells it from a finished one (MLflow shows both with the same FINISHED icon).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.exc
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from optuna.trial import TrialState

from fashion_exp.config import ConfigError
from fashion_exp.sweeps import settings
from fashion_exp.tracking.store_checks import connect_args, first_line
from fashion_exp.uris import shown

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

TRIAL_ENV = "FASHION_EXP_OPTUNA_TRIAL"  # the trial id (Optuna's storage key), set per job
# Metrics a Keras epoch reports, so that a trial can be judged after every epoch.
PER_EPOCH = ("val_accuracy", "val_loss", "accuracy", "loss")
# The study's database went away (a server stopped, a network cut).
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)


@dataclass
class JobTrial:
    """The Optuna trial this job runs, and whether (and when) it was pruned."""

    study: optuna.Study
    trial: optuna.Trial
    metric: str
    pruned_at: int | None = None
    storage_lost: bool = False  # the storage failed mid-trial: it trains on, unpruned

    @property
    def tags(self) -> dict[str, str]:
        """Tags of the job's MLflow run: which trial it is, and where it was pruned."""
        found = {"optuna_study": self.study.study_name, "optuna_trial": str(self.trial.number)}
        if self.pruned_at is not None:
            found |= {"pruned": "true", "pruned_at_epoch": str(self.pruned_at),
                      "mlflow.runName": pruned_name(self.trial.number, self.pruned_at)}
        return found

    def callback(self) -> keras.callbacks.Callback:
        """The Keras callback that reports each epoch and stops the fit when pruned."""
        import keras  # here: checking a search's config must not load TensorFlow

        job = self

        class ReportEpochs(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                if job.storage_lost:
                    return
                value = float((logs or {})[job.metric])
                try:
                    job.trial.report(value, epoch + 1)  # steps: epochs from 1, as in MLflow
                    pruned = job.trial.should_prune()
                except STORAGE_ERRORS as err:
                    # The run is worth finishing (its MLflow data does not need the study);
                    # the search stops when it next needs the storage.
                    job.storage_lost = True
                    log.warning("the study storage failed at epoch %d (%s); this trial "
                                "trains on without pruning", epoch + 1, first_line(err))
                    return
                # At its last epoch a trial has trained all it would: it ends complete.
                if pruned and epoch + 1 < (self.params or {}).get("epochs", epoch + 2):
                    job.pruned_at = epoch + 1
                    self.model.stop_training = True

        return ReportEpochs()

    def end_pruned(self) -> None:
        """Tell the study this trial was pruned (its last reported value is its value)."""
        self.study.tell(self.trial, state=TrialState.PRUNED, skip_if_finished=True)


def job_trial(metric: str) -> JobTrial | None:
    """This job's trial when it runs in an Optuna search (None otherwise: a plain run or a
    sweep). With the `none` pruner the epochs are still reported: the search's pictures draw
    them, and no trial is ever pruned."""
    found = os.environ.get(TRIAL_ENV)
    if not found or not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    pruner = build_pruner(sweeper.get("pruner"))
    quiet_old_distributions()
    study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage,
                              pruner=pruner)
    # Private API (optuna 5.0.0): no public way to re-open a trial in another process than
    # the one that asked for it (its docs advise against calling Trial's constructor);
    # Trial(study, trial_id) is what Study.ask itself builds.
    return JobTrial(study, optuna.Trial(study, int(found)), metric)


def trial_name(number: int) -> str:
    """The run name of a search's trial: `trial 12`."""
    return f"trial {number}"


def pruned_name(number: int, epoch: int) -> str:
    """The run name of a pruned trial: `trial 12 (pruned at epoch 3)`."""
    return f"{trial_name(number)} (pruned at epoch {epoch})"


def trial_number() -> int | None:
    """The number of the trial this job runs in its study (None outside a search, or when the
    study's storage does not answer: the job is then named by its values)."""
    found = os.environ.get(TRIAL_ENV)
    storage = HydraConfig.get().sweeper.get("storage") if HydraConfig.initialized() else None
    if not found or not storage:
        return None
    try:
        return optuna.storages.RDBStorage(str(storage)).get_trial_number_from_id(int(found))
    except (*STORAGE_ERRORS, KeyError, ValueError) as err:
        log.warning("trial %s: its number is not known (%s)", found, first_line(err))
        return None


def build_pruner(conf: Any) -> optuna.pruners.BasePruner:
    """The pruner of hydra.sweeper.pruner (a config with _target_), NopPruner for none."""
    if conf is None:
        return optuna.pruners.NopPruner()
    return instantiate(conf)


def check_search(sweeper: Any, optimized_metric: str) -> None:
    """hydra.sweeper of an optuna_search, before it starts: a study name that is one folder
    name, every sweeper, pruner and sampler setting within what Optuna accepts, a metric
    reported after every epoch when pruning, a budget that can be met, a storage that opens.
    ConfigError in one line otherwise (fashion_exp/sweeps/settings.py)."""
    settings.check_study_name(sweeper.get("study_name"))
    direction = settings.check_direction(sweeper.get("direction"))
    settings.check_failure_rate(sweeper.get("max_failure_rate"))
    pruner = settings.check_pruner(sweeper.get("pruner"), direction)
    if not isinstance(pruner, optuna.pruners.NopPruner) and optimized_metric not in PER_EPOCH:
        raise ConfigError("optimized_metric", optimized_metric,
                          "a pruned search judges trials after every epoch: use one of "
                          f"{', '.join(PER_EPOCH)}, or hydra/sweeper/pruner=none")
    settings.check_sampler(sweeper.sampler, direction)
    settings.check_space(sweeper.get("params"))
    if sweeper.n_trials < 1:
        raise ConfigError("hydra.sweeper.n_trials", sweeper.n_trials, "use 1 or more")
    timeout = sweeper.get("timeout")
    if timeout is not None and not timeout > 0:
        raise ConfigError("hydra.sweeper.timeout", timeout,
                          "use seconds > 0, or null for no limit")
    storage = sweeper.get("storage")  # null: an in-memory study
    if storage and (reason := storage_problem(str(storage))):
        raise ConfigError("hydra.sweeper.storage", shown(str(storage)),
                          f"the study's storage cannot be opened ({reason}); fix the URL, "
                          "create its folder or start its database")


def storage_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why the study's database cannot be reached, or None: one connection, given `timeout`
    seconds (a new SQLite file is created, as the search would create it)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        parsed = sqlalchemy.make_url(url)
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args(parsed, timeout),
                                          poolclass=NullPool)
        try:
            with engine.connect():
                return None
        finally:
            engine.dispose()
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.SQLAlchemyError) as err:
        return first_line(getattr(err, "orig", None) or err)


def quiet_old_distributions() -> None:
    """hydra-optuna-sweeper builds its search space from Optuna 2's distribution classes, and
    Optuna warns each time it reads one back from the storage (every trial, in every
    process of the search): those warnings are silenced in the processes of a search."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna.distributions")
