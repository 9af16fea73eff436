"""The pieces that keep a run whole through a tracking-server outage, without a real server:
the outbox, the server probe, waiting for a server, and a sweep left to finish."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from fashion_exp.files import read_json, write_json
from fashion_exp.sweeps import multirun
from fashion_exp.tracking import store
from fashion_exp.tracking.offline import JOURNAL, Outbox, failed_in_transit, pending
from fashion_exp.tracking.store_checks import STORE_PROBE, server_problem


def dead_uri() -> str:
    """A tracking URI on which nothing listens."""
    from devtools.servers import free_port

    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def fake_server(health: int = 200, store_status: int = 200,
                statuses: dict[str, int] | None = None) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers /health and the store probe with the given
    statuses (or those in `statuses`, which may change meanwhile), as an MLflow server whose
    database is up or gone would. A "store_next" status takes over once the store probe has
    been answered once."""
    statuses = statuses if statuses is not None else {"health": health, "store": store_status}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            code = statuses["health"] if self.path == "/health" else statuses["store"]
            if self.path not in ("/health", STORE_PROBE):
                code = 404
            if self.path == STORE_PROBE and "store_next" in statuses:
                statuses["store"] = statuses.pop("store_next")
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_that_cannot_be_sent_is_kept_even_as_the_first_thing_kept(tmp_path) -> None:
    """The first call to fail writes its file into the run's folder, which does not exist
    yet (a model logged as the server dies was lost: FileNotFoundError)."""
    outbox = Outbox(dead_uri(), "r" * 32, tmp_path / "offline")

    def live() -> None:
        raise ConnectionError("server gone")

    def entry(folder: Path) -> dict:
        (folder / "model.keras").write_bytes(b"weights")
        return {"kind": "model", "file": "model.keras", "registered_name": None, "step": 2}

    outbox.send(live, entry)
    folder = tmp_path / "offline" / ("r" * 32)
    assert (folder / "model.keras").read_bytes() == b"weights"
    assert [e["kind"] for e in pending(folder)] == ["model"]
    assert read_json(folder / "run.json")["run_id"] == "r" * 32
    assert outbox.offline


def test_an_error_the_server_answers_is_not_kept(tmp_path) -> None:
    with fake_server() as uri:
        outbox = Outbox(uri, "r" * 32, tmp_path / "offline")
        with pytest.raises(ValueError, match="refused"):
            outbox.send(lambda: (_ for _ in ()).throw(ValueError("refused")), lambda f: {})
    assert not (tmp_path / "offline").exists()


def test_a_server_whose_store_fails_is_an_outage(tmp_path) -> None:
    with fake_server(store_status=503) as uri:
        assert server_problem(uri) == "answers but its store fails (HTTP 503)"
        outbox = Outbox(uri, "r" * 32, tmp_path / "offline")
        outbox.send(lambda: (_ for _ in ()).throw(OSError("500s")),
                    lambda folder: {"kind": "tags", "tags": {"a": "b"}})
    assert (tmp_path / "offline" / ("r" * 32) / JOURNAL).is_file()


def mlflow_error_from(cause: BaseException) -> Exception:
    """The error MLflow's client raises for an HTTP failure: an MlflowException raised while
    handling the HTTP library's error, without `from` (mlflow/utils/rest_utils.py)."""
    from mlflow.exceptions import MlflowException

    try:
        raise cause
    except BaseException:  # noqa: BLE001 - re-raised as MLflow does, chained implicitly
        try:
            raise MlflowException(f"API request failed with exception {cause}")  # noqa: B904
        except MlflowException as err:
            return err


def http_error(status: int) -> requests.HTTPError:
    """requests' error for an HTTP answer with this status."""
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


@pytest.mark.parametrize(("cause", "outage"), [
    (requests.exceptions.RetryError("too many 503 error responses"), True),
    (requests.ConnectionError("connection refused"), True),
    (requests.Timeout("read timed out"), True),
    (ConnectionResetError("reset by peer"), True),
    (http_error(502), True),
    (http_error(403), False),
    (ValueError("not an HTTP error"), False),
])
def test_failed_in_transit_reads_the_error_mlflow_wraps(cause, outage) -> None:
    assert failed_in_transit(mlflow_error_from(cause)) is outage
    assert failed_in_transit(cause) is outage


def test_a_failure_that_is_over_before_the_probe_is_still_kept(tmp_path) -> None:
    """The database behind the server was down for the call and up again a second later,
    when the server was asked: the call is kept for later, not raised (a run ended FAILED)."""
    with fake_server() as uri:
        outbox = Outbox(uri, "r" * 32, tmp_path / "offline")
        error = mlflow_error_from(requests.exceptions.RetryError("too many 503 error responses"))
        outbox.send(lambda: (_ for _ in ()).throw(error),
                    lambda folder: {"kind": "tags", "tags": {"a": "b"}})
        assert [e["kind"] for e in pending(tmp_path / "offline" / ("r" * 32))] == ["tags"]
        refused = mlflow_error_from(http_error(403))
        with pytest.raises(type(refused), match="403"):
            Outbox(uri, "s" * 32, tmp_path / "offline").send(
                lambda: (_ for _ in ()).throw(refused), lambda folder: {})


@pytest.mark.parametrize(("health", "store_status", "problem"), [
    (200, 200, None),
    (200, 401, None),  # authentication: the caller's error, not an outage
    (200, 500, "answers but its store fails (HTTP 500)"),
    (503, 200, "GET /health answered 503"),
])
def test_server_problem(health, store_status, problem) -> None:
    with fake_server(health, store_status) as uri:
        assert server_problem(uri) == problem


def test_server_problem_of_a_server_that_is_not_there() -> None:
    assert server_problem(dead_uri(), timeout=1) == "does not answer (GET /health)"


def test_waiting_for_a_server_that_stays_away_ends_in_one_line(caplog) -> None:
    uri = dead_uri()
    with pytest.raises(store.TrackingUnavailable) as caught:
        store.wait_for_server(uri, 1.0, timeout=0.5)
    assert str(caught.value) == (f"the tracking server {uri} does not answer (GET /health); "
                                 "start it (e.g. python scripts/team_stack.py start) or set "
                                 "tracking.uri")
    assert "waiting up to 1 s for it <tracking.reconnect_seconds>" in caplog.text


def test_waiting_for_a_server_whose_store_comes_back(caplog) -> None:
    with fake_server(statuses={"health": 200, "store": 500, "store_next": 200}) as uri:
        store.wait_for_server(uri, 30.0)
    assert "answers but its store fails (HTTP 500); waiting up to 30 s" in caplog.text
    assert f"the tracking server {uri} is back" in caplog.text


def test_a_server_that_answers_is_not_waited_for(caplog) -> None:
    with fake_server() as uri:
        store.wait_for_server(uri, 30.0)
    assert "waiting" not in caplog.text


def test_a_sweep_whose_server_is_away_at_its_end_is_kept_for_upload(tmp_path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    uri = dead_uri()
    write_json(sweep_dir / multirun.STATE_FILE, {
        "run_id": "p" * 32, "tracking_uri": uri, "experiment_id": "1", "swept_keys": ["a"],
        "shared": False, "reconnect_seconds": 0, "offline_root": str(tmp_path / "offline")})
    assert multirun.finish_parent(sweep_dir) is None
    kept = tmp_path / "offline" / f"sweep-{'p' * 32}"
    assert read_json(kept / multirun.PENDING_FILE) == {"sweep_dir": str(sweep_dir),
                                                       "interrupted": False}
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"fashion-exp-train: the tracking server {uri} did not come back")
    assert line.endswith(f"sweep {'p' * 32} is left RUNNING; finish it with: "
                         f"fashion-exp-runs upload {kept}")


class _RetriedBatch:
    """A client whose log_batch fails the way a retried request does on a database server
    (the first try was written, the retry hits the unique key), then passes reads through."""

    def __init__(self, client) -> None:
        self.client = client

    def log_batch(self, *args, **kwargs) -> None:
        from mlflow.exceptions import MlflowException

        raise MlflowException('duplicate key value violates unique constraint "param_pk"')

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_retried_batch_already_written_counts_as_done_and_any_other_fails(tmp_path) -> None:
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    from fashion_exp.tracking.offline import log_batch_once

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("retried")).info.run_id
    written = dict(metrics=[Metric("loss", 0.5, 1, 1), Metric("loss", 0.25, 2, 2)],
                   params=[Param("optimizer.lr", "0.02")], tags=[RunTag("note", "a")])
    log_batch_once(client, run_id, **written)  # an ordinary batch goes through
    retried = _RetriedBatch(client)
    log_batch_once(retried, run_id, **written)  # every value already there: done
    for missing in (dict(params=[Param("optimizer.lr", "0.05")]),  # another value
                    dict(params=[Param("trainer.epochs", "3")]),  # a param not written
                    dict(tags=[RunTag("note", "b")]),
                    dict(metrics=[Metric("loss", 0.25, 3, 3)]),  # a step not written
                    dict(metrics=[Metric("loss", 0.3, 2, 2)])):  # another value at a step
        with pytest.raises(MlflowException, match="duplicate key"):
            log_batch_once(retried, run_id, **missing)
