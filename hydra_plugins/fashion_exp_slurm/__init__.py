"""Hydra plugins of fashion_exp (Hydra loads plugins from the hydra_plugins namespace only).

The launchers `hydra/launcher=slurm` and `hydra/launcher=slurm_local`: hydra-submitit-launcher's,
with jobs that continue their MLflow run when SLURM requeues them (fashion_exp/sweeps/slurm.py).
"""

from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from fashion_exp.sweeps.slurm import Requeueable


class SlurmLauncher(Requeueable, submitit_launcher.SlurmLauncher):
    """hydra/launcher=slurm: each job a SLURM job (one job array per batch)."""


class LocalLauncher(Requeueable, submitit_launcher.LocalLauncher):
    """hydra/launcher=slurm_local: each job a local process through submitit."""
