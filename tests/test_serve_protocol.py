"""The service as MLflow's scoring servers are used, against real servers: the same requests
to `mlflow models serve` and to fashion-exp-serve, MLflow's own scoring client, a registry
alias moved under load, and a SIGTERM while requests are in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlflow
import numpy as np
import pytest

from devtools import servers
from fashion_exp.core import data

from .helpers import probabilities, real_data_dir

pytestmark = pytest.mark.slow  # real servers, each started in a subprocess


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return data.read_idx(real_data_dir() / data.FILES["x_test"])[:8]


def protocol_requests(images: np.ndarray) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of what a client of MLflow's scoring server may send."""
    one, batch = images[:1].tolist(), images.tolist()
    as_json = [
        ("inputs", {"inputs": batch}),
        ("instances", {"instances": one}),
        ("floats", {"inputs": (images[:2] / 1.0).tolist()}),  # 0-255 as floats: cast
        ("params and other keys", {"inputs": one, "params": {}, "other": 1}),
        ("one image, not a list of them", {"inputs": one[0]}),
        ("empty", {"inputs": []}),
        ("wrong width", {"inputs": [[row[:27] for row in one[0]]]}),
        ("flat", {"inputs": [sum(one[0], [])]}),
        ("dataframe", {"dataframe_split": {"columns": ["a"], "data": [[1]]}}),
        ("named", {"inputs": {"x": one}}),
        ("257", {"inputs": [[[257] * 28] * 28]}),
        ("negative", {"inputs": [[[-3] * 28] * 28]}),
        ("text", {"inputs": [[["x"] * 28] * 28]}),
        ("digits as text", {"inputs": [[["7"] * 28] * 28]}),
        ("a float as text", {"inputs": [[["12.5"] * 28] * 28]}),
        ("NaN", {"inputs": [[[float("nan")] * 28] * 28]}),
        ("ragged", {"inputs": [one[0][:27] + [one[0][27][:5]]]}),
        ("both keys", {"inputs": one, "instances": one}),
        ("no key", {"images": one}),
        ("a list", one),
    ]
    cases = [(name, json.dumps(body).encode(), "application/json") for name, body in as_json]
    return cases + [
        ("not JSON", b'{"inputs": [', "application/json"),
        ("not UTF-8", b'{"inputs": "\xff"}', "application/json"),
        ("UTF-16", json.dumps({"inputs": one}).encode("utf-16"), "application/json"),
        ("charset", json.dumps({"inputs": one}).encode(), "application/json; charset=latin-1"),
        ("plain text", b"hello", "text/plain"),
        ("csv", b"a,b\n1,2\n", "text/csv"),
    ]


def test_invocations_answer_as_mlflow_models_serve(served_store, images, tmp_path) -> None:
    uri, run_id = served_store
    model_uri = f"runs:/{run_id}/model"
    ours, theirs = servers.free_port(), servers.free_port()
    env = {"MLFLOW_TRACKING_URI": uri}
    with servers.running(servers.serve_command(model_uri, ours, uri, "samples=false"),
                         f"http://127.0.0.1:{ours}/ping", tmp_path / "ours.log", env), \
         servers.running(servers.mlflow_serve_command(model_uri, theirs),
                         f"http://127.0.0.1:{theirs}/ping", tmp_path / "mlflow.log", env):
        answers = {}
        for name, body, content_type in protocol_requests(images):
            answers[name] = [httpx.post(f"http://127.0.0.1:{port}/invocations", content=body,
                                        headers={"Content-Type": content_type}, timeout=30)
                             for port in (ours, theirs)]
        predicted = httpx.post(f"http://127.0.0.1:{ours}/predict?top_k=10",
                               json={"images": images.tolist()}, timeout=30).json()
        # MLflow's own client for its scoring servers, pointed at ours, then at MLflow's.
        from mlflow.pyfunc.scoring_server.client import ScoringServerClient

        by_client = []
        for port in (ours, theirs):
            client = ScoringServerClient("127.0.0.1", port)
            client.wait_server_ready(timeout=10)
            by_client.append((client.get_version(), client.invoke(images).get_predictions()))
        versions = [httpx.get(f"http://127.0.0.1:{p}/version").text for p in (ours, theirs)]
    assert versions[0] == versions[1] == mlflow.__version__
    for name, (mine, mlflows) in answers.items():
        assert mine.status_code == mlflows.status_code, (name, mine.text, mlflows.text[:300])
        if mine.status_code == 200:
            np.testing.assert_allclose(mine.json()["predictions"], mlflows.json()["predictions"],
                                       atol=1e-6, err_msg=name)
            assert mine.headers["X-Model-Id"].startswith("m-")
        elif mine.status_code == 400:
            assert mine.json()["error_code"] == mlflows.json()["error_code"], name
        else:  # 415: both in plain text
            assert mine.headers["content-type"].split(";")[0] == "text/plain"
            assert mlflows.headers["content-type"].split(";")[0] == "text/plain"
    # /predict gives the same probabilities (rounded to 6 places in its JSON).
    np.testing.assert_allclose([probabilities(p) for p in predicted["predictions"]],
                               answers["inputs"][1].json()["predictions"], atol=1e-6)
    assert by_client[0][0] == by_client[1][0]
    np.testing.assert_allclose(np.asarray(by_client[0][1]), np.asarray(by_client[1][1]),
                               atol=1e-6)


def second_model(uri: str, run_id: str) -> str:
    """A second model in the store, different from the served run's (its last layer's bias
    shifted towards class 9), logged by a run of its own: that run's id."""
    import keras

    from fashion_exp.tracking import logged_models

    mlflow.set_tracking_uri(uri)
    ref = logged_models.resolve(mlflow.MlflowClient(uri), f"runs:/{run_id}/model")
    model = keras.models.clone_model(logged_models.load_keras(ref))
    model.set_weights(logged_models.load_keras(ref).get_weights())
    last = model.layers[-1]
    kernel, bias = last.get_weights()
    bias[9] += 5.0
    last.set_weights([kernel, bias])
    client = mlflow.MlflowClient(uri)
    # An experiment of its own: the "serve" experiment's best run stays the other tests' model.
    # (Set as the active one: MLflow creates a logged model in the active experiment.)
    experiment = mlflow.set_experiment("serve_alias")
    run = client.create_run(experiment.experiment_id, run_name="shifted")
    logged_models.log_keras(model, uri, run.info.run_id, None, 0)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_a_moved_alias_is_served_without_a_restart_or_a_failed_request(served_store, images,
                                                                      tmp_path) -> None:
    uri, run_id = served_store
    client = mlflow.MlflowClient(uri)
    shifted = second_model(uri, run_id)
    name = "fashion_alias"
    mlflow.set_tracking_uri(uri)
    v1 = mlflow.register_model(f"runs:/{run_id}/model", name)
    v2 = mlflow.register_model(f"runs:/{shifted}/model", name)
    client.set_registered_model_alias(name, "champion", v1.version)
    port = servers.free_port()
    base = f"http://127.0.0.1:{port}"
    body = {"inputs": images[:1].tolist()}
    with servers.running(servers.serve_command(f"models:/{name}@champion", port, uri,
                                               "samples=false", "follow_seconds=0.5"),
                         f"{base}/ping", tmp_path / "serve.log"):
        expected = {}
        for version in (str(v1.version), str(v2.version)):
            # The probabilities each version gives, asked by version (not by the alias).
            answer = httpx.post(f"{base}/predict", timeout=30,
                                params={"model": f"models:/{name}/{version}", "top_k": 10},
                                json={"images": body["inputs"]}).json()
            expected[version] = probabilities(answer["predictions"][0])
        assert not np.allclose(expected["1"], expected["2"], atol=1e-3)
        answers, stop = [], threading.Event()

        def load() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                while not stop.is_set():
                    answer = http.post("/invocations", json=body)
                    answers.append((answer.status_code, answer.headers.get("X-Model-Version"),
                                    answer.json().get("predictions")))

        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(load) for _ in range(4)]
            time.sleep(1.0)
            client.set_registered_model_alias(name, "champion", v2.version)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not answers or answers[-1][1] != "2"):
                time.sleep(0.2)
            time.sleep(1.0)
            stop.set()
            for stream in streams:
                stream.result()  # a connection error or a non-JSON answer fails the test here
        model = httpx.get(f"{base}/model").json()
        metrics = httpx.get(f"{base}/metrics").text
    assert {status for status, _, _ in answers} == {200}, answers[:3]
    served = [version for _, version, _ in answers]
    assert served[0] == "1" and served[-1] == "2" and set(served) == {"1", "2"}
    for _, version, predictions in answers:  # each answer is the version it names
        np.testing.assert_allclose(predictions[0], expected[version], atol=1e-5)
    assert model["version"] == "2" and model["follows"]["problem"] is None
    assert "fashion_exp_model_swaps_total 1.0" in metrics


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(served_store, images,
                                                            tmp_path) -> None:
    uri, run_id = served_store
    port = servers.free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    command = servers.serve_command(f"runs:/{run_id}/model", port, uri, "samples=false",
                                    "log_level=info")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ})
    try:
        servers.wait_until_up(proc, f"{base}/ping", 120, log)
        payload = json.dumps({"inputs": images.tolist()}).encode()
        sent_half = threading.Barrier(5)

        def slow_body():
            # Half the body, a pause in which the server is told to stop, then the rest.
            yield payload[:len(payload) // 2]
            sent_half.wait(timeout=30)
            time.sleep(1.0)
            yield payload[len(payload) // 2:]

        def request() -> httpx.Response:
            return httpx.post(f"{base}/invocations", content=slow_body(), timeout=30,
                              headers={"Content-Type": "application/json"})

        def in_progress() -> float:
            text = httpx.get(f"{base}/metrics", timeout=10).text
            line = 'fashion_exp_requests_in_progress{endpoint="/invocations"} '
            return sum(float(x.removeprefix(line)) for x in text.splitlines()
                       if x.startswith(line))

        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(request) for _ in range(4)]
            sent_half.wait(timeout=30)
            deadline = time.monotonic() + 30  # the server holds all four: not idle connections
            while in_progress() < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [p.result() for p in pending]
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [a.status_code for a in answers] == [200] * 4
    assert all(len(a.json()["predictions"]) == len(images) for a in answers)
    with pytest.raises(httpx.ConnectError):  # and it no longer listens
        httpx.get(f"{base}/ping")
    assert "Traceback" not in log.read_text()
