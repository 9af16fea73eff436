"""Parallel sweeps on a fresh store, a resumable Optuna search, and the comparison tool."""

from __future__ import annotations

import csv
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow
import optuna
import pytest

from fashion_exp.cli import compare

from .helpers import requires_real_data, run_cli

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


def _completed(storage: str) -> int:
    """How many trials of the SQLite study storage are complete (0 before it exists).

    One SQL query, read-only: optuna.load_study takes longer than a trial on 500 images lasts,
    and the poll must see the first trial end before the second does."""
    path = storage.removeprefix("sqlite:///")
    if not Path(path).exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:  # the storage is still being created
        return 0


@pytest.mark.slow
@requires_real_data
def test_optuna_search_killed_after_one_trial_resumes_to_three(tmp_path, tracking_uri) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["-m", "hparams_search=mlp_optuna", *FAST, "hydra.sweeper.n_trials=3",
            "hydra/sweeper/pruner=none", "hydra.sweeper.study_name=resume_test",
            f"hydra.sweeper.storage={storage}",
            f"tracking.uri={tracking_uri}", f"hydra.sweep.dir={tmp_path / 'search'}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "fashion_exp.cli.train", *args], cwd=tmp_path,
                             stdout=log, stderr=log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _completed(storage) < 1:
            time.sleep(0.02)
        first.send_signal(subprocess.signal.SIGINT)
        assert first.wait(timeout=120) != 0
    finally:
        first.kill()
    # A SIGINT that meets the second trial's end lets that trial finish: one or two are done.
    assert 1 <= _completed(storage) < 3

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


def search(tmp_path: Path, tracking_uri: str, study: str, *extra: str,
           folder: str = "search") -> list[str]:
    """The overrides of a short MLP search on 500 images, 3 epochs a trial."""
    return ["-m", "hparams_search=mlp_optuna", *FAST, "trainer.epochs=3",
            "trainer.early_stopping=false", f"hydra.sweeper.study_name={study}",
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
            f"tracking.uri={tracking_uri}", f"hydra.sweep.dir={tmp_path / folder}", *extra]


def states(tmp_path: Path, study: str) -> list[str]:
    return [t.state.name for t in optuna.load_study(
        study_name=study, storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials]


@pytest.mark.slow
@requires_real_data
def test_a_pruned_search_shows_its_pruned_trials_everywhere_and_resumes(
        tmp_path, tracking_uri, capsys) -> None:
    # Successive halving that keeps only the best half at epochs 1 and 2.
    args = search(tmp_path, tracking_uri, "pruned", "hydra.sweeper.n_trials=6",
                  "hydra.sweeper.pruner.reduction_factor=2")
    result = run_cli(*args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    pruned = {t.number: t for t in study.trials if t.state.name == "PRUNED"}
    assert len(study.trials) == 6 and pruned and len(pruned) < 6
    assert set(states(tmp_path, "pruned")) <= {"COMPLETE", "PRUNED"}
    assert "study pruned ends: all 6 trials of hydra.sweeper.n_trials are asked " \
        f"({6 - len(pruned)} complete, {len(pruned)} pruned, 0 failed)" in result.stdout

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("fashion_exp").experiment_id])
    children = {int(r.data.tags["optuna_trial"]): r for r in runs
                if r.data.tags.get("sweep") == "child"}
    assert sorted(children) == list(range(6))
    for number, run in children.items():
        assert run.info.status == "FINISHED"  # never FAILED
        if number in pruned:
            steps = sorted(pruned[number].intermediate_values)
            assert run.data.tags["pruned"] == "true"
            assert run.data.tags["pruned_at_epoch"] == str(steps[-1])
            assert len(client.get_metric_history(run.info.run_id, "epoch/val_accuracy")) \
                == steps[-1]  # its epochs so far
            assert "test_accuracy" not in run.data.metrics and not run.outputs.model_outputs
        else:
            assert "pruned" not in run.data.tags and "test_accuracy" in run.data.metrics
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert parent.data.tags["jobs_pruned"] == str(len(pruned))
    assert parent.data.tags["jobs_failed"] == "0"
    assert "pruned" not in children[int(
        client.get_run(parent.data.tags["best_run_id"]).data.tags["optuna_trial"])].data.tags
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    pictures = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/optimization_history.png", "search/intermediate_values.png"} <= pictures
    board = client.download_artifacts(parent.info.run_id, "leaderboard.csv", str(tmp_path))
    statuses = [row["status"] for row in csv.DictReader(open(board))]
    assert statuses.count("PRUNED") == len(pruned) and statuses[0] == "FINISHED"

    assert compare.main(["--tracking-uri", tracking_uri, "--out", str(tmp_path / "cmp")]) == 0
    assert f"{6 - len(pruned)} finished, {len(pruned)} pruned, 0 failed" \
        in capsys.readouterr().out

    # The same search with a larger budget: the pruned trials count, 2 new trials run.
    more = run_cli(*args[:-2], "hydra.sweeper.n_trials=8",
                   "hydra.sweeper.pruner.reduction_factor=2", tmp_path=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(states(tmp_path, "pruned")) == 8
    # Once more: the budget is spent, the worker says so and exits 0.
    again = run_cli(*args[:-2], "hydra.sweeper.n_trials=8",
                    "hydra.sweeper.pruner.reduction_factor=2", tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all 8 trials of hydra.sweeper.n_trials are asked" in again.stdout
    assert "nothing left to run" in again.stdout
    assert len(states(tmp_path, "pruned")) == 8


@pytest.mark.slow
@requires_real_data
def test_two_workers_share_one_budget(tmp_path, tracking_uri) -> None:
    workers = []
    for n in range(2):  # each its own sweep folder and sampler seed: as on two machines
        args = search(tmp_path, tracking_uri, "shared", "hydra.sweeper.n_trials=5",
                      "hydra/sweeper/pruner=none", f"hydra.sweeper.sampler.seed={n}",
                      folder=f"worker{n}")
        log = open(tmp_path / f"worker{n}.log", "w")
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "fashion_exp.cli.train", *args,
             f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT))
    for n, proc in enumerate(workers):
        assert proc.wait(timeout=900) == 0, (tmp_path / f"worker{n}.log").read_text()[-3000:]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    counted = [t for t in study.trials if not t.user_attrs.get("over_budget")]
    assert len(counted) == 5 and all(t.state.name == "COMPLETE" for t in counted)
    assert all(len(t.intermediate_values) == 3 for t in counted)  # reported, never pruned
    assert len({t.user_attrs["worker_pid"] for t in counted}) == 2  # both worked


@pytest.mark.slow
@requires_real_data
def test_the_timeout_is_the_study_s_wall_clock(tmp_path, tracking_uri) -> None:
    args = search(tmp_path, tracking_uri, "timed", "hydra.sweeper.n_trials=50",
                  "hydra.sweeper.timeout=1")
    result = run_cli(*args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert states(tmp_path, "timed") == ["COMPLETE"]  # a trial takes more than a second
    assert "hydra.sweeper.timeout=1 seconds are spent" in result.stdout


def _running_child(uri: str, trial: str) -> bool:
    """Whether the store has a RUNNING job run of this Optuna trial (False before it exists).

    Read with one SQL query, not an MlflowClient: a client checks the store's schema each time
    it is made, which takes longer than a 3-epoch trial on 500 images lasts.
    """
    path = uri.removeprefix("sqlite:///")
    if not Path(path).exists():
        return False
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute(
                "SELECT 1 FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid"
                " WHERE tags.key = 'optuna_trial' AND tags.value = ? AND runs.status = 'RUNNING'",
                (trial,)).fetchone() is not None
    except sqlite3.Error:  # the search is still creating the store's tables
        return False


@pytest.mark.slow
@requires_real_data
def test_a_search_killed_during_a_trial_leaves_no_run_running_once_resumed(
        tmp_path, tracking_uri) -> None:
    args = search(tmp_path, tracking_uri, "sigkill", "hydra.sweeper.n_trials=3",
                  "hydra/sweeper/pruner=none")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "fashion_exp.cli.train", *args,
                              f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path,
                             stdout=log, stderr=log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _running_child(tracking_uri, "1"):
            time.sleep(0.02)
        first.kill()  # SIGKILL during the second trial: nothing ends its run
        first.wait(timeout=60)
    finally:
        first.kill()
    assert _running_child(tracking_uri, "1"), (tmp_path / "first.log").read_text()[-3000:]

    second = run_cli(*args, tmp_path=tmp_path)  # the same command again
    assert second.returncode == 0, second.stderr[-3000:]
    assert states(tmp_path, "sigkill").count("COMPLETE") == 3
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("fashion_exp").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 3 + ["KILLED"]
    (killed,) = [r for r in children if r.info.status == "KILLED"]
    assert killed.data.tags["optuna_trial"] == "1" and "killed" in killed.data.tags["error"]
    assert killed.info.end_time < parent.info.end_time
    # The budget counts 3 trials; the leaderboard shows the killed job apart from them.
    assert parent.data.tags["jobs_total"] == "4"
    assert "4 runs, 3 finished, 1 killed, 0 failed." in parent.data.tags["mlflow.note.content"]
    assert (parent.data.tags["jobs_failed"], parent.data.tags["jobs_killed"]) == ("0", "1")
