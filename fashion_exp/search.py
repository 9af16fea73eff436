"""Resuming a stored Optuna study: the same command continues an interrupted search.

hydra-optuna-sweeper always runs `n_trials` new trials and leaves the trials of a killed
process RUNNING forever. `resume` first marks those stale trials FAIL (they are not
counted), then runs only the trials still missing, so a search that was stopped after k of n
trials ends with n finished trials in the study. The sweeper class that calls `resume` is
hydra_plugins/fashion_exp_search (Hydra loads plugins from that namespace only).
"""

from __future__ import annotations

import logging
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


def resume(impl: Any) -> None:
    """Before a sweep: close stale trials of the stored study and lower n_trials by the
    trials already finished (impl: the plugin's OptunaSweeperImpl)."""
    if not (impl.storage and impl.study_name):
        return
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # a new study
        return
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
