"""Where a search keeps its study, and a stored study's pruner."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from fashion_exp.config import ConfigError
from fashion_exp.paths import project_root
from fashion_exp.sweeps import settings
from fashion_exp.sweeps.study_storage import study_storage


def test_the_study_is_stored_beside_the_mlflow_store(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert study_storage(f"sqlite:///{tmp_path}/runs/mlflow.db") == \
        f"sqlite:///{tmp_path}/runs/optuna.db"
    assert study_storage(str(tmp_path / "files")) == f"sqlite:///{tmp_path}/files/optuna.db"
    assert study_storage(None) == f"sqlite:///{project_root()}/mlruns/optuna.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env/mlflow.db")
    assert study_storage(None) == f"sqlite:///{tmp_path}/env/optuna.db"  # the variable counts
    assert study_storage("http://127.0.0.1:5000") == \
        f"sqlite:///{project_root()}/mlruns/optuna.db"  # a server's store is no folder here


def sweeper(storage: str, pruner: str) -> object:
    targets = {"median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5},
               "asha": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 1}}
    return OmegaConf.create({"storage": storage, "study_name": "s", "pruner": targets[pruner]})


def test_a_stored_study_refuses_another_pruner_and_names_a_new_study(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    settings.check_stored_pruner(sweeper(storage, "median"))  # no study yet: anything goes
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr(settings.PRUNER_ATTR,
                        settings.pruner_line(sweeper(storage, "asha").pruner))
    settings.check_stored_pruner(sweeper(storage, "asha"))  # its own pruner: resumes
    with pytest.raises(ConfigError) as err:
        settings.check_stored_pruner(sweeper(storage, "median"))
    assert "study s was started with SuccessiveHalvingPruner min_resource=1" in str(err.value)
    assert "hydra.sweeper.study_name=s_median" in str(err.value)
