"""The loop of an Optuna search: ask a trial, run it as a Hydra job, tell its result.

It replaces the loop of hydra-optuna-sweeper (which asks n_jobs trials, waits for the whole
batch, and counts n_trials per process) and keeps its search-space syntax. Here:

- the budget (hydra.sweeper.n_trials, hydra.sweeper.timeout) is the study's, checked before
  every trial against every trial in the storage: several workers and resumed runs share it;
- with the parallel launcher, a trial that ends (finished, pruned or failed) frees its slot
  for the next trial at once, not when the slowest job of a batch ends;
- each job learns its trial from the environment (pruning.TRIAL_ENV) and reports its epochs
  to it; the pruner decides, the job stops, the trial is PRUNED;
- when the search ends or is stopped, the study's pictures go to the sweep's parent run;
- a job's MLflow run left RUNNING by a process that was killed (SIGKILL, out of memory) is
  ended KILLED when the search resumes or ends, as its trial is FAIL and runs again.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf
from optuna.trial import TrialState

from fashion_exp.sweeps import optuna_study
from fashion_exp.sweeps.pruning import STORAGE_ERRORS, TRIAL_ENV, quiet_old_distributions
from fashion_exp.sweeps.settings import PRUNER_ATTR, pruner_line
from fashion_exp.sweeps.study_storage import open_storage

log = logging.getLogger(__name__)


class Search:
    """One process's part of a search: the study, its budget, the trials this process ran.

    The search space is read with the plugin's own helpers, so that both loops read a space
    the same way."""

    def __init__(self, impl: Any, arguments: list[str], pruner: optuna.pruners.BasePruner,
                 timeout: float | None) -> None:
        self.impl = impl
        # Private API (hydra-optuna-sweeper 1.3.0): no public API for its search-space syntax
        # and directions; OptunaSweeperImpl's own helpers read them (here and in overrides).
        impl._process_searchspace_config()
        space, self.fixed = optuna_study.search_space(
            impl._parse_sweeper_params_config() + list(arguments))
        self.space = {k: v for k, v in space.items() if k not in self.fixed}
        self.storage = (open_storage(str(impl.storage)) if impl.storage
                        else optuna.storages.InMemoryStorage())
        self.study = optuna.create_study(
            study_name=impl.study_name, storage=self.storage, sampler=impl.sampler,
            pruner=pruner, directions=impl._get_directions(), load_if_exists=True)
        self.budget = optuna_study.Budget(impl.n_trials, timeout)
        self.failures = self.ended = 0
        self.running: dict[int, optuna.Trial] = {}  # asked here, not yet told
        self.stopped_because = ""

    def ask(self) -> optuna.Trial | None:
        """The next trial, or None once the study's budget is spent."""
        if reason := self.budget.spent(self.study):
            self.stopped_because = reason
            return None
        trial = self.study.ask()
        optuna_study.record_process(trial)  # before anything else: a trial has its process
        if not self.budget.admits(self.study, trial):  # another worker took the last trial
            self.stopped_because = self.budget.spent(self.study) or ""
            return None
        self.running[trial.number] = trial
        return trial

    def overrides(self, trial: optuna.Trial) -> list[str]:
        """The job's overrides: the trial's values, and the trial it reports to."""
        from fashion_exp.sweeps.multirun import child_run_name

        # Private API (hydra-optuna-sweeper 1.3.0): no public way to turn a trial into overrides.
        [values] = self.impl._configure_trials([trial], self.space, self.fixed)
        log.info("Trial %d: %s", trial.number, child_run_name(list(values), list(self.space)))
        # The job re-opens the trial by its storage key (optuna.Trial(study, id)).
        key = optuna_study.trial_id(self.storage, self.study, trial.number)
        return [*values, f"++hydra.job.env_set.{TRIAL_ENV}={key}"]

    def tell(self, trial: optuna.Trial, ret: JobReturn) -> None:
        """Record a job's end: its value, or FAIL; a trial the job pruned stays PRUNED."""
        self.running.pop(trial.number, None)
        self.ended += 1
        try:
            value = float(ret.return_value)  # raises the job's own error if it failed
        except Exception as err:  # noqa: BLE001 - any job error is the trial's failure
            self.failures += 1
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("Trial %d failed: %s", trial.number, err)
            if self.failures / self.ended > self.impl.max_failure_rate:
                log.error("%d of %d trials failed, more than hydra.sweeper.max_failure_rate="
                          "%g", self.failures, self.ended, self.impl.max_failure_rate)
                raise
            return
        pruned = self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if all(t.number != trial.number for t in pruned):  # the job told a pruned trial
            self.study.tell(trial, value)

    def run_sequential(self) -> None:
        """One trial after another, each as one launch of the configured launcher."""
        while (trial := self.ask()) is not None:
            [ret] = self.impl.launcher.launch([self.overrides(trial)],
                                              initial_job_idx=self.impl.job_idx)
            self.impl.job_idx += 1
            self.tell(trial, ret)

    def run_parallel(self, joblib_cfg: dict[str, Any]) -> None:
        """n_jobs trials at a time in joblib's worker processes; whenever one ends, the next
        is asked and started (joblib consumes the task generator one task per free slot)."""
        # Private API (hydra-joblib-launcher 1.2.0): execute_job; no public way to run one job
        # at a time (its launch() takes whole batches).
        from hydra.core.singleton import Singleton
        from hydra_plugins.hydra_joblib_launcher._core import execute_job
        from joblib import Parallel, delayed

        launcher = self.impl.launcher
        Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        asked: dict[int, optuna.Trial] = {}

        def tasks() -> Iterator[Any]:
            while (trial := self.ask()) is not None:
                idx = self.impl.job_idx
                self.impl.job_idx += 1
                asked[idx] = trial
                yield delayed(_numbered)(idx, execute_job, idx, self.overrides(trial),
                                         launcher.hydra_context, launcher.config,
                                         launcher.task_function, Singleton.get_state())

        settings = {k: v for k, v in joblib_cfg.items() if k in ("n_jobs", "verbose")}
        parallel = Parallel(**settings, backend="loky", batch_size=1, pre_dispatch="n_jobs",
                            return_as="generator_unordered")
        for idx, ret in parallel(tasks()):
            self.tell(asked.pop(idx), ret)

    def close_stopped(self) -> None:
        """Trials whose jobs were stopped (Ctrl-C): FAIL and interrupted, so that they are not
        counted and the resumed search runs them again."""
        for trial in self.running.values():
            trial.set_user_attr(optuna_study.INTERRUPTED, True)
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        self.running.clear()

    def save_results(self, sweep_dir: Path) -> None:
        """optimization_results.yaml in the sweep folder, as hydra-optuna-sweeper writes it."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return
        best = self.study.best_trial
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params,
                                         "best_value": best.value}),
                       sweep_dir / "optimization_results.yaml")
        from fashion_exp.sweeps.multirun import child_run_name

        values = child_run_name([f"{k}={v}" for k, v in best.params.items()], list(best.params))
        log.info("Best value %.4g (trial %d): %s", best.value, best.number, values)


def _numbered(idx: int, function: Any, *args: Any) -> tuple[int, JobReturn]:
    """function(*args), returned with the job's index (results arrive in any order)."""
    return idx, function(*args)


def parallel_settings(launcher: Any) -> dict[str, Any] | None:
    """The joblib settings of the parallel launcher when it runs more than one job at once."""
    settings = getattr(launcher, "joblib", None)
    if settings is None or int(settings.get("n_jobs") or 1) == 1:
        return None
    return dict(settings)


ORPHAN_ERROR = ("its process ended without ending the run (killed); the search ran its "
                "trial again")


def end_orphaned_jobs(sweep_dir: Path) -> int:
    """End KILLED the sweep's child runs left RUNNING by a process that is gone (a search
    killed during a trial: its Optuna trial is FAIL, interrupted, and runs again), so that no
    child stays RUNNING under an ended parent; returns how many. A run of a process that
    still runs, or of another host, is left alone."""
    from mlflow import MlflowClient

    from fashion_exp.files import read_json
    from fashion_exp.sweeps.multirun import STATE_FILE
    from fashion_exp.tracking.store import orphaned

    if not (sweep_dir / STATE_FILE).is_file():
        return 0
    info = read_json(sweep_dir / STATE_FILE)
    client = MlflowClient(info["tracking_uri"])
    try:
        running = client.search_runs(
            [info["experiment_id"]], max_results=5000,
            filter_string=f"tags.sweep_id = '{info['run_id']}' and tags.sweep = 'child' "
                          "and attributes.status = 'RUNNING'")
        ended = [run for run in running if orphaned(run) is True]
        for run in ended:
            client.set_tag(run.info.run_id, "error", ORPHAN_ERROR)
            client.set_terminated(run.info.run_id, "KILLED", end_time=last_logged(client, run))
            log.warning("Job run %s (%s) was left RUNNING by a killed process: ended KILLED",
                        run.info.run_id, run.info.run_name)
    except Exception as err:  # noqa: BLE001 - housekeeping: the search itself goes on
        log.warning("Job runs left RUNNING by killed processes not checked: %s", err)
        return 0
    return len(ended)


def last_logged(client: Any, run: Any) -> int:
    """When a run last logged a metric (ms), its start when it logged none: the end of a run
    whose process was killed, so that its duration is the time it really ran."""
    times = [m.timestamp for key in run.data.metrics
             for m in client.get_metric_history(run.info.run_id, key)]
    return max(times, default=run.info.start_time)


# Loggers of the launchers, which print every job's full overrides (the trial's values at
# full precision, and how the job finds its trial): the search prints one line per trial.
# Private API (hydra-core 1.3.8, hydra-joblib-launcher 1.2.0): the names of their internal
# modules; no public setting quiets those lines.
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher",
                    "hydra_plugins.hydra_joblib_launcher._core")


@contextmanager
def launcher_lines_hidden() -> Iterator[None]:
    """The launchers' 'Launching 1 jobs locally' and '#3 : <overrides>' lines left out while
    the search runs (shown with hydra.verbose=true, which logs at DEBUG)."""
    loggers = [logging.getLogger(name) for name in LAUNCHER_LOGGERS]
    levels = [logger.level for logger in loggers]
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run(impl: Any, arguments: list[str], pruner: optuna.pruners.BasePruner,
        timeout: float | None) -> None:
    """The sweeper's sweep: run trials until the study's budget is spent, then draw it."""

    quiet_old_distributions()
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # hydra.verbose=true shows them
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB"
    search = Search(impl, arguments, pruner, timeout)
    if PRUNER_ATTR not in search.study.user_attrs:  # checked by the next command (settings)
        search.study.set_user_attr(PRUNER_ATTR,
                                   pruner_line(impl.config.hydra.sweeper.get("pruner")))
    sweep_dir = Path(str(impl.config.hydra.sweep.dir))
    end_orphaned_jobs(sweep_dir.resolve())  # a resumed search: jobs of the killed process
    if reason := search.budget.spent(search.study):
        print(f"fashion-exp-train: study {impl.study_name}: {reason}; nothing left to run (raise "
              "hydra.sweeper.n_trials or hydra.sweeper.timeout to go on, or start a new study "
              "with hydra.sweeper.study_name=<new name>)", flush=True)
        return
    status = optuna_study.summary(search.study) if search.study.trials else "new"
    log.info("Study %s (%s), pruner %s, sampler %s", impl.study_name, status,
             type(pruner).__name__, type(impl.sampler).__name__)
    try:
        try:
            with launcher_lines_hidden():
                if (settings := parallel_settings(impl.launcher)) is not None:
                    search.run_parallel(settings)
                else:
                    search.run_sequential()
        finally:
            close(search, sweep_dir)
    except STORAGE_ERRORS as err:
        storage_lost(impl, err)
    print(f"fashion-exp-train: study {impl.study_name} ends: "
          f"{search.stopped_because or optuna_study.summary(search.study)}", flush=True)


def close(search: Search, sweep_dir: Path) -> None:
    """The end of a search, also a stopped or failed one: stopped trials closed, killed jobs'
    runs ended, the study's pictures and results. Needs the study's storage."""
    from fashion_exp.sweeps import multirun

    search.close_stopped()
    end_orphaned_jobs(sweep_dir.resolve())  # jobs of worker processes that were killed
    multirun.log_search_figures(sweep_dir, optuna_study.figures(search.study),
                                optuna_study.summary(search.study))
    search.save_results(sweep_dir)


def storage_lost(impl: Any, err: BaseException) -> None:
    """Stop the search in one line (exit status 1) when its study storage fails: the trials
    stored so far are kept, and the same command resumes once the storage is back."""
    from fashion_exp.tracking.store_checks import first_line
    from fashion_exp.uris import shown

    while err.__cause__ is not None:  # Optuna's own message guesses; the cause tells
        err = err.__cause__
    print(f"fashion-exp-train: error: the study storage {shown(str(impl.storage))} failed "
          f"({type(err).__name__}: {first_line(err)[:200]}); the search stops; run the same "
          "command to resume it once the storage is back", file=sys.stderr, flush=True)
    sys.exit(1)
