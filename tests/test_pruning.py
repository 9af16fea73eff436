"""The pieces of a pruned search, in-process: the study's budget, a job's trial, the leaderboard
of pruned runs, the search's pictures."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from fashion_exp.config import ConfigError
from fashion_exp.sweeps import leaderboard, optuna_study, pruning

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


def timed(start_s: float, end_s: float | None, state: TrialState = TrialState.COMPLETE,
          **attrs) -> optuna.trial.FrozenTrial:
    trial = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                         params={"x": 0.1}, distributions={"x": FloatDistribution(0, 1)},
                         user_attrs=attrs)
    trial.datetime_start = T0 + datetime.timedelta(seconds=start_s)
    trial.datetime_complete = None if end_s is None else T0 + datetime.timedelta(seconds=end_s)
    return trial


def test_active_seconds_count_overlaps_once_and_skip_the_pauses() -> None:
    # Two workers overlapping (0-10, 5-20), a pause, then a resumed run (100-130).
    trials = [timed(0, 10), timed(5, 20), timed(100, 130)]
    assert optuna_study.active_seconds(trials) == pytest.approx(50)
    assert optuna_study.active_seconds([timed(0, 30), timed(5, 10)]) == pytest.approx(30)


def test_the_budget_counts_every_trial_of_the_study_except_interrupted_ones() -> None:
    study = optuna.create_study(direction="maximize")
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        study.add_trial(create_trial(state=state, value=0.5 if state.name == "COMPLETE"
                                     else None, params={}, distributions={}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={},
                                 user_attrs={optuna_study.INTERRUPTED: True}))
    budget = optuna_study.Budget(n_trials=4, timeout=None)
    assert budget.spent(study) is None  # 3 counted: the interrupted one runs again
    trial = study.ask()
    assert budget.admits(study, trial)
    assert budget.spent(study) == ("all 4 trials of hydra.sweeper.n_trials are asked "
                                   "(1 complete, 1 pruned, 1 failed, 1 running)")
    late = study.ask()  # another worker asked at the same moment: over the budget
    assert not budget.admits(study, late)
    assert study.trials[-1].state == TrialState.FAIL
    assert not optuna_study.counted(study.trials[-1])
    assert optuna_study.Budget(10, timeout=60).spent(study) is None  # one trial, for an instant


def test_the_timeout_counts_the_time_trials_ran() -> None:
    study = optuna.create_study()
    study.add_trial(timed(0, 40))
    study.add_trial(timed(30, 70))
    assert optuna_study.Budget(10, timeout=60).spent(study) == (
        "hydra.sweeper.timeout=60 seconds are spent (2 complete, 0 pruned, 0 failed)")
    assert optuna_study.Budget(10, timeout=80).spent(study) is None


def test_a_job_reports_each_epoch_and_stops_when_its_trial_is_pruned() -> None:
    import keras

    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=0.6))
    job = pruning.JobTrial(study, study.ask(), "val_accuracy")
    callback = job.callback()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callback.set_model(model)
    callback.on_epoch_end(0, {"val_accuracy": 0.7, "loss": 1.0})
    assert job.pruned_at is None and not getattr(model, "stop_training", False)
    callback.on_epoch_end(1, {"val_accuracy": 0.5, "loss": 0.9})
    assert job.pruned_at == 2 and model.stop_training
    job.end_pruned()
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {1: 0.7, 2: 0.5}
    # Renamed: the runs table tells a pruned trial from a finished one by its name.
    assert job.tags == {"optuna_study": study.study_name, "optuna_trial": "0",
                        "pruned": "true", "pruned_at_epoch": "2",
                        "mlflow.runName": "trial 0 (pruned at epoch 2)"}


def test_a_trial_judged_at_its_last_epoch_is_complete_not_pruned() -> None:
    import keras

    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=0.6))
    job = pruning.JobTrial(study, study.ask(), "val_accuracy")
    callback = job.callback()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callback.set_model(model)
    callback.set_params({"epochs": 2, "verbose": 0, "steps": 1})  # as Keras's fit sets them
    callback.on_epoch_end(0, {"val_accuracy": 0.7})
    callback.on_epoch_end(1, {"val_accuracy": 0.5})  # below the threshold, but all trained
    assert job.pruned_at is None and not getattr(model, "stop_training", False)
    assert "pruned" not in job.tags and study.trials[0].intermediate_values == {1: 0.7, 2: 0.5}


def sweeper(**settings) -> SimpleNamespace:
    from omegaconf import OmegaConf

    conf = {"pruner": {"_target_": "optuna.pruners.SuccessiveHalvingPruner",
                       "min_resource": 1, "reduction_factor": 3}, "n_trials": 10,
            "timeout": None, "study_name": "s", "direction": "maximize",
            "max_failure_rate": 1.0,
            "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 0},
            "params": {"optimizer.lr": "tag(log, interval(0.0001, 0.1))"}} | settings
    return OmegaConf.create(conf)


def pruner(name: str, **settings) -> dict:
    return {"_target_": f"optuna.pruners.{name}"} | settings


SH, HB, MEDIAN = "SuccessiveHalvingPruner", "HyperbandPruner", "MedianPruner"


@pytest.mark.parametrize(("settings", "metric", "message"), [
    ({"pruner": pruner(SH, reduction_factor=1)}, "val_accuracy",
     "hydra.sweeper.pruner.reduction_factor=1: SuccessiveHalvingPruner takes an integer from 2"),
    ({}, "test_loss", "optimized_metric='test_loss': a pruned search judges trials after every"),
    ({"n_trials": 0}, "val_accuracy", "hydra.sweeper.n_trials=0: use 1 or more"),
    ({"timeout": -5.0}, "val_loss", "hydra.sweeper.timeout=-5.0: use seconds > 0"),
    # Settings Optuna's own checks let through, then every trial fails.
    ({"pruner": pruner(SH, reduction_factor=float("nan"))}, "val_accuracy",
     "hydra.sweeper.pruner.reduction_factor=nan: SuccessiveHalvingPruner takes an integer"),
    ({"pruner": pruner(SH, min_early_stopping_rate=float("inf"))}, "val_accuracy",
     "hydra.sweeper.pruner.min_early_stopping_rate=inf: SuccessiveHalvingPruner takes an "
     "integer from 0 to 1000000"),
    ({"pruner": pruner(SH, bootstrap_count=True)}, "val_accuracy",
     "hydra.sweeper.pruner.bootstrap_count=True: SuccessiveHalvingPruner takes an integer"),
    ({"pruner": pruner(HB, max_resource=0)}, "val_accuracy",
     "hydra.sweeper.pruner.max_resource=0: HyperbandPruner takes an integer from 1 to "
     "1000000 or 'auto'"),
    ({"pruner": pruner(HB, min_resource=5, max_resource=3)}, "val_accuracy",
     "hydra.sweeper.pruner.max_resource=3: use at least min_resource (5) or 'auto'"),
    ({"pruner": pruner(HB, reduction_factor=1)}, "val_accuracy",
     "hydra.sweeper.pruner.reduction_factor=1: HyperbandPruner takes an integer from 2"),
    ({"pruner": pruner(MEDIAN, n_startup_trials=float("nan"))}, "val_accuracy",
     "hydra.sweeper.pruner.n_startup_trials=nan: MedianPruner takes an integer from 0"),
    ({"pruner": pruner(MEDIAN, n_warmup_steps=float("inf"))}, "val_accuracy",
     "hydra.sweeper.pruner.n_warmup_steps=inf: MedianPruner takes an integer from 0"),
    ({"pruner": pruner(MEDIAN, interval_steps=0)}, "val_accuracy",
     "hydra.sweeper.pruner.interval_steps=0: MedianPruner takes an integer from 1"),
    ({"pruner": pruner("PercentilePruner", percentile=float("nan"))}, "val_accuracy",
     "hydra.sweeper.pruner.percentile=nan: PercentilePruner takes a number from 0 to 100"),
    ({"pruner": pruner("ThresholdPruner")}, "val_accuracy",
     "hydra.sweeper.pruner='ThresholdPruner': Either lower or upper must be specified"),
    ({"pruner": {"_target_": "optuna.samplers.RandomSampler"}}, "val_accuracy",
     "hydra.sweeper.pruner._target_='optuna.samplers.RandomSampler': not an Optuna pruner"),
    ({"pruner": {"_target_": "optuna.pruners.Nope"}}, "val_accuracy",
     "hydra.sweeper.pruner._target_='optuna.pruners.Nope': not an Optuna pruner"),
    # The other sweeper settings.
    ({"direction": "sideways"}, "val_accuracy",
     "hydra.sweeper.direction='sideways': use maximize or minimize"),
    ({"direction": ["maximize", "minimize"]}, "val_accuracy",
     "hydra.sweeper.direction=['maximize', 'minimize']: use maximize or minimize"),
    ({"max_failure_rate": float("nan")}, "val_accuracy",
     "hydra.sweeper.max_failure_rate=nan: use a fraction from 0 to 1"),
    ({"max_failure_rate": -1.0}, "val_accuracy",
     "hydra.sweeper.max_failure_rate=-1.0: use a fraction from 0 to 1"),
    ({"sampler": {"_target_": "optuna.samplers.TPESampler", "seed": -1}}, "val_accuracy",
     "hydra.sweeper.sampler.seed=-1: use an integer from 0 to 4294967295, or null"),
    ({"sampler": {"_target_": "optuna.samplers.TPESampler", "prior_weight": float("nan")}},
     "val_accuracy", "hydra.sweeper.sampler='TPESampler': Optuna fails on its settings: "
     "probabilities contain NaN"),
    ({"sampler": {"_target_": "optuna.samplers.GridSampler", "_partial_": True}},
     "val_accuracy", "hydra/sweeper/sampler='GridSampler': optuna_search draws trials one at"),
    ({"params": {"optimizer.lr": "tag(log, interval(0, 0.1))"}}, "val_accuracy",
     "hydra.sweeper.params.optimizer.lr='tag(log, interval(0, 0.1))': not a search space "
     "Optuna accepts"),
])
def test_bad_search_settings_are_refused_in_one_line(settings, metric, message) -> None:
    with pytest.raises(ConfigError) as err:
        pruning.check_search(sweeper(**settings), metric)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["../../..", "..", ".", "", "a/b", None, "x" * 300, "-rf",
                                  "a\\b", "a b", "ü", ".hidden"])
def test_a_study_name_is_one_safe_folder_name(name) -> None:
    with pytest.raises(ConfigError) as err:
        pruning.check_search(sweeper(study_name=name), "val_accuracy")
    assert str(err.value).startswith("hydra.sweeper.study_name=")
    assert "use one folder name" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("settings", [
    {"study_name": "mlp_pruned-2.v1"},
    {"pruner": pruner(HB, min_resource=1, max_resource="auto", reduction_factor=3)},
    {"pruner": pruner(HB, min_resource=2, max_resource=2)},
    {"pruner": pruner(SH, min_resource="auto")},
    {"pruner": pruner(MEDIAN, n_startup_trials=0, n_warmup_steps=0)},
    {"pruner": None, "direction": "minimize"},
    {"sampler": {"_target_": "optuna.samplers.RandomSampler", "seed": 2**32 - 1}},
])
def test_good_search_settings_pass(settings) -> None:
    pruning.check_search(sweeper(**settings), "val_loss")


def test_a_search_without_pruning_may_optimize_a_test_metric() -> None:
    pruning.check_search(sweeper(pruner={"_target_": "optuna.pruners.NopPruner"}),
                         "test_accuracy")


def run(name: str, status: str, value: float | None, pruned: bool = False) -> SimpleNamespace:
    metrics = {} if value is None else {"best_val_accuracy": value}
    return SimpleNamespace(
        info=SimpleNamespace(run_name=name, status=status, start_time=0, end_time=1000,
                             run_id=name),
        data=SimpleNamespace(params={}, metrics=metrics,
                             tags={"pruned": "true"} if pruned else {}))


def test_pruned_runs_are_marked_and_never_ranked_above_finished_ones() -> None:
    runs = [run("a", "FINISHED", 0.80), run("b", "FINISHED", 0.95, pruned=True),
            run("c", "FAILED", None), run("d", "FINISHED", 0.85)]
    rows = leaderboard.rows_of(runs, [], "val_accuracy")
    assert [(r["run"], r["status"]) for r in rows] == [
        ("d", "FINISHED"), ("a", "FINISHED"), ("b", "PRUNED"), ("c", "FAILED")]
    assert leaderboard.counts(rows) == "2 finished, 1 pruned, 1 failed"
    assert leaderboard.counts(rows[:2]) == "2 finished, 0 failed"


def test_the_search_pictures_are_drawn_from_the_study() -> None:
    study = optuna.create_study(direction="maximize")
    for i in range(4):
        trial = study.ask({"lr": FloatDistribution(1e-4, 1e-1, log=True),
                           "dropout": FloatDistribution(0, 0.5)})
        for epoch in (1, 2):
            trial.report(0.5 + 0.1 * i + 0.01 * epoch, epoch)
        study.tell(trial, 0.52 + 0.1 * i)
    figures = optuna_study.figures(study)
    assert sorted(figures) == ["intermediate_values.png", "optimization_history.png",
                               "parallel_coordinate.png", "param_importances.png"]
    assert figures["optimization_history.png"].get_size_inches().tolist() == [9, 5.5]
    curves = figures["intermediate_values.png"].axes[0]
    assert curves.get_xlabel() == "epoch" and curves.get_legend() is not None  # 4 trials
    for i in range(10):  # one diverged trial does not flatten the rest, and is counted
        trial = study.ask()
        trial.report(0.1 if i == 0 else 0.8, 1)
        study.tell(trial, state=TrialState.PRUNED)
    curves = optuna_study.figures(study)["intermediate_values.png"].axes[0]
    assert curves.get_ylim()[0] > 0.4
    assert "(1 values of diverged trials below the axis)" in curves.get_title()


def test_a_trial_just_asked_by_another_worker_is_not_closed_as_stale() -> None:
    study = optuna.create_study()
    study.ask()  # its worker has not recorded itself on it yet
    assert not optuna_study.stale(study.trials[0])
    assert optuna_study.stale(timed(0, None, state=TrialState.RUNNING))  # unowned since long


def test_killed_jobs_are_counted_apart_from_failed_ones() -> None:
    rows = leaderboard.rows_of([run("a", "FINISHED", 0.8), run("b", "KILLED", None),
                                run("c", "FAILED", None)], [], "val_accuracy")
    assert leaderboard.counts(rows) == "1 finished, 1 killed, 1 failed"


def test_a_job_run_left_running_by_a_killed_process_ends_killed(tmp_path) -> None:
    import subprocess
    import sys

    import mlflow

    from fashion_exp import procs
    from fashion_exp.files import write_json
    from fashion_exp.sweeps import multirun, search_loop

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fashion_exp", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    write_json(tmp_path / multirun.STATE_FILE, {"run_id": parent, "tracking_uri": uri,
                                                "experiment_id": exp, "swept_keys": []})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = {"host": procs.this_process()["host"], "pid": str(gone.pid),
            "started": procs.start_time(gone.pid) or "0"}
    gone.wait()

    def child(name: str, owner: dict[str, str]) -> str:
        tags = {"sweep_id": parent, "sweep": "child"} | {f"process.{k}": v
                                                         for k, v in owner.items()}
        return client.create_run(exp, run_name=name, tags=tags).info.run_id

    killed, alive = child("killed", dead), child("alive", procs.this_process())
    elsewhere = child("elsewhere", dead | {"host": "another-host"})
    client.log_metric(killed, "epoch/val_accuracy", 0.7, timestamp=1_000, step=1)
    client.log_metric(killed, "epoch/val_accuracy", 0.8, timestamp=2_000, step=2)
    assert search_loop.end_orphaned_jobs(tmp_path) == 1
    ended = client.get_run(killed)
    assert ended.info.status == "KILLED" and ended.info.end_time == 2_000
    assert "killed" in ended.data.tags["error"]
    assert client.get_run(alive).info.status == "RUNNING"  # its process still runs
    assert client.get_run(elsewhere).info.status == "RUNNING"  # cannot be checked from here
    assert client.get_run(parent).info.status == "RUNNING"
    assert search_loop.end_orphaned_jobs(tmp_path) == 0
