"""Multirun sweeps grouped in MLflow: a real sweep in a subprocess against a temporary store."""

from __future__ import annotations

import json

import mlflow
import pytest

from fashion_exp.sweeps import STATE_FILE

from .conftest import requires_real_data, run_cli

pytestmark = [pytest.mark.slow, requires_real_data]
FAST = ["debug=fast", "data.limit=600", "tracking.log_model=false", "tracking.figures=false",
        "model.activation=elu", "tracking.experiment_name=sweeps"]


def sweep(tmp_path, uri: str, *grid: str):
    """Run `fashion-exp-train -m` with the grid; returns the process, parent and children."""
    result = run_cli("-m", *FAST, *grid, f"tracking.uri={uri}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp_path=tmp_path)
    parent_id = json.loads((tmp_path / "sweep" / STATE_FILE).read_text())["run_id"]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sweeps"], output_format="list")
    parent = next(r for r in runs if r.info.run_id == parent_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    return result, parent, children


def test_grid_with_failing_jobs_is_one_group_with_a_leaderboard(tmp_path, tracking_uri) -> None:
    # lr=1e9 diverges: those two jobs fail, the other two must still run.
    result, parent, children = sweep(tmp_path, tracking_uri, "optimizer.lr=0.1,1e9",
                                     "model.hidden=[16],[32]")
    assert result.returncode == 1  # some jobs failed
    assert len(children) == 4
    assert sorted(c.info.run_name for c in children) == [
        "optimizer.lr=0.1 model.hidden=[16]", "optimizer.lr=0.1 model.hidden=[32]",
        "optimizer.lr=1000000000.0 model.hidden=[16]",
        "optimizer.lr=1000000000.0 model.hidden=[32]"]
    failed = [c for c in children if c.info.status == "FAILED"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(failed) == 2 and len(finished) == 2
    assert all("TrainingDiverged" in c.data.tags["error"] for c in failed)
    assert {c.data.tags["sweep_id"] for c in children} == {parent.info.run_id}

    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep optimizer.lr=0.1,1e9 model.hidden=[16],[32]"
    best = max(finished, key=lambda c: c.data.metrics["val_accuracy"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["optimized_metric"]
    assert parent.data.tags["best_run_name"] == best.info.run_name
    assert parent.data.metrics["jobs_failed"] == 2
    board = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/leaderboard.csv")
    lines = board.strip().splitlines()
    # Only the varied params are columns; best first, failed jobs last.
    assert lines[0].startswith("run,status,model.hidden,model.param_count,optimizer.lr,"
                               "optimized_metric")
    assert best.info.run_id in lines[1]
    assert lines[3].split(",")[1] == lines[4].split(",")[1] == "FAILED"


def test_sweep_whose_jobs_all_fail_ends_failed(tmp_path, tracking_uri) -> None:
    result, parent, children = sweep(tmp_path, tracking_uri, "optimizer.lr=1e9,2e9")
    assert result.returncode == 1
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert parent.info.status == "FAILED"
