"""Tracking helpers: URIs, flattened params, and the final status of every run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from fashion_exp.config import flatten
from fashion_exp.paths import PACKAGE_PARENT
from fashion_exp.tracking import store, store_checks


def test_flatten_uses_dot_keys_and_resolves() -> None:
    cfg = OmegaConf.create({"optimizer": {"lr": 0.02}, "model": {"hidden": [256, 128]},
                            "data": {"dir": None, "n": "${optimizer.lr}"}})
    assert flatten(cfg) == {"optimizer.lr": "0.02", "model.hidden": "[256, 128]",
                                     "data.dir": "null", "data.n": "0.02"}


def test_relative_uris_become_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store_checks.resolve_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path}/rel/m.db"
    assert store_checks.resolve_uri("store") == (tmp_path / "store").as_uri()
    assert store_checks.resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    default = store_checks.resolve_uri(None)
    assert default == f"sqlite:///{PACKAGE_PARENT / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert store_checks.resolve_uri(None) == f"sqlite:///{tmp_path}/env.db"


@pytest.fixture
def experiment(tracking_uri: str) -> str:
    exp_id = store.setup(tracking_uri, "statuses")
    mlflow.set_tracking_uri(tracking_uri)  # the test's own reads of the store
    yield exp_id
    while mlflow.active_run():
        mlflow.end_run()


def _only_run(exp_id: str):
    runs = mlflow.search_runs([exp_id], output_format="list")
    assert len(runs) == 1
    return runs[0]


def test_artifacts_live_beside_the_database(tracking_uri, experiment) -> None:
    location = mlflow.get_experiment(experiment).artifact_location
    assert location == (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


def test_finished(tracking_uri, experiment) -> None:
    with store.tracked_run(tracking_uri, experiment, "ok", {"k": "v"}) as run:
        run.log_metrics({"m": 1.0}, 0)
    run = _only_run(experiment)
    assert (run.info.status, run.info.run_name, run.data.tags["k"]) == ("FINISHED", "ok", "v")
    assert run.data.metrics["m"] == 1.0
    assert run.data.tags["mlflow.source.type"] == "LOCAL"  # MLflow's own run-context tags


def test_failed_records_the_error(tracking_uri, experiment) -> None:
    with pytest.raises(ZeroDivisionError):
        with store.tracked_run(tracking_uri, experiment, "bad", {}):
            1 / 0  # noqa: B018
    run = _only_run(experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ZeroDivisionError: division by zero"
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")
    assert "1 / 0" in text


def test_sigterm_ends_killed(tracking_uri, experiment, monkeypatch) -> None:
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    with pytest.raises(KeyboardInterrupt):
        with store.tracked_run(tracking_uri, experiment, "term", {}):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # let the handler run
    assert _only_run(experiment).info.status == "KILLED"


def test_a_stop_that_surfaces_as_another_error_ends_killed(tracking_uri, experiment,
        monkeypatch) -> None:
    """A SIGTERM whose KeyboardInterrupt a library swallowed and replaced by its own error
    (TensorFlow inside its ops): the run ends KILLED and the stop is what is raised (exit 130
    at the command line), not the error."""
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM") as raised:
        with store.tracked_run(tracking_uri, experiment, "swallowed", {}):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0)  # let the handler run
            except KeyboardInterrupt:
                raise RuntimeError("cancelled") from None  # what the library raises instead
    assert isinstance(raised.value.__cause__, RuntimeError)
    run = _only_run(experiment)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["error"]


def test_a_stop_with_its_own_reason_is_not_replaced_by_later_signals(monkeypatch) -> None:
    """SLURM's requeue: the stop keeps its reason when SLURM's SIGTERM follows it."""
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    monkeypatch.setattr(interrupts, "_stopping", False)
    before = signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        stop = interrupts.stopping("SLURM requeued the job")
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # the handler runs, and raises nothing
        with pytest.raises(KeyboardInterrupt, match="SLURM requeued the job"):
            interrupts.check()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert str(stop) == "SLURM requeued the job"


def test_a_stop_during_a_store_write_waits_for_the_write(tracking_uri, experiment,
        monkeypatch) -> None:
    """Ctrl-C while a metric is written, and again while the error tag is: the metric is
    kept, and the run still ends KILLED."""
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        with store.tracked_run(tracking_uri, experiment, "cut", {}) as run:
            write = run.client.log_batch

            def interrupted(*args, **kwargs):  # Ctrl-C in the middle of every write
                signal.raise_signal(signal.SIGINT)  # the handler runs before this returns
                return write(*args, **kwargs)

            monkeypatch.setattr(run.client, "log_batch", interrupted)
            run.log_metrics({"m": 1.0}, 1)
            pytest.fail("the stop was not raised when the write ended")
    run = _only_run(experiment)
    assert (run.info.status, run.data.metrics["m"]) == ("KILLED", 1.0)


def test_a_stop_while_the_run_starts_ends_it_killed(tracking_uri, experiment, monkeypatch) -> None:
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    create = mlflow.MlflowClient.create_run

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the run is created
        signal.raise_signal(signal.SIGINT)
        return create(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", interrupted)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        with store.tracked_run(tracking_uri, experiment, "early", {}):
            pytest.fail("a stopped run's body ran")
    assert _only_run(experiment).info.status == "KILLED"


def test_a_stop_while_the_run_finishes_lets_it_finish(tracking_uri, experiment,
        monkeypatch) -> None:
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    with store.tracked_run(tracking_uri, experiment, "last", {}) as run:
        end = run.client.set_terminated

        def interrupted(*args, **kwargs):  # Ctrl-C while the run is set FINISHED
            signal.raise_signal(signal.SIGINT)
            return end(*args, **kwargs)

        monkeypatch.setattr(run.client, "set_terminated", interrupted)
    assert _only_run(experiment).info.status == "FINISHED"
    with pytest.raises(KeyboardInterrupt):  # remembered: a sweep starts no next job
        interrupts.check()


def test_a_second_stop_inside_a_deferred_section_stops_at_once(monkeypatch) -> None:
    from fashion_exp import interrupts

    monkeypatch.setattr(interrupts, "_requested", None)
    interrupts.install()
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("the first stop waited")
            signal.raise_signal(signal.SIGINT)
            done.append("the second stop waited")
    assert done == ["the first stop waited"]
    with pytest.raises(KeyboardInterrupt, match="SIGINT") as stopped:
        with interrupts.deferred():  # a stop and then a failure: the stop is what is raised
            signal.raise_signal(signal.SIGINT)
            raise OSError("disk full")
    assert isinstance(stopped.value.__cause__, OSError)


@pytest.mark.slow  # four processes
def test_parallel_first_use_of_a_fresh_store_does_not_corrupt_it(tmp_path) -> None:
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = ("import sys, mlflow; from fashion_exp.tracking import store; "
            "store.setup(sys.argv[1], 'shared'); mlflow.set_tracking_uri(sys.argv[1]); "
            "mlflow.set_experiment('shared'); "
            "mlflow.start_run(); mlflow.log_metric('m', 1); mlflow.end_run()")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["shared"], output_format="list")
    assert len(runs) == 4 and all(r.data.metrics["m"] == 1 for r in runs)


def test_a_run_whose_creation_answer_was_lost_is_not_created_twice(tracking_uri, experiment,
                                                                    monkeypatch) -> None:
    """The server created the run, then its answer was lost (a timeout, the server gone): the
    run is found again once the server is back, not created a second time (that one would
    stay RUNNING for good)."""
    from omegaconf import OmegaConf
    from requests.exceptions import ReadTimeout

    created = []
    create_run = mlflow.MlflowClient.create_run

    def lost_answer(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        created.append(run.info.run_id)
        if len(created) == 1:
            raise mlflow.exceptions.MlflowException("API request failed") from ReadTimeout("x")
        return run

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", lost_answer)
    monkeypatch.setattr(store, "server_gone", lambda uri, err: True)  # as a server would be
    monkeypatch.setattr(store, "wait_for_server", lambda *args: None)
    cfg = OmegaConf.create({"reconnect_seconds": 1, "connect_timeout": 1})
    with store.tracked_run(tracking_uri, experiment, "once", {}, cfg=cfg) as run:
        run.log_metrics({"m": 1.0}, 0)
    assert created[:1] == [_only_run(experiment).info.run_id]  # the first, and only it
    assert _only_run(experiment).info.status == "FINISHED"
