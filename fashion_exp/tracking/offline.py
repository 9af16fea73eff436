"""A run's data kept on local disk while the tracking server is unreachable, and sent when the
server is back, so that a server outage neither crashes training nor loses a run.

Each logging call of the runner goes through `Outbox.send`: it is made live when it can be;
when it fails because the server does not answer, it is appended to a journal in
`<offline_dir>/<run_id>/` (files it logs are copied there) and every later call joins the
queue until the server answers again, then the journal is replayed in order. What is still
queued when the run ends waits `tracking.reconnect_seconds`, then stays on disk for
`fashion-exp-runs upload`. Replay records how far it got, so no entry is sent twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from fashion_exp.files import read_json, write_json
from fashion_exp.tracking.store_checks import server_up
from fashion_exp.uris import is_server

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
SENT = "sent.txt"  # number of journal entries already replayed
RUN_FILE = "run.json"  # tracking URI and run id of the journal
RECHECK_SECONDS = 10.0  # while offline, ask the server again at most this often


def server_gone(uri: str, err: BaseException) -> bool:
    """After a logging call failed with `err`: whether the server is unreachable (the call is
    then kept for later) rather than refusing the request (the error is then the caller's to
    see). The error itself tells when it can; an outage as short as the call (a database back
    a second later) must still count as one, so the probe comes only after."""
    return is_server(uri) and (failed_in_transit(err) or not server_up(uri))


def failed_in_transit(err: BaseException) -> bool:
    """Whether an error, or one it was raised from, says the server did not answer, timed out
    or failed on its side (HTTP 5xx); an HTTP 4xx is a refusal. MLflow's client wraps the
    HTTP library's error in an MlflowException, often without `from`: both links are read."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, requests.HTTPError):
            return seen.response is not None and seen.response.status_code >= 500
        if isinstance(seen, (requests.ConnectionError, requests.Timeout,
                             requests.exceptions.RetryError, ConnectionError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def pending(folder: Path) -> list[dict[str, Any]]:
    """The journal entries of an offline folder not replayed yet."""
    journal = folder / JOURNAL
    if not journal.is_file():
        return []
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return entries[_sent(folder):]


def _sent(folder: Path) -> int:
    """How many journal entries of an offline folder were replayed already."""
    return int((folder / SENT).read_text()) if (folder / SENT).is_file() else 0


def log_batch_once(client: MlflowClient, run_id: str, metrics: list[Metric] = (),
                   params: list[Param] = (), tags: list[RunTag] = ()) -> None:
    """client.log_batch, safe to have been retried.

    MLflow's client retries a request that timed out (tracking.request_timeout) while the
    server may still be carrying out the first try; on a database server the two then insert
    the same rows and the second fails ("duplicate key value violates unique constraint").
    A failed batch whose every value is already in the run was written by such a first try
    and counts as done; any other failure is raised."""
    try:
        client.log_batch(run_id, metrics=list(metrics), params=list(params), tags=list(tags))
    except MlflowException:
        if not _already_logged(client, run_id, metrics, params, tags):
            raise
        log.debug("run %s: a retried log_batch found its values already written", run_id)


def _already_logged(client: MlflowClient, run_id: str, metrics: Any, params: Any,
                    tags: Any) -> bool:
    """Whether the run holds every param and tag with these values, and every metric value
    at its step."""
    data = client.get_run(run_id).data
    if any(data.params.get(p.key) != p.value for p in params) or \
            any(data.tags.get(t.key) != t.value for t in tags):
        return False
    history: dict[str, set[tuple[int, float]]] = {}
    for m in metrics:
        if m.key not in history:
            history[m.key] = {(h.step, h.value) for h in client.get_metric_history(run_id, m.key)}
        if (m.step, m.value) not in history[m.key]:
            return False
    return True


def apply(client: MlflowClient, run_id: str, folder: Path, entry: dict[str, Any]) -> None:
    """Make one logging call of a run: a journal entry, whose files are under `folder`. The
    recorder's live calls and the journal's replay both come through here."""
    kind = entry["kind"]
    if kind == "metrics":
        log_batch_once(client, run_id, metrics=[
            Metric(key, value, entry["timestamp"], entry["step"])
            for key, value in entry["metrics"].items()])
    elif kind == "params":
        log_batch_once(client, run_id, params=[Param(k, v) for k, v in entry["params"].items()])
    elif kind == "tags":
        log_batch_once(client, run_id, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
    elif kind == "artifact":
        path = folder / entry["file"]
        if path.is_dir():  # a folder's files go under artifact_path itself
            client.log_artifacts(run_id, str(path), entry["artifact_path"])
        else:
            client.log_artifact(run_id, str(path), entry["artifact_path"])
    elif kind == "model":  # needs TensorFlow: imported only when a model is logged
        from fashion_exp.tracking import logged_models

        logged_models.log_saved_keras(str(folder / entry["file"]), client.tracking_uri, run_id,
                                      entry["registered_name"], entry.get("step", 0))
        logged_models.fail_unfinished(client, run_id)  # a live try cut short by the outage
    elif kind == "end":
        client.set_terminated(run_id, entry["status"])
    else:
        raise ValueError(f"unknown journal entry {kind!r}")


def replay(folder: Path) -> int:
    """Send an offline folder's remaining entries to its server, in order; returns how many.
    The folder is removed once everything is sent."""
    info = read_json(folder / RUN_FILE)
    client, run_id = MlflowClient(info["tracking_uri"]), info["run_id"]
    entries = pending(folder)
    sent = _sent(folder)
    for entry in entries:
        apply(client, run_id, folder, entry)
        sent += 1
        (folder / SENT).write_text(str(sent))
    shutil.rmtree(folder)
    return len(entries)


class Outbox:
    """The logging path of one run on a tracking server: live calls, or a journal on disk."""

    def __init__(self, uri: str, run_id: str, root: Path) -> None:
        self.uri = uri
        self.run_id = run_id
        self.folder = root / run_id
        self._last_check = 0.0

    @property
    def offline(self) -> bool:
        """Whether entries are waiting in the journal."""
        return bool(pending(self.folder)) if self.folder.is_dir() else False

    def send(self, live: Callable[[], Any], entry: Callable[[Path], dict[str, Any]]) -> None:
        """Make a logging call, or journal it (entry(folder) writes its files and returns the
        journal line) when the server is unreachable or earlier entries still wait."""
        if self.offline and not self.try_flush():
            self._keep(entry)
            return
        try:
            live()
        except Exception as err:
            if not server_gone(self.uri, err):
                raise
            log.warning("tracking server %s unreachable (%s); run %s goes on, its data is kept "
                        "in %s until the server is back", self.uri, type(err).__name__,
                        self.run_id, self.folder)
            self._keep(entry)

    def try_flush(self, force: bool = False) -> bool:
        """Replay the journal if the server answers (checked at most every 10 s unless
        forced); True when nothing is left waiting."""
        now = time.monotonic()
        if not force and now - self._last_check < RECHECK_SECONDS:
            return False
        self._last_check = now
        if not server_up(self.uri):
            return False
        try:
            count = replay(self.folder)
        except Exception as err:  # noqa: BLE001 - the server went away again mid-replay
            log.warning("tracking server %s: sending the buffered data failed again (%s)",
                        self.uri, err)
            return False
        log.warning("tracking server %s is back: %d buffered entries of run %s sent",
                    self.uri, count, self.run_id)
        return True

    def finish(self, wait_seconds: float) -> bool:
        """At the run's end: wait up to `wait_seconds` for the server to take what is queued.
        True if everything was sent; otherwise the data stays on disk and the user is told."""
        deadline = time.monotonic() + wait_seconds
        while self.offline:
            if self.try_flush(force=True):
                return True
            if time.monotonic() >= deadline:
                print(f"fashion-exp-train: the tracking server {self.uri} did not come back; "
                      f"run {self.run_id} is kept in {self.folder}; send it with: "
                      f"fashion-exp-runs upload {self.folder}", flush=True)
                return False
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        return True

    def _keep(self, entry: Callable[[Path], dict[str, Any]]) -> None:
        """Journal one call: its files written into the run's folder (made here, the first time
        anything is kept), then its line appended."""
        self.folder.mkdir(parents=True, exist_ok=True)
        line = entry(self.folder)
        run_file = self.folder / RUN_FILE
        if not run_file.is_file():
            write_json(run_file, {"tracking_uri": self.uri, "run_id": self.run_id})
        with open(self.folder / JOURNAL, "a") as journal:
            journal.write(json.dumps(line) + "\n")
