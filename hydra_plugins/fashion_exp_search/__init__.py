"""Hydra plugins of fashion_exp (Hydra loads plugins from the hydra_plugins namespace only)."""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from fashion_exp.sweeps.optuna_study import resume, trials_record_their_process


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper that resumes a stored study instead of starting over, and
    records each trial's process so that several workers can share one study."""

    def sweep(self, arguments: list[str]) -> Any:
        resume(self.sweeper)
        with trials_record_their_process():
            return self.sweeper.sweep(arguments)
