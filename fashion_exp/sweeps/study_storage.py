"""Where an Optuna search keeps its study by default: beside the MLflow store it logs to.

conf/hparams_search/*.yaml set `hydra.sweeper.storage: ${study_storage:${tracking.uri}}`, so a
search logged to sqlite:////data/runs/mlflow.db (tracking.uri or MLFLOW_TRACKING_URI) keeps its
study in sqlite:////data/runs/optuna.db, and the default store's study is
<repo>/mlruns/optuna.db. A tracking server's store is not a file here: its searches keep their
study in <repo>/mlruns/optuna.db, and hydra.sweeper.storage=postgresql://... shares one
study across machines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fashion_exp.paths import project_root
from fashion_exp.tracking.store_checks import resolve_uri, sqlite_path

STUDY_FILE = "optuna.db"


def study_storage(tracking_uri: str | None) -> str:
    """The SQLite URL of the study database beside the MLflow store of `tracking_uri`
    (null: MLFLOW_TRACKING_URI, then the project's default store)."""
    uri = resolve_uri(tracking_uri)
    if (db := sqlite_path(uri)) is not None:
        folder = db.parent
    elif uri.startswith("file://"):
        folder = Path(uri.removeprefix("file://"))
    else:  # a tracking server (or a store this machine cannot see as a folder)
        folder = project_root() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)  # as the MLflow store beside it would be
    return f"sqlite:///{folder / STUDY_FILE}"


def register_resolver() -> None:
    """${study_storage:<tracking uri>} in configs."""
    OmegaConf.register_new_resolver("study_storage", study_storage, replace=True)


def open_storage(url: str, attempts: int = 5) -> Any:
    """Optuna's storage at `url`, its tables created if the database is new, tolerating
    workers that create them at once.

    Two processes creating the schema together collide (SQLite: the alembic version row;
    PostgreSQL: a duplicate type or table); the loser retries and finds the winner's tables."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts - 1):
        try:
            return optuna.storages.RDBStorage(url)
        except SQLAlchemyError:
            time.sleep(1 + attempt)
    return optuna.storages.RDBStorage(url)  # the last attempt's error is the user's
