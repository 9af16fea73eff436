"""Resuming a stored Optuna study: the same command continues an interrupted search.

hydra-optuna-sweeper always runs `n_trials` new trials and leaves the trials of a killed
process RUNNING forever. `resume` first marks those stale trials FAIL (they are not
counted), then runs only the trials still missing, so a search that was stopped after k of n
trials ends with n finished trials in the study. The sweeper class that calls `resume` is
hydra_plugins/fashion_exp_search (Hydra loads plugins from that namespace only).
"""

from __future__ import annotations

import datetime
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from fashion_exp import procs
from fashion_exp.sweeps.study_storage import open_storage

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of trials whose process died
OVER_BUDGET = "over_budget"  # user attribute of a trial asked after the budget was spent


WORKER = "worker_"  # prefix of the user attributes naming a trial's process


UNOWNED_GRACE_S = 60  # a trial is asked, then its process recorded: not stale in between


def stale(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a RUNNING trial's process is gone (a trial of another host is never stale;
    one without a recorded process is, unless it was asked a moment ago: another worker may
    be about to record itself on it)."""
    owner = {key.removeprefix(WORKER): str(value) for key, value in trial.user_attrs.items()
             if key.startswith(WORKER)}
    if not owner:
        started = trial.datetime_start
        return started is None or (
            datetime.datetime.now() - started).total_seconds() > UNOWNED_GRACE_S
    return procs.alive(owner) is False


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    """The storage's key of the study's trial `number` (what optuna.Trial(study, id) and the
    storage's setters take)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def close_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Mark trials left RUNNING by a stopped process as FAIL (the study's `storage` writes
    them: they are not this process's to tell); returns how many."""
    stale_trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if stale(t)]
    for trial in stale_trials:
        key = trial_id(storage, study, trial.number)
        storage.set_trial_user_attr(key, INTERRUPTED, True)
        storage.set_trial_state_values(key, state=TrialState.FAIL)
    return len(stale_trials)


def resume(impl: Any) -> None:
    """Before a sweep: close stale trials of the stored study (impl: the plugin's
    OptunaSweeperImpl); the trials already counted lower what is left of the budget.

    The sampler's seed makes a new single-machine search repeatable. It is re-drawn when the
    study is shared by workers (a database server: with one seed every worker would propose
    the same trials) and when a stopped study resumes (it would propose its first trials
    again)."""
    if not (impl.storage and impl.study_name):
        return
    shared = not str(impl.storage).startswith("sqlite")
    if shared:
        impl.sampler.reseed_rng()
    storage = open_storage(str(impl.storage))  # workers that start together share a new one
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=storage)
    except KeyError:  # a new study
        return
    if study.trials and not shared:
        impl.sampler.reseed_rng()
    closed = close_stale_trials(study, storage)
    log.info("Resuming study %s: %s; %d interrupted trials run again", impl.study_name,
             summary(study), closed)


def record_process(trial: optuna.Trial) -> None:
    """Record this process (host, pid, start) on a trial it just asked for, so that the trial
    is known stale once the process is gone (`stale`)."""
    for key, value in procs.this_process().items():
        trial.set_user_attr(WORKER + key, value)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward the study's budget: every trial asked, running or ended,
    except those of a stopped process (they run again) and those asked too late."""
    return not (trial.state == TrialState.FAIL
                and (trial.user_attrs.get(INTERRUPTED) or trial.user_attrs.get(OVER_BUDGET)))


def active_seconds(trials: list[optuna.trial.FrozenTrial]) -> float:
    """Wall-clock seconds during which at least one trial ran (the union of the trials'
    start-to-end intervals): the time a search has spent, across workers and resumes,
    without the pauses between them."""
    now = datetime.datetime.now()
    spans = sorted((t.datetime_start, t.datetime_complete or now)
                   for t in trials if t.datetime_start is not None)
    total, end = 0.0, None
    for start, stop in spans:
        if end is not None and start < end:
            start = end  # the overlap with earlier spans is counted once
        if stop > start:
            total += (stop - start).total_seconds()
        end = stop if end is None else max(end, stop)
    return total


@dataclass(frozen=True)
class Budget:
    """One budget for the whole study, whoever runs it: hydra.sweeper.n_trials trials and
    hydra.sweeper.timeout seconds (null: no limit)."""

    n_trials: int
    timeout: float | None

    def spent(self, study: optuna.Study) -> str | None:
        """Why no new trial may start, or None."""
        trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
        if len(trials) >= self.n_trials:
            return (f"all {self.n_trials} trials of hydra.sweeper.n_trials are asked "
                    f"({summary(study)})")
        if self.timeout is not None and active_seconds(trials) >= self.timeout:
            return (f"hydra.sweeper.timeout={self.timeout:g} seconds are spent "
                    f"({summary(study)})")
        return None

    def admits(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Whether a trial just asked is within the budget: fewer than n_trials counted trials
        were asked before it (several workers may ask at the same moment). One that is not is
        ended FAIL with OVER_BUDGET, which no count includes."""
        before = sum(1 for t in study.get_trials(deepcopy=False)
                     if t.number < trial.number and counted(t))
        if before < self.n_trials:
            return True
        trial.set_user_attr(OVER_BUDGET, True)
        study.tell(trial, state=TrialState.FAIL)
        return False


def summary(study: optuna.Study) -> str:
    """'12 complete, 30 pruned, 1 failed, 2 running' of the study's counted trials."""
    trials = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
             TrialState.FAIL: "failed", TrialState.RUNNING: "running"}
    counts = {name: sum(1 for t in trials if t.state == state) for state, name in names.items()}
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n or name != "running")


def search_space(arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(distributions, fixed values) of a search's overrides in Hydra's sweep syntax.

    hydra-optuna-sweeper parses the syntax into Optuna 2's distribution classes
    (LogUniformDistribution, ...), which Optuna 5 deprecates: each one warns when it is made,
    and again whenever a process reads it back from the storage. They are rebuilt here as
    the FloatDistribution/IntDistribution they stand for, so the study stores only those."""
    # Private API (hydra-optuna-sweeper 1.3.0): no public parser of its search-space syntax.
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import FloatDistribution, IntDistribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old classes, replaced below
        space, fixed = create_params_from_overrides(arguments)
    modern: dict[str, Any] = {}
    for key, old in space.items():
        if isinstance(old, FloatDistribution):  # Uniform, LogUniform, DiscreteUniform
            modern[key] = FloatDistribution(old.low, old.high, log=old.log, step=old.step)
        elif isinstance(old, IntDistribution):  # IntUniform, IntLogUniform
            modern[key] = IntDistribution(old.low, old.high, log=old.log, step=old.step)
        else:
            modern[key] = old
    return modern, fixed


MIN_IMPORTANCE_TRIALS = 10  # complete trials before parameter importances are drawn
FIGURE_SIZE = (9, 5.5)  # inches at 100 dpi: readable at 100% in the MLflow UI


def figures(study: optuna.Study) -> dict[str, Any]:
    """Optuna's matplotlib pictures of the search, by file name: optimization history,
    intermediate values (the learning curves pruning acted on), parameter importances and
    parallel coordinates, made readable (every trial drawn and told apart, no cut labels).
    Importances are drawn from MIN_IMPORTANCE_TRIALS complete trials on; before that the
    picture says why it is empty; a picture Optuna cannot draw yet is left out."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    drawers = {"optimization_history.png": ovm.plot_optimization_history,
               "intermediate_values.png": ovm.plot_intermediate_values,
               "param_importances.png": ovm.plot_param_importances,
               "parallel_coordinate.png": ovm.plot_parallel_coordinate}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    found = {}
    for name, draw in drawers.items():
        if name == "param_importances.png" and len(complete) < MIN_IMPORTANCE_TRIALS:
            found[name] = too_few_for_importances(len(complete))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks these plots experimental
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:
                log.info("no %s: %s", name, err)
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        figure.set_size_inches(*FIGURE_SIZE)
        if name == "intermediate_values.png":
            readable_curves(first, study)
        elif name == "parallel_coordinate.png":
            readable_parallel(first, study, len(complete))
        elif name == "param_importances.png":
            first.set_title("", loc="left")  # Optuna's own title, in the left slot
            first.set_title(f"Parameter importances (fANOVA) from {len(complete)} complete "
                            "trials")
        figure.tight_layout()
        found[name] = figure
    return found


def too_few_for_importances(complete: int) -> Any:
    """The importances picture of a search with too few complete trials: why it is empty.
    Optuna's fANOVA fits a random forest to the complete trials' values; with a handful of
    trials it ranks parameters by noise, and the ranking changes with every new trial."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    axes.axis("off")
    axes.text(0.5, 0.5, f"Parameter importances need at least {MIN_IMPORTANCE_TRIALS} complete "
              f"trials;\nthis search has {complete}.\n\nThey are estimated (fANOVA) by fitting "
              "a random forest to the complete trials:\nwith fewer, the ranking is noise and "
              "changes with every new trial.", ha="center", va="center", fontsize=13,
              wrap=True)
    axes.set_title("Parameter importances: not enough complete trials yet")
    return figure


MAX_LEGEND = 20  # more trials than this: coloured by trial number, without a legend


def trial_colours(count: int) -> list[Any]:
    """`count` colours that are told apart: tab10, then tab20 with its dark halves first
    (Optuna's tab20 in its own order gives trials 0 and 1 a dark and a light shade of one
    hue; the curves mark the light ten with squares); past MAX_LEGEND a sequential map by
    trial order."""
    import matplotlib.pyplot as plt

    if count <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(count)]
    if count <= MAX_LEGEND:
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return [plt.get_cmap("tab20")(order[i]) for i in range(count)]
    return [plt.get_cmap("viridis")(i / (count - 1)) for i in range(count)]


def readable_curves(axes: Any, study: optuna.Study) -> None:
    """Optuna's intermediate-values plot made readable: epochs on the x axis, every trial in
    its own colour with markers (a trial pruned at epoch 1 is one point), pruned trials
    dashed, and the y axis cut only below outliers (diverged trials), which the title counts."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    trials = {f"Trial{t.number}": t for t in study.get_trials(deepcopy=False)
              if t.intermediate_values}
    lines = [line for line in axes.get_lines() if line.get_label() in trials]
    colours = trial_colours(len(lines))
    for index, (line, colour) in enumerate(zip(lines, colours, strict=True)):
        trial = trials[line.get_label()]
        pruned = trial.state == TrialState.PRUNED
        line.set_color(colour)
        line.set_alpha(1.0)
        line.set_linestyle("--" if pruned else "-")
        line.set_marker("o" if index < 10 else "s")  # the light tab20 shades: squares
        line.set_markersize(8 if len(line.get_xdata()) == 1 else 4)
        line.set_label(f"trial {trial.number}" + (" (pruned)" if pruned else ""))
    if axes.get_legend() is not None:
        axes.get_legend().remove()
    if len(lines) <= MAX_LEGEND:
        axes.legend(handles=lines, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8,
                    frameon=False, title="dashed: pruned", title_fontsize=8)
    elif lines:
        axes.figure.colorbar(ScalarMappable(Normalize(0, len(lines) - 1), "viridis"), ax=axes,
                             label="trial (in order)")
    values = [v for t in trials.values() for v in t.intermediate_values.values()
              if np.isfinite(v)]
    title = f"Intermediate values of {len(trials)} trials"
    if len(values) > 4:
        q1, q3 = np.percentile(values, [25, 75])
        fence = 3 * (q3 - q1)
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        kept = [v for v in values if (v >= q1 - fence if maximize else v <= q3 + fence)]
        low, high = min(kept), max(kept)
        pad = (high - low) * 0.05 or 0.01
        axes.set_ylim(low - pad, high + pad)
        if cut := len(values) - len(kept):
            title += (f" ({cut} values of diverged trials "
                      f"{'below' if maximize else 'above'} the axis)")
    axes.set_title(title)


def readable_parallel(axes: Any, study: optuna.Study, complete: int) -> None:
    """Optuna's parallel-coordinate plot made readable: axes named by their short keys
    (Optuna cuts names at 17 characters), wide enough that the value labels of neighbouring
    axes do not overlap, and a title that says which trials it draws."""
    from fashion_exp.sweeps.multirun import short_keys

    names = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    short = short_keys(names)
    labels = []
    for tick in axes.get_xticklabels():
        text = tick.get_text()
        full = next((n for n in names if n == text or (
            text.endswith("...") and n.startswith(text[:-3]))), None)
        labels.append(short[full] if full else "objective" if text == "Objective Value"
                      else text)
    axes.set_xticks(axes.get_xticks(), labels, rotation=20, ha="right")
    axes.figure.set_size_inches(max(FIGURE_SIZE[0], 1.25 * len(labels) + 2), FIGURE_SIZE[1])
    for lines in axes.collections[:1]:  # Blues draws the worst trials white on grey
        lines.set_cmap("viridis_r" if lines.get_cmap().name.endswith("_r") else "viridis")
        lines.set_linewidth(2)
        if lines.colorbar is not None:
            lines.colorbar.update_normal(lines)
    for twin in axes.figure.axes:
        if twin is not axes:
            twin.tick_params(labelsize=8)
    axes.set_title(f"Parallel coordinates of the {complete} complete trials "
                   "(pruned trials are not drawn)", y=1.03)
