"""Multirun sweeps grouped in MLflow: a real sweep in a subprocess against a temporary store."""

from __future__ import annotations

import json

import mlflow
import pytest

from fashion_exp.sweeps.multirun import STATE_FILE

from .helpers import requires_real_data, run_cli

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
    # Children are named by what varies, keys shortened; the full overrides are a tag.
    assert sorted(c.info.run_name for c in children) == [
        "lr=0.1 hidden=[16]", "lr=0.1 hidden=[32]", "lr=1e+09 hidden=[16]",
        "lr=1e+09 hidden=[32]"]
    assert all("optimizer.lr=" in c.data.tags["overrides"] for c in children)
    failed = [c for c in children if c.info.status == "FAILED"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(failed) == 2 and len(finished) == 2
    assert all("TrainingDiverged" in c.data.tags["error"] for c in failed)
    assert {c.data.tags["sweep_id"] for c in children} == {parent.info.run_id}
    # Derived values are tags, not params: only what the user swept varies.
    assert all("model.param_count" in c.data.tags and "model.param_count" not in c.data.params
               for c in finished)

    # The parent says what was swept and fixed, and carries the best job's values.
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep lr,hidden"
    assert parent.data.params["optimizer.lr"] == "0.1,1e9"
    assert parent.data.params["model.hidden"] == "[16],[32]"
    assert parent.data.params["data.limit"] == "600"  # fixed values are params too
    tags = parent.data.tags
    assert tags["swept"] == "optimizer.lr model.hidden" and "debug=fast" in tags["fixed"]
    assert tags["mlflow.source.name"] == "fashion-exp-train"
    best = max(finished, key=lambda c: c.data.metrics["best_val_accuracy"])
    assert tags["best_run_id"] == best.info.run_id
    for key in ("best_val_accuracy", "test_accuracy", "test_loss"):
        assert parent.data.metrics[key] == best.data.metrics[key], key
    assert tags["best_run_name"] == best.info.run_name
    assert tags["jobs_total"] == "4" and tags["jobs_failed"] == "2"
    assert "jobs_total" not in parent.data.metrics
    assert f"Best: **{best.info.run_name}**" in tags["mlflow.note.content"]
    board = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/leaderboard.csv")
    lines = board.strip().splitlines()
    # Only the swept keys are columns, in the order swept; best first, failed jobs last.
    assert lines[0].startswith("run,status,optimizer.lr,model.hidden,best_val_accuracy,"
                               "test_accuracy,test_loss,duration_s")
    assert best.info.run_id in lines[1]
    assert lines[3].split(",")[1] == lines[4].split(",")[1] == "FAILED"

    # The printed link opens a saved view of the sweep in the model-training pages.
    key = parent.info.run_id
    assert f"runs?viewStateShareKey={key}&workflowType=machine_learning" in result.stdout
    experiment = mlflow.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    assert view["selectedColumns"][:3] == ["params.`optimizer.lr`", "params.`model.hidden`",
                                           "metrics.`best_val_accuracy`"]
    assert view["orderByKey"] == "metrics.`best_val_accuracy`" and view["orderByAsc"] is False


def test_sweep_whose_jobs_all_fail_ends_failed(tmp_path, tracking_uri) -> None:
    result, parent, children = sweep(tmp_path, tracking_uri, "optimizer.lr=1e9,2e9")
    assert result.returncode == 1
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert parent.info.status == "FAILED"


def test_a_sweep_over_models_names_params_by_option(tmp_path, tracking_uri) -> None:
    """`-m model=mlp,cnn`: each job has the param `model` and only its own model's keys; the
    parent has `model`=`mlp,cnn` and neither model's keys; no job or parent has a setting."""
    result, parent, children = sweep(tmp_path, tracking_uri, "model=mlp,cnn")
    assert result.returncode == 0, result.stderr[-3000:]
    by_model = {c.data.params["model"]: c.data.params for c in children}
    assert sorted(by_model) == ["cnn", "mlp"]
    mlp, cnn = by_model["mlp"], by_model["cnn"]
    assert {k for k in mlp if k.startswith("model.")} == {
        "model.hidden", "model.activation", "model.dropout"}
    assert "model.filters" in cnn and "model.hidden" not in cnn
    assert "optimizer.beta_1" not in mlp and "schedule.factor" not in mlp  # options not chosen
    for params in (mlp, cnn, parent.data.params):
        assert not [k for k in params if k.startswith("tracking.") or k in
                    ("trainer.verbose", "trainer.checkpoint_dir", "trainer.resume")]
    assert parent.data.params["model"] == "mlp,cnn"
    assert not [k for k in parent.data.params if k.startswith("model.")]  # each job's own
    assert {k: v for k, v in mlp.items() if not k.startswith("model")} == \
        {k: v for k, v in parent.data.params.items() if not k.startswith("model")}
