"""Resuming a stored Optuna study: the same command continues an interrupted search.

hydra-optuna-sweeper always runs `n_trials` new trials and leaves the trials of a killed
process RUNNING forever. `resume` first marks those stale trials FAIL (they are not
counted), then runs only the trials still missing, so a search that was stopped after k of n
trials ends with n finished trials in the study. The sweeper class that calls `resume` is
hydra_plugins/fashion_exp_search (Hydra loads plugins from that namespace only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.trial import TrialState

from fashion_exp import procs

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of trials whose process died


WORKER = "worker_"  # prefix of the user attributes naming a trial's process


def stale(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a RUNNING trial's process is gone (a trial of another host is never stale;
    one without a recorded process is, as before workers were recorded)."""
    owner = {key.removeprefix(WORKER): str(value) for key, value in trial.user_attrs.items()
             if key.startswith(WORKER)}
    return not owner or procs.alive(owner) is False


def close_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a stopped process as FAIL; returns how many."""
    stale_trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if stale(t)]
    for trial in stale_trials:
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    return len(stale_trials)


def finished_trials(study: optuna.Study) -> int:
    """Trials that ran to an end: completed, pruned, or failed on their own (not interrupted)."""
    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED))
    )


def create_tables(storage: str, attempts: int = 5) -> None:
    """Create Optuna's tables in a new database, tolerating workers that do it at once.

    Two processes creating the schema together collide (PostgreSQL: duplicate type or table);
    the loser retries and finds the tables made by the winner."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            optuna.storages.RDBStorage(storage)
            return
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


def resume(impl: Any) -> None:
    """Before a sweep: close stale trials of the stored study and lower n_trials by the
    trials already finished (impl: the plugin's OptunaSweeperImpl).

    The sampler's seed makes a new single-machine search repeatable. It is re-drawn when the
    study is shared by workers (a database server: with one seed every worker would propose
    the same trials) and when a stopped study resumes (it would propose its first trials
    again)."""
    if not (impl.storage and impl.study_name):
        return
    shared = not str(impl.storage).startswith("sqlite")
    if shared:
        impl.sampler.reseed_rng()
        create_tables(str(impl.storage))
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # a new study
        return
    if study.trials and not shared:
        impl.sampler.reseed_rng()
    closed = close_stale_trials(study)
    done = finished_trials(study)
    impl.n_trials = max(0, impl.n_trials - done)
    log.info("Resuming study %s: %d trials done, %d interrupted, %d to go",
             impl.study_name, done, closed, impl.n_trials)


@contextmanager
def trials_record_their_process() -> Iterator[None]:
    """While a sweep runs, every trial it asks for records this process (host, pid, start).

    hydra-optuna-sweeper creates the study and asks for trials inside its own sweep loop, with
    no hook to tag them, so Study.ask is wrapped for the duration of the sweep."""
    original = optuna.Study.ask
    process = procs.this_process()

    def ask(study: optuna.Study, *args: Any, **kwargs: Any) -> optuna.Trial:
        trial = original(study, *args, **kwargs)
        for key, value in process.items():
            trial.set_user_attr(WORKER + key, value)
        return trial

    optuna.Study.ask = ask
    try:
        yield
    finally:
        optuna.Study.ask = original
