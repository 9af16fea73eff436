"""Shared helpers: synthetic IDX files, a temporary MLflow store, running the real CLI."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fashion_exp.core.data import DEBIAN_DIR, FILES, KERAS_CACHE

REPO = Path(__file__).resolve().parents[1]
# TensorFlow loads in this process before any in-process run could choose its CPU kernels:
# load it with the runner's default (trainer.onednn: true), as a user's run does.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write a uint8 array as a gzipped IDX file (images: 3 dims, labels: 1 dim)."""
    if magic is None:
        magic = 0x803 if array.ndim == 3 else 0x801
    header = struct.pack(">II", magic, array.shape[0])
    if array.ndim == 3:
        header += struct.pack(">II", *array.shape[1:])
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def write_dataset(folder: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Four small synthetic files with the real names, in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28)),
        "y_train": np.arange(n_train) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28)),
        "y_test": np.arange(n_test) % 10,
    }
    for key, array in arrays.items():
        write_idx(folder / FILES[key], array)
    return folder


def real_data_dir() -> Path | None:
    """Where the real Fashion-MNIST files are on this machine, if anywhere."""
    for folder in (KERAS_CACHE, DEBIAN_DIR):
        if all((folder / name).is_file() for name in FILES.values()):
            return folder
    return None


# CI installs the real files (./dev.sh), so there a missing copy is a failure, not a skip.
requires_real_data = pytest.mark.skipif(
    real_data_dir() is None and not os.environ.get("CI"),
    reason="real Fashion-MNIST not installed (./dev.sh setup installs it)",
)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def run_cli(*overrides: str, tmp_path: Path, script: str | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the training entry point in a subprocess, outputs under tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [script] if script else [sys.executable, "-m", "fashion_exp.cli.train"]
    cmd += [*overrides, f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="session")
def team_stack():
    """A real team stack (PostgreSQL + mlflow server) for the session, stopped at the end.
    Its folder is under /tmp: when the tests run as root, PostgreSQL runs as `postgres`,
    which cannot enter pytest's private temporary folders."""
    from devtools import team

    folder = Path(tempfile.mkdtemp(prefix="fashion-exp-team-"))
    stack = team.start(folder)
    yield stack
    team.stop(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def served_store(tmp_path_factory) -> tuple[str, str]:
    """A store with one small model trained on the real data and registered as fashion_serve
    (version 1): (tracking URI, run id). Shared by the serving tests."""
    if real_data_dir() is None and not os.environ.get("CI"):
        pytest.skip("real Fashion-MNIST not installed (./dev.sh setup installs it)")
    tmp = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    result = run_cli("debug=fast", "data.limit=3000", "trainer.epochs=2", "tracking.figures=false",
                     "tracking.experiment_name=serve", f"tracking.uri={uri}",
                     "tracking.registered_model_name=fashion_serve", tmp_path=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    import mlflow

    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("serve").experiment_id])
    return uri, run.info.run_id


# Small limits, so that the bad-request tests can pass them with small bodies.
SERVE_LIMITS = ["max_images=4", "max_upload_bytes=2000000", "max_request_bytes=3000000",
                "max_image_pixels=4000000"]


@pytest.fixture(scope="module")
def served_app(served_store):
    """The service on the shared test model, in-process, with SERVE_LIMITS: (TestClient, the
    store's folder, the model's run id). One per test module: no state shared between them."""
    from fastapi.testclient import TestClient

    from fashion_exp.cli import serve
    from fashion_exp.config import compose_checked

    uri, run_id = served_store
    cfg = compose_checked("serve", [f"tracking.uri={uri}", "tracking.experiment_name=serve",
                                    *SERVE_LIMITS])
    app, default_uri = serve.build(cfg)
    assert default_uri == f"runs:/{run_id}/model"  # the experiment's best (only) run
    with TestClient(app) as client:
        yield client, Path(uri.removeprefix("sqlite:///")).parent, run_id
