"""What an Optuna search's sweeper settings may be, checked before anything is created.

Optuna checks few settings itself, and some only when the first trial is judged: its `<`
tests let nan through, 1e309 (infinity) stands for an integer, HyperbandPruner computes its
brackets (log(max_resource / min_resource)) at the first epoch. A setting it would refuse
late fails every trial of a search that exits 0. So each setting is checked here against
what Optuna 5 accepts (read from its pruners' and samplers' code), then the pruner and the
sampler each run a few trials of a throwaway in-memory study, so that whatever else Optuna
refuses is refused now, in one line (ConfigError).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from fashion_exp.config import ConfigError
from fashion_exp.sweeps.study_storage import open_storage
from fashion_exp.tracking.store_checks import first_line

MAX_SETTING = 1_000_000  # epochs, trials, rungs: anything larger is a typo
MAX_SEED = 2**32 - 1  # numpy's RandomState, which Optuna's samplers use
DIRECTIONS = ("maximize", "minimize")  # the runner returns one value
# A study name is the name of its sweep folder (outputs/<task>/searches/<study_name>).
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STUDY_NAME_ALLOWED = ("use one folder name: letters, digits, '.', '_' or '-', starting with "
                      "a letter or digit, at most 100 characters (it names the sweep folder "
                      "and is how the same command resumes the study)")


@dataclass(frozen=True)
class Whole:
    """An integer setting: from `low` to MAX_SETTING, or 'auto' where Optuna works it out."""

    low: int
    auto: bool = False

    def allows(self, value: Any) -> bool:
        if self.auto and value == "auto":
            return True
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= MAX_SETTING)

    def __str__(self) -> str:
        return f"an integer from {self.low} to {MAX_SETTING}" + (" or 'auto'" if self.auto else "")


@dataclass(frozen=True)
class Between:
    """A number setting from `low` to `high` (finite)."""

    low: float
    high: float

    def allows(self, value: Any) -> bool:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value) and self.low <= value <= self.high)

    def __str__(self) -> str:
        return f"a number from {self.low:g} to {self.high:g}"


_PERCENTILE_RULES = {"n_startup_trials": Whole(0), "n_warmup_steps": Whole(0),
                     "interval_steps": Whole(1), "n_min_trials": Whole(1)}
# What each pruner's constructor (or its first prune) accepts, per setting.
PRUNER_RULES: dict[type, dict[str, Whole | Between]] = {
    optuna.pruners.SuccessiveHalvingPruner: {
        "min_resource": Whole(1, auto=True), "reduction_factor": Whole(2),
        "min_early_stopping_rate": Whole(0), "bootstrap_count": Whole(0)},
    optuna.pruners.HyperbandPruner: {
        "min_resource": Whole(1), "max_resource": Whole(1, auto=True),
        "reduction_factor": Whole(2), "bootstrap_count": Whole(0)},
    optuna.pruners.MedianPruner: _PERCENTILE_RULES,
    optuna.pruners.PercentilePruner: _PERCENTILE_RULES | {"percentile": Between(0, 100)},
}


def check_study_name(name: Any) -> None:
    """hydra.sweeper.study_name: a single safe path component (not null: a study without a
    name gets a random one and can never be resumed)."""
    if not (isinstance(name, str) and STUDY_NAME.fullmatch(name)):
        shown = name if name is None or len(str(name)) <= 60 else f"{str(name)[:40]}..."
        raise ConfigError("hydra.sweeper.study_name", shown, STUDY_NAME_ALLOWED)


def check_direction(direction: Any) -> str:
    """hydra.sweeper.direction: maximize or minimize (one objective); returns it."""
    value = getattr(direction, "name", direction)  # Hydra's Direction enum, or a string
    if value not in DIRECTIONS:
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise ConfigError("hydra.sweeper.direction", shown,
                          "use maximize or minimize (the runner returns one value)")
    return value


def check_failure_rate(rate: Any) -> None:
    """hydra.sweeper.max_failure_rate: a fraction from 0 to 1."""
    if not Between(0, 1).allows(rate):
        raise ConfigError("hydra.sweeper.max_failure_rate", rate,
                          "use a fraction from 0 to 1 (of the trials of this run that may fail)")


def _settings(conf: Any) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(conf).items() if not k.startswith("_")}


def _one_line(conf: Any) -> str:
    """'MedianPruner n_startup_trials=5 n_warmup_steps=2' of a config with _target_."""
    return " ".join([str(conf._target_).rsplit(".", 1)[-1],
                     *(f"{k}={v}" for k, v in _settings(conf).items())])


def check_pruner(conf: Any, direction: str) -> optuna.pruners.BasePruner:
    """hydra.sweeper.pruner: each setting within what its pruner accepts, then the pruner
    built and run on a throwaway study; returns the pruner."""
    if conf is None:
        return optuna.pruners.NopPruner()
    try:
        kind = get_class(conf._target_)
    except Exception as err:  # noqa: BLE001 - Hydra's error for any unloadable target
        raise ConfigError("hydra.sweeper.pruner._target_", conf._target_,
                          f"not an Optuna pruner ({first_line(err.__cause__ or err)})") from None
    settings = _settings(conf)
    for key, rule in PRUNER_RULES.get(kind, {}).items():
        if key in settings and not rule.allows(settings[key]):
            raise ConfigError(f"hydra.sweeper.pruner.{key}", settings[key],
                              f"{kind.__name__} takes {rule}")
    if (kind is optuna.pruners.HyperbandPruner
            and isinstance(settings.get("max_resource"), int)
            and settings["max_resource"] < settings.get("min_resource", 1)):
        raise ConfigError("hydra.sweeper.pruner.max_resource", settings["max_resource"],
                          f"use at least min_resource ({settings.get('min_resource', 1)}) or "
                          "'auto'")
    try:
        pruner = instantiate(conf)
    except Exception as err:  # noqa: BLE001 - Optuna's own check of the settings, any kind
        raise ConfigError("hydra.sweeper.pruner", _one_line(conf),
                          first_line(err.__cause__ or err)) from None  # Hydra wraps it
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ConfigError("hydra.sweeper.pruner._target_", conf._target_,
                          "not an Optuna pruner (see hydra/sweeper/pruner=none|median|"
                          "successive_halving|hyperband)")
    try:
        _dry_run(optuna.samplers.RandomSampler(seed=0), instantiate(conf), direction)
    except Exception as err:  # noqa: BLE001 - whatever Optuna refuses at a trial's epoch
        raise ConfigError("hydra.sweeper.pruner", _one_line(conf),
                          f"Optuna fails on these settings: {first_line(err)}") from None
    return pruner


PRUNER_ATTR = "pruner"  # user attribute of a stored study: the pruner its search started with
SHORT_PRUNER = {"NopPruner": "unpruned", "MedianPruner": "median",
                "SuccessiveHalvingPruner": "asha", "HyperbandPruner": "hyperband"}


def pruner_line(conf: Any) -> str:
    """How a study records its pruner: 'MedianPruner n_startup_trials=5 n_warmup_steps=2 ...'."""
    return "NopPruner" if conf is None else _one_line(conf)


def check_stored_pruner(sweeper: Any) -> None:
    """hydra.sweeper.pruner of a stored study that exists: the pruner it was started with. A
    pruner is not part of an Optuna study; a study whose trials were judged by one pruner and
    then by another compares nothing, and a finished study would only say 'nothing left to
    run'. So the pruner is recorded on the study (search_loop) and a different one refused."""
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    if not storage:
        return
    store = open_storage(str(storage))
    try:
        study_id = store.get_study_id_from_name(name)
    except KeyError:  # a new study
        return
    stored = store.get_study_user_attrs(study_id).get(PRUNER_ATTR)
    asked = pruner_line(sweeper.get("pruner"))
    if stored is None or stored == asked:
        return
    kind = asked.split(" ", 1)[0]
    raise ConfigError("hydra.sweeper.pruner", asked,
                      f"study {name} was started with {stored}, and a study keeps its pruner: "
                      f"start a new study (add hydra.sweeper.study_name={name}_"
                      f"{SHORT_PRUNER.get(kind, 'new')}) or resume this one with its pruner")


def check_sampler(conf: Any, direction: str) -> None:
    """hydra.sweeper.sampler: a seed numpy accepts, then the sampler built and run on a
    throwaway study (some of its settings fail only once it samples)."""
    seed = conf.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)
                                 and 0 <= seed <= MAX_SEED):
        raise ConfigError("hydra.sweeper.sampler.seed", seed,
                          f"use an integer from 0 to {MAX_SEED}, or null for a random seed")
    name = conf._target_.rsplit(".", 1)[-1]
    try:
        with warnings.catch_warnings():
            # The plugin's sampler configs pass settings Optuna 5 deprecates: the search
            # warns of them when it starts; the check says nothing.
            warnings.simplefilter("ignore")
            sampler = instantiate(conf)
        if not isinstance(sampler, optuna.samplers.BaseSampler):
            raise ConfigError("hydra/sweeper/sampler", name,
                              "optuna_search draws trials one at a time; use tpe, random, "
                              "cmaes, nsgaii or motpe")
        _dry_run(sampler, optuna.pruners.NopPruner(), direction)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - Optuna's own check of the settings, any kind
        raise ConfigError("hydra.sweeper.sampler", name,
                          f"Optuna fails on its settings: {first_line(err.__cause__ or err)}",
                          ) from None


def check_space(params: Any) -> None:
    """hydra.sweeper.params: each search space one Optuna distribution accepts."""
    # Private API (hydra-optuna-sweeper 1.3.0): no public parser of its search-space syntax.
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    for key, value in (params or {}).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # Optuna 2's distributions
                create_params_from_overrides([f"{key}={value}"])
        except Exception as err:  # noqa: BLE001 - Hydra's parser or Optuna's distribution
            raise ConfigError(f"hydra.sweeper.params.{key}", value,
                              f"not a search space Optuna accepts: {first_line(err)}",
                              ) from None


DRY_TRIALS = 12  # TPE samples at random for its first 10 trials, then models them
DRY_EPOCHS = 4


def _dry_run(sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
             direction: str) -> None:
    """A few trials of an in-memory study with this sampler and pruner: each reports
    DRY_EPOCHS values and asks whether to go on, as a search's job does."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("c", ["a", "b"])
        for epoch in range(1, DRY_EPOCHS + 1):
            trial.report(x * epoch, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x * DRY_EPOCHS

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental features, deprecated settings
            study = optuna.create_study(sampler=sampler, pruner=pruner, direction=direction)
            study.optimize(objective, n_trials=DRY_TRIALS)
    finally:
        optuna.logging.set_verbosity(level)
