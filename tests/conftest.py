"""Fixtures shared by the test files: a temporary MLflow store, the team stack, the served
model (helpers are in helpers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .helpers import real_data_dir

# TensorFlow loads in this process before any in-process run could choose its CPU kernels:
# load it with the runner's default (trainer.onednn: true), as a user's run does.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


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
    (version 1): (tracking URI, run id). Shared by the serving tests.

    Trained by the runner itself (cli.train.train) in this process: the same run and logged
    model as `fashion-exp-train` makes, without a second process that loads TensorFlow and
    MLflow again. The runner's signal handlers are put back afterwards."""
    if real_data_dir() is None and not os.environ.get("CI"):
        pytest.skip("real Fashion-MNIST not installed (./dev.sh setup installs it)")
    import signal

    import mlflow

    from fashion_exp.cli.train import train
    from fashion_exp.config import compose_checked

    uri = f"sqlite:///{tmp_path_factory.mktemp('served') / 'store' / 'mlflow.db'}"
    cfg = compose_checked("config", [
        "debug=fast", "data.limit=3000", "trainer.epochs=2", "trainer.verbose=0",
        # No XLA: compiling costs more than it saves on 2 small epochs.
        "trainer.jit_compile=false", "trainer.steps_per_execution=1",
        "tracking.figures=false", "tracking.experiment_name=serve", f"tracking.uri={uri}",
        "tracking.registered_model_name=fashion_serve"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(cfg)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("serve").experiment_id])
    assert run.info.status == "FINISHED" and run.outputs.model_outputs
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
