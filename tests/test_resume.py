"""Runs that survive: per-epoch checkpoints, SIGINT/SIGTERM/SIGKILL in the middle of training,
listing interrupted runs, and resuming into the same MLflow run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from fashion_exp.core import checkpoints
from fashion_exp.core.checkpoints import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE

from .helpers import CLI_ENV, requires_real_data

pytestmark = [pytest.mark.slow, requires_real_data]
EPOCHS = 6
FAST = ["debug=fast", "data.limit=600", "tracking.figures=false", "model.activation=elu",
        "tracking.experiment_name=resume", "trainer.steps_per_execution=1", "trainer.verbose=2",
        f"trainer.epochs={EPOCHS}"]


def train(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    log = open(tmp_path / "train.log", "a")
    return subprocess.Popen([sys.executable, "-m", "fashion_exp.cli.train", *overrides,
                             f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, env=CLI_ENV)


def runs_cli(tmp_path: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_exp.cli.runs", "--tracking-uri", uri,
                           "--experiment", "resume", *args], cwd=tmp_path, capture_output=True,
                          text=True, env=CLI_ENV, timeout=600)


def stop_after_epochs(tmp_path: Path, uri: str, sig: signal.Signals, epochs: int = 2,
                      ) -> tuple[str, int]:
    """Start a run, send `sig` once `epochs` checkpoints exist; (run id, exit code)."""
    proc = train(tmp_path, *FAST, f"tracking.uri={uri}")
    ckpts = Path(uri.removeprefix("sqlite:///")).parent / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            states = list(ckpts.glob(f"*/{STATE_FILE}"))
            if states and json.loads(states[0].read_text())["epochs_done"] >= epochs:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    (folder,) = [p.parent for p in ckpts.glob(f"*/{STATE_FILE}")]
    return folder.name, code


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def assert_complete(uri: str, run_id: str, params_before: dict[str, str]) -> None:
    """The resumed run: FINISHED, each epoch logged once, params unchanged, test metrics."""
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("epoch/loss", "epoch/val_accuracy", "training/learning_rate"):
        assert metric_steps(uri, run_id, key) == list(range(1, EPOCHS + 1)), key
    assert run.data.metrics["epochs_trained"] == EPOCHS  # as many as an uninterrupted run
    assert run.data.params == params_before  # not logged twice, not changed
    assert "error" not in run.data.tags and "resumed_from_epoch" in run.data.tags
    assert run.outputs.model_outputs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopped_run_is_killed_with_a_checkpoint_and_resumes(sig, tmp_path, tracking_uri):
    run_id, code = stop_after_epochs(tmp_path, tracking_uri, sig)
    log = (tmp_path / "train.log").read_text()
    assert code == 130, log[-4000:]
    assert f"resume with  fashion-exp-train trainer.resume={run_id}" in log
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert f"signal {sig.name}" in run.data.tags["error"]
    done = len(metric_steps(tracking_uri, run_id, "epoch/loss"))
    assert 2 <= done < EPOCHS  # what was logged is kept
    ckpt = Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints" / run_id
    assert (ckpt / WEIGHTS_FILE).is_file()

    listed = runs_cli(tmp_path, tracking_uri, "interrupted")
    assert listed.returncode == 0 and run_id in listed.stdout and "stopped" in listed.stdout

    params = run.data.params
    resumed = subprocess.run(
        [sys.executable, "-m", "fashion_exp.cli.train", f"trainer.resume={run_id}",
         f"tracking.uri={tracking_uri}", f"hydra.run.dir={tmp_path / 'hydra2'}"],
        cwd=tmp_path, capture_output=True, text=True, env=CLI_ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run_id={run_id}" in resumed.stdout
    assert_complete(tracking_uri, run_id, params)
    assert not ckpt.exists()  # a finished run's checkpoint is removed
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run


def test_sigkilled_run_is_listed_marked_failed_and_resumed(tmp_path, tracking_uri) -> None:
    run_id, code = stop_after_epochs(tmp_path, tracking_uri, signal.SIGKILL)
    assert code == -signal.SIGKILL
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it

    listed = runs_cli(tmp_path, tracking_uri, "interrupted")
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(run_id)]
    assert row.split()[1:3] == ["RUNNING", "orphaned"]
    assert int(row.split()[4]) >= 2  # epochs in its checkpoint

    marked = runs_cli(tmp_path, tracking_uri, "mark-failed")
    assert marked.returncode == 0 and run_id in marked.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "SIGKILL" in run.data.tags["error"]

    params = run.data.params
    resumed = runs_cli(tmp_path, tracking_uri, "resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_complete(tracking_uri, run_id, params)
    assert "no interrupted runs" in runs_cli(tmp_path, tracking_uri, "interrupted").stdout


def test_a_running_run_is_not_marked_or_resumed(tmp_path, tracking_uri) -> None:
    proc = train(tmp_path, *FAST, "trainer.epochs=400", f"tracking.uri={tracking_uri}")
    ckpts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(ckpts.glob(f"*/{WEIGHTS_FILE}")):
            time.sleep(0.2)
        (folder,) = [p.parent for p in ckpts.glob(f"*/{WEIGHTS_FILE}")]
        listed = runs_cli(tmp_path, tracking_uri, "interrupted")
        (row,) = [line for line in listed.stdout.splitlines() if line.startswith(folder.name)]
        assert row.split()[1:3] == ["RUNNING", "running"]
        assert folder.name not in runs_cli(tmp_path, tracking_uri, "mark-failed").stdout
        again = subprocess.run(
            [sys.executable, "-m", "fashion_exp.cli.train", "trainer.resume=latest",
             f"tracking.uri={tracking_uri}", f"hydra.run.dir={tmp_path / 'h2'}"],
            cwd=tmp_path, capture_output=True, text=True, env=CLI_ENV, timeout=600)
        assert again.returncode == 1
        assert "no stopped run with a checkpoint" in again.stderr.strip().splitlines()[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    assert mlflow.MlflowClient(tracking_uri).get_run(folder.name).info.status == "KILLED"


def test_a_checkpoint_from_before_a_new_key_resumes_with_its_default(tmp_path) -> None:
    (tmp_path / CONFIG_FILE).write_text(
        "trainer:\n  epochs: 6\n  batch_size: 64\ndata:\n  val_split: 0.1\n")
    cfg = checkpoints.saved_config(tmp_path)  # written before trainer.onednn existed
    assert cfg.trainer.onednn is True and cfg.trainer.steps_per_execution == 32
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.data.val_split) == (6, 64, 0.1)
