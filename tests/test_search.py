"""Parallel sweeps on a fresh store, a resumable Optuna search, and the comparison tool."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from fashion_exp.cli import compare

from .conftest import requires_real_data, run_cli

FAST = ["debug=fast", "data.limit=500", "tracking.log_model=false", "tracking.figures=false",
        "trainer.verbose=0"]


@pytest.fixture(scope="module")
def parallel_store(tmp_path_factory) -> tuple[str, Path]:
    """A 2-job seed sweep run by the parallel launcher into a store that did not exist."""
    tmp = tmp_path_factory.mktemp("parallel")
    uri = f"sqlite:///{tmp / 'fresh' / 'mlflow.db'}"
    result = run_cli("-m", "hydra/launcher=parallel", *FAST, "trainer.seed=0,1",
                     f"tracking.uri={uri}", f"hydra.sweep.dir={tmp / 'sweep'}", tmp_path=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, tmp


@pytest.mark.slow
@requires_real_data
def test_parallel_jobs_share_the_cores_and_lose_nothing(parallel_store) -> None:
    uri, _ = parallel_store
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["fashion_exp"], output_format="list")
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert sorted(r.info.run_name for r in children) == ["seed=0", "seed=1"]
    client = mlflow.MlflowClient(uri)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["tf_threads"] == "1"  # 2 cores, 2 jobs
        for key in ("epoch/loss", "epoch/val_accuracy", "training/epoch_seconds"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 1
        assert "test_accuracy" in child.data.metrics
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_total"] == "2"


@pytest.mark.slow
@requires_real_data
def test_compare_latest_sweep_writes_tables_figures_and_seed_groups(parallel_store,
                                                                   capsys) -> None:
    uri, tmp = parallel_store
    out = tmp / "cmp"
    assert compare.main(["--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs" in printed and "varied params: trainer.seed" in printed
    lines = (out / "leaderboard.csv").read_text().strip().splitlines()
    assert lines[0].startswith("run,status,trainer.seed,best_val_accuracy,test_accuracy")
    assert len(lines) == 3
    values = [float(line.split(",")[3]) for line in lines[1:]]
    assert values == sorted(values, reverse=True)
    seeds = (out / "seeds.md").read_text()
    assert "| 2 |" in seeds and "±" in seeds
    for png in ("val_accuracy.png", "metric_vs_params.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@requires_real_data
@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope"], "experiment 'nope' does not exist"),
    (["--sweep", "0123456789abcdef"], "no such run"),
    (["--filter", "params.model.name = 'resnet'"], "no runs in filter"),
    (["--filter", "params.model.name === 1"], "--filter"),
])
def test_compare_explains_what_is_missing(parallel_store, capsys, args, message) -> None:
    uri, tmp = parallel_store
    assert compare.main(["--tracking-uri", uri, "--out", str(tmp / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_compare_without_a_store_says_so(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert compare.main(["--tracking-uri", uri]) == 2
    assert "no tracking store" in capsys.readouterr().err


def _completed(storage: str, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.slow
@requires_real_data
def test_optuna_search_killed_after_one_trial_resumes_to_three(tmp_path, tracking_uri) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["-m", "hparams_search=mlp_optuna", *FAST, "hydra.sweeper.n_trials=3",
            "hydra.sweeper.study_name=resume_test", f"hydra.sweeper.storage={storage}",
            f"tracking.uri={tracking_uri}", f"hydra.sweep.dir={tmp_path / 'search'}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "fashion_exp.cli.train", *args], cwd=tmp_path,
                             stdout=log, stderr=log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _completed(storage, "resume_test") < 1:
            time.sleep(1)
        first.send_signal(subprocess.signal.SIGINT)
        assert first.wait(timeout=120) != 0
    finally:
        first.kill()
    assert _completed(storage, "resume_test") == 1

    second = run_cli(*args[:-1], tmp_path=tmp_path)  # the same command again
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="resume_test", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert optuna.trial.TrialState.RUNNING not in states
    assert all(t.user_attrs.get("interrupted") for t in study.trials
               if t.state == optuna.trial.TrialState.FAIL)

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["fashion_exp"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "FINISHED"  # reopened by the resumed search, then ended
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert sum(r.info.status == "FINISHED" for r in children) == 3
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
