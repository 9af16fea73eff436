"""Hydra plugins of fashion_exp (Hydra loads plugins from the hydra_plugins namespace only).

The sweeper `hydra/sweeper=optuna_search`: Hydra's Optuna sweeper with a pruner
(hydra/sweeper/pruner=none|median|successive_halving|hyperband, conf/hydra/sweeper/pruner/),
one budget for the whole study (n_trials, timeout) and a resumable stored study.
"""

# No `from __future__ import annotations`: Hydra executes this module while scanning for
# plugins without registering it in sys.modules, where dataclasses look up string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import MISSING

DEFAULT_PRUNER = "successive_halving"


@dataclass
class SearchSweeperConf(OptunaSweeperConf):
    """hydra.sweeper of a search: Hydra's Optuna sweeper settings, plus a pruner and a
    wall-clock budget."""

    _target_: str = "hydra_plugins.fashion_exp_search.ResumableOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [
        {"sampler": "tpe"}, {"pruner": DEFAULT_PRUNER}])
    # Optuna's pruner (conf/hydra/sweeper/pruner/<name>.yaml): judges each trial after every
    # epoch on optimized_metric and stops the ones that cannot win.
    pruner: Any = MISSING  # filled by the pruner group (its default above)
    # Optuna's sampler (hydra/sweeper/sampler=tpe|random|...): only the chosen sampler's keys.
    sampler: Any = MISSING  # filled by the sampler group (its default above)
    # Seconds the whole study may run (across workers and resumes); null: no limit.
    timeout: float | None = None


@dataclass
class TPESamplerConf:
    """hydra/sweeper/sampler=tpe: Optuna's TPE sampler with the settings Optuna 5 still
    supports. It replaces the plugin's own tpe config, which passes five settings Optuna 5
    deprecates (consider_prior, prior_weight, ...), each a FutureWarning when a search starts."""

    _target_: str = "optuna.samplers.TPESampler"
    # Seed of the sampler: the same seed proposes the same first trials (null: random).
    seed: int | None = None
    # Trials drawn at random before TPE models the results.
    n_startup_trials: int = 10
    # Candidates TPE scores before it proposes a value.
    n_ei_candidates: int = 24
    # Model the parameters jointly (true) rather than one at a time.
    multivariate: bool = False


ConfigStore.instance().store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf,
                             provider="fashion_exp")
ConfigStore.instance().store(group="hydra/sweeper", name="optuna_search",
                             node=SearchSweeperConf, provider="fashion_exp")


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper that prunes, keeps one budget for the whole study, resumes a
    stored study instead of starting over, and records each trial's process so that several
    workers can share one study."""

    def __init__(self, pruner: Any = None, timeout: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pruner, self.timeout = pruner, timeout

    def sweep(self, arguments: list[str]) -> Any:
        from fashion_exp.sweeps import optuna_study, search_loop
        from fashion_exp.sweeps.pruning import build_pruner

        pruner = self.pruner if self.pruner is not None else build_pruner(None)
        optuna_study.resume(self.sweeper)
        return search_loop.run(self.sweeper, arguments, pruner, self.timeout)
