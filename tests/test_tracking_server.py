"""Team tracking against a real stack: PostgreSQL + `mlflow server` started by the tests,
distributed Optuna workers, server outages in the middle of a run, parallel jobs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from devtools import team
from fashion_exp.tracking.offline import JOURNAL

from .helpers import CLI_ENV, REPO, requires_real_data, run_cli

pytestmark = [pytest.mark.slow, requires_real_data]
FAST = ["debug=fast", "data.limit=600", "tracking.figures=false", "model.activation=elu"]
# Outage tests: ~30 epochs of 0.5-1 s, so the server is gone while the run still trains.
SLOWER = ["data.limit=4000", "trainer.batch_size=32"]


def client_of(stack: team.Stack) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(stack.tracking_uri)


def runs_in(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def start_training(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """The runner in the background; returns the process and its log file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "fashion_exp.cli.train", *overrides,
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=CLI_ENV)
    return proc, log


def wait_for(condition, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def metric_steps(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_stack_serves_runs_from_postgresql(team_stack) -> None:
    current = team.status(Path(team_stack.dir))
    assert current is not None
    # Fault tests may have restarted the server (a new pid) on the same port and database.
    assert dataclasses.replace(current, mlflow_pid=team_stack.mlflow_pid) == team_stack
    health = subprocess.run(
        [sys.executable, "-c", "import psycopg, sys; c = psycopg.connect(sys.argv[1]); "
         "print(c.execute('select count(*) from experiments').fetchone()[0])",
         team_stack.database_uri("mlflow").replace("+psycopg", "")],
        capture_output=True, text=True)
    assert health.returncode == 0, health.stderr  # the tracking tables live in PostgreSQL
    assert int(health.stdout) >= 1


def test_run_on_the_server_is_complete(team_stack, tmp_path) -> None:
    result = run_cli(*FAST, "trainer.epochs=2", "tracking=server",
                     f"tracking.uri={team_stack.tracking_uri}",
                     "tracking.experiment_name=team_run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_in(team_stack.tracking_uri, "team_run")
    client = client_of(team_stack)
    assert run.info.status == "FINISHED"
    assert not any(key.startswith("tracking.") for key in run.data.params)  # operational
    saved = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "mode: server" in Path(saved).read_text()  # in the logged config file instead
    assert metric_steps(client, run.info.run_id, "epoch/val_accuracy") == [1, 2]
    assert "test_accuracy" in run.data.metrics
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    mlflow.set_tracking_uri(team_stack.tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")  # via the server
    assert model.metadata.run_id == run.info.run_id


def test_unreachable_server_is_an_error_before_training(tmp_path) -> None:
    port = team.free_port()
    result = run_cli(*FAST, "tracking=server", f"tracking.uri=http://127.0.0.1:{port}",
                     tmp_path=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"fashion-exp-train: error: the tracking server http://127.0.0.1:{port} does not "
        "answer (GET /health); start it (e.g. python scripts/team_stack.py start) or set "
        "tracking.uri")
    assert "Training <" not in result.stdout + result.stderr


def start_server_run(tmp_path: Path, stack: team.Stack, experiment: str,
                     reconnect_seconds: int) -> tuple[subprocess.Popen, Path]:
    """A 30-epoch run on the server in the background, its outbox in tmp_path/offline."""
    return start_training(
        tmp_path, *FAST, *SLOWER, "trainer.epochs=30", "trainer.steps_per_execution=1",
        "trainer.verbose=2", "tracking=server", f"tracking.uri={stack.tracking_uri}",
        f"tracking.experiment_name={experiment}", f"tracking.offline_dir={tmp_path / 'offline'}",
        "tracking.retries=0", f"tracking.reconnect_seconds={reconnect_seconds}")


def test_server_outage_mid_run_is_buffered_and_sent(team_stack, tmp_path) -> None:
    client = client_of(team_stack)
    offline = tmp_path / "offline"
    proc, log = start_server_run(tmp_path, team_stack, "outage", reconnect_seconds=120)
    stack = team_stack
    try:
        def first_epochs_logged() -> bool:
            runs = runs_in(stack.tracking_uri, "outage")
            return bool(runs) and len(metric_steps(client, runs[0].info.run_id, "epoch/loss")) >= 2

        wait_for(first_epochs_logged, 240, "two epochs on the server")
        team.stop_mlflow(stack)  # the server goes away mid-run
        wait_for(lambda: any((offline / d / JOURNAL).is_file() for d in os.listdir(offline))
                 if offline.is_dir() else False, 240, "the run to buffer on disk")
        time.sleep(3)
        stack = team.restart_mlflow(stack)
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
        if not team.server_up(stack.tracking_uri):
            team.restart_mlflow(stack)
    (run,) = runs_in(stack.tracking_uri, "outage")
    assert run.info.status == "FINISHED", log.read_text()[-3000:]
    for key in ("epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy",
                "training/epoch_seconds"):
        assert metric_steps(client, run.info.run_id, key) == list(range(1, 31)), key
    assert "test_accuracy" in run.data.metrics and "best_val_accuracy" in run.data.metrics
    assert {"classification_report.txt", "config.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.outputs.model_outputs, "the model must be logged to the run"
    assert "is back" in log.read_text()
    assert not any(offline.iterdir())  # everything sent, nothing left behind


def test_server_that_never_returns_leaves_the_run_on_disk_for_upload(team_stack, tmp_path):
    client = client_of(team_stack)
    offline = tmp_path / "offline"
    proc, log = start_server_run(tmp_path, team_stack, "never", reconnect_seconds=2)
    stack = team_stack
    try:
        # Gone as soon as the run exists: its config, epochs and model all go to the disk.
        wait_for(lambda: bool(runs_in(stack.tracking_uri, "never")), 240, "the run to start",
                 every=0.2)
        team.stop_mlflow(stack)
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
        stack = team.restart_mlflow(stack) if not team.server_up(stack.tracking_uri) else stack
    (folder,) = list(offline.iterdir())
    out = log.read_text()
    assert (f"run {folder.name} is kept in {folder}; send it with: fashion-exp-runs upload "
            f"{folder}") in out
    (run,) = runs_in(stack.tracking_uri, "never")
    assert run.info.status == "RUNNING"  # the server never heard the end
    upload = subprocess.run([sys.executable, "-m", "fashion_exp.cli.runs", "upload", str(folder)],
                            capture_output=True, text=True, env=CLI_ENV, cwd=tmp_path)
    assert upload.returncode == 0, upload.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "epoch/val_accuracy") == list(range(1, 31))
    assert "test_accuracy" in run.data.metrics and run.outputs.model_outputs
    assert run.data.params["trainer.epochs"] == "30"
    assert not folder.exists()


def test_two_workers_share_one_study_and_one_sweep(team_stack, tmp_path) -> None:
    study = "distributed"
    common = ["-m", "hparams_search=mlp_optuna", *FAST, "tracking.log_model=false",
              "tracking=server", f"tracking.uri={team_stack.tracking_uri}",
              "tracking.experiment_name=distributed",
              f"hydra.sweeper.storage={team_stack.optuna_storage}",
              f"hydra.sweeper.study_name={study}", "hydra.sweeper.n_trials=4"]  # in all
    workers = []
    for n in range(2):  # separate sweep folders: as on two machines
        folder = tmp_path / f"worker{n}"
        folder.mkdir()
        log = open(folder / "log.txt", "w")
        workers.append((subprocess.Popen(
            [sys.executable, "-m", "fashion_exp.cli.train", *common,
             f"hydra.sweep.dir={folder / 'sweep'}"], cwd=folder, stdout=log,
            stderr=subprocess.STDOUT, env=CLI_ENV), folder))
    for proc, folder in workers:
        assert proc.wait(timeout=900) == 0, (folder / "log.txt").read_text()[-3000:]

    trials = [t for t in optuna.load_study(study_name=study,
                                           storage=team_stack.optuna_storage).trials
              if not t.user_attrs.get("over_budget")]
    # One budget for the study: 4 trials between the two workers, each judged by the pruner
    # against the epochs both workers reported.
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2

    runs = runs_in(team_stack.tracking_uri, "distributed")
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert len(parents) == 1, [p.info.run_id for p in parents]
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # Each trial is one run: the same learning rate and the value Optuna was told.
    by_lr = {float(c.data.params["optimizer.lr"]): c for c in children}
    assert len(by_lr) == 4
    for trial in trials:
        child = by_lr[trial.params["optimizer.lr"]]
        assert child.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)
        assert (child.data.tags.get("pruned") == "true") == (trial.state.name == "PRUNED")
    assert parents[0].data.tags["jobs_total"] == "4"


@pytest.mark.parametrize("where", ["local", "server"])
def test_eight_parallel_jobs_lose_no_run_and_no_metric(where, team_stack, tmp_path) -> None:
    uri = (team_stack.tracking_uri if where == "server"
           else f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}")  # a store that does not exist
    experiment = f"eight_{where}"
    result = run_cli("-m", *FAST, "trainer.epochs=3", "tracking.log_model=false",
                     f"tracking.uri={uri}", f"tracking.experiment_name={experiment}",
                     "hydra/launcher=parallel", "hydra.launcher.n_jobs=8",
                     "trainer.seed=0,1,2,3,4,5,6,7", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     tmp_path=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_in(uri, experiment)
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert len(runs) == 9 and len(children) == 8
    assert sorted(int(c.data.params["trainer.seed"]) for c in children) == list(range(8))
    client = mlflow.MlflowClient(uri)
    points = 0
    for child in children:
        assert child.info.status == "FINISHED"
        for key in ("epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy",
                    "training/learning_rate", "training/epoch_seconds"):
            steps = metric_steps(client, child.info.run_id, key)
            assert steps == [1, 2, 3], (child.info.run_name, key, steps)
            points += len(steps)
    assert points == 8 * 6 * 3
    assert json.loads((tmp_path / "sweep" / "mlflow_sweep.json").read_text())["run_id"] in {
        r.info.run_id for r in runs}


def test_team_stack_script_starts_and_stops() -> None:
    folder = Path(tempfile.mkdtemp(prefix="fashion-exp-stack-"))  # PostgreSQL's user reaches /tmp
    script = [sys.executable, str(REPO / "scripts" / "team_stack.py")]
    try:
        started = subprocess.run([*script, "start", "--dir", str(folder)], capture_output=True,
                                 text=True, timeout=300)
        assert started.returncode == 0, started.stderr[-3000:]
        assert "tracking server: http://127.0.0.1:" in started.stdout
        stack = team.load(folder)
        assert team.server_up(stack.tracking_uri)
    finally:
        stopped = subprocess.run([*script, "stop", "--dir", str(folder)], capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not team.server_up(stack.tracking_uri)
    assert not (folder / "pgdata" / "postmaster.pid").exists()  # PostgreSQL shut down
    status = subprocess.run([*script, "status", "--dir", str(folder)], capture_output=True,
                            text=True)
    assert status.returncode == 1 and "no team stack running" in status.stderr
    shutil.rmtree(folder)
