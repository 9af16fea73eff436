"""MLflow's scoring protocol, /metrics, a followed alias and the batcher, in-process with
small stand-in models (no TensorFlow): fast tier. The same protocol against a real
`mlflow models serve` is in test_serve_protocol.py."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.serving import scoring
from fashion_exp.serving.batching import Batcher
from fashion_exp.serving.models import ModelUnusable, ServedModel
from fashion_exp.serving.service import create_app
from fashion_exp.tracking.logged_models import ModelRef, UnknownModel

IMAGE = np.arange(784).reshape(28, 28) % 256


def one_hot(index: int, delay: float = 0.0):
    """A stand-in model: every image gets probability 1 for class `index`."""
    def predict(images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        time.sleep(delay)
        probs = np.zeros((len(images), 10), np.float32)
        probs[:, index] = 1.0
        return probs
    return predict


def version(n: int) -> ModelRef:
    return ModelRef("models:/shop@champion", f"run{n}", f"m-{n}", f"file:///v{n}", "shop", str(n))


class Registry:
    """A store with one alias that tests move; version n's model answers class n."""

    def __init__(self, unusable: tuple[int, ...] = (), delay: float = 0.0) -> None:
        self.alias, self.unusable, self.delay, self.loads = 1, unusable, delay, []

    def resolve(self, uri: str) -> ModelRef:
        if uri.startswith("models:/shop/") and uri[13:].isdigit():  # a version by number
            return dataclasses.replace(version(int(uri[13:])), uri=uri)
        if uri != "models:/shop@champion":
            raise UnknownModel(uri)
        return version(self.alias)

    def load(self, ref: ModelRef) -> ServedModel:
        self.loads.append(ref.version)
        if int(ref.version) in self.unusable:
            raise ModelUnusable(ref.uri)
        return ServedModel(ref, ref.run_id, {}, one_hot(int(ref.version), self.delay))


def app_for(registry: Registry, **settings) -> TestClient:
    app = create_app(registry.load(version(1)), registry.resolve, registry.load,
                     Settings(**settings), follow="models:/shop@champion")
    return TestClient(app)


# --- The protocol ------------------------------------------------------------------------------

@pytest.mark.parametrize("payload,status,code", [
    ({"inputs": [IMAGE.tolist()]}, 200, None),
    ({"instances": [IMAGE.tolist(), IMAGE.tolist()]}, 200, None),
    ({"inputs": [IMAGE.tolist()], "params": {"a": 1}, "other": 2}, 200, None),  # ignored keys
    ({"inputs": [(IMAGE / 2).tolist()]}, 200, None),  # floats: cast, as MLflow does
    ({"inputs": [[[True] * 28] * 28]}, 200, None),
    ({"inputs": [[["7"] * 28] * 28]}, 200, None),  # strings of digits: as MLflow converts
    ({"inputs": IMAGE.tolist()}, 400, "INVALID_PARAMETER_VALUE"),  # one image, not a list
    ({"inputs": []}, 400, "INVALID_PARAMETER_VALUE"),
    ({"inputs": 3}, 400, "INVALID_PARAMETER_VALUE"),
    ({"inputs": [[[1] * 27] * 28]}, 400, "INVALID_PARAMETER_VALUE"),
    ({"inputs": [[1] * 784]}, 400, "INVALID_PARAMETER_VALUE"),
    ({"dataframe_split": {"columns": ["a"], "data": [[1]]}}, 400, "INVALID_PARAMETER_VALUE"),
    ({"instances": [{"x": IMAGE.tolist()}]}, 400, "INVALID_PARAMETER_VALUE"),
    ({"inputs": {"x": [IMAGE.tolist()]}}, 400, "BAD_REQUEST"),
    ({"inputs": None}, 400, "BAD_REQUEST"),
    ({"inputs": [[[256] * 28] * 28]}, 400, "BAD_REQUEST"),
    ({"inputs": [[[-1] * 28] * 28]}, 400, "BAD_REQUEST"),
    ({"inputs": [[["a"] * 28] * 28]}, 400, "BAD_REQUEST"),
    ({"inputs": [[["12.5"] * 28] * 28]}, 400, "BAD_REQUEST"),  # int("12.5") fails in MLflow too
    ({"inputs": [[[1] * 28] * 27 + [[1] * 27]]}, 400, "BAD_REQUEST"),  # ragged
    ({"inputs": [[[2 ** 70] * 28] * 28]}, 400, "BAD_REQUEST"),
    ({"inputs": [IMAGE.tolist()], "instances": [IMAGE.tolist()]}, 400, "BAD_REQUEST"),
    ({}, 400, "BAD_REQUEST"),
    ([IMAGE.tolist()], 400, "BAD_REQUEST"),
    (None, 400, "BAD_REQUEST"),
])
def test_invocations_accept_and_refuse_what_mlflow_does(payload, status, code) -> None:
    with app_for(Registry()) as client:
        answer = client.post("/invocations", content=json.dumps(payload),
                             headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    body = answer.json()
    if status == 200:
        assert set(body) == {"predictions"}
        assert np.asarray(body["predictions"]).shape == (len(payload.get("inputs") or
                                                             payload["instances"]), 10)
        assert answer.headers["X-Model-Version"] == "1"
    else:
        assert set(body) == {"error_code", "message"} and body["error_code"] == code
        assert "\n" not in body["message"]


def test_text_in_the_tensor_costs_no_more_memory_than_numbers() -> None:
    # As a numpy string array this body would take 35,000 x 100,000 x 4 bytes (14 GB).
    payload = {"inputs": ["x" * 100_000] + [""] * 35_000}
    with app_for(Registry(), max_images=64) as client:
        answer = client.post("/invocations", json=payload)
    assert answer.status_code == 400 and answer.json()["error_code"] == "BAD_REQUEST"


@pytest.mark.parametrize("pixel", [300.0, -1.5, -0.5, -1e-9, 256.0, float("nan"),
                                   float("inf"), 1e30])
def test_floats_outside_a_byte_are_refused_not_wrapped(pixel) -> None:
    # numpy (and so MLflow) turns 300.0 into an arbitrary byte and -0.5 into 0; refused here:
    # values outside [0, 256) are 400 (docs/serving.md).
    image = IMAGE.astype(float)
    image[5, 7] = pixel
    with app_for(Registry()) as client:  # json.dumps writes NaN and Infinity as JSON allows
        answer = client.post("/invocations", content=json.dumps({"inputs": [image.tolist()]}),
                             headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error_code"] == "BAD_REQUEST"


@pytest.mark.parametrize("content_type,status", [
    ("application/json; charset=UTF-8", 200),
    ("application/json; charset=latin-1", 415),
    ("application/json; format=pandas-split", 415),
    ("text/plain", 415),
    ("text/csv", 400),
    ("text/csv; charset=latin-1", 415),  # MLflow checks the charset first
    (None, 415),  # (MLflow's own server fails on this one with a 500)
])
def test_content_types_as_mlflow_answers_them(content_type, status) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    with app_for(Registry()) as client:
        answer = client.post("/invocations", content=json.dumps({"inputs": [IMAGE.tolist()]}),
                             headers=headers)
    assert answer.status_code == status, answer.text
    if status == 415:
        assert answer.headers["content-type"].startswith("text/plain")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("body,status", [
    (npy(np.stack([IMAGE, IMAGE]).astype(np.uint8)), 200),
    (npy(np.stack([IMAGE]).astype(np.float32) + 0.5), 200),  # truncated, as in JSON
    (npy(np.stack([IMAGE]).astype(np.int64) + 300), 400),  # outside a byte
    (npy(np.stack([IMAGE]).astype(np.float64) * np.nan), 400),
    (npy(IMAGE.astype(np.uint8)), 400),  # one image needs the batch axis: (1, 28, 28)
    (npy(np.array(["a", "b"])), 400),
    (npy(np.zeros((17, 28, 28), np.uint8)), 413),  # max_images is 16
    (b"not an array", 400),
])
def test_invocations_take_one_npy_array(body, status) -> None:
    with app_for(Registry()) as client:
        answer = client.post("/invocations", content=body,
                             headers={"Content-Type": "application/x-npy"})
    assert answer.status_code == status, answer.text
    if status == 200:
        assert np.array(answer.json()["predictions"]).shape[1] == 10


def test_limits_answer_413_before_parsing() -> None:
    with app_for(Registry(), max_images=2) as client:
        three = client.post("/invocations", json={"inputs": [IMAGE.tolist()] * 3})
        empties = client.post("/invocations", json={"inputs": [[]] * 50_000})
        assert empties.status_code == 413  # empty images count too
        huge = client.post("/invocations", content=b"[" * 200_000,
                           headers={"Content-Type": "application/json"})
    assert three.status_code == 413 and "limit is 2" in three.json()["message"]
    assert huge.status_code == 413 and huge.json()["error_code"] == "BAD_REQUEST"


@pytest.mark.parametrize("pixel", [0.0, 255.9, True])
def test_floats_inside_a_byte_are_truncated_as_mlflow_does(pixel) -> None:
    image = IMAGE.astype(object)
    image[5, 7] = pixel
    with app_for(Registry()) as client:
        answer = client.post("/invocations", json={"inputs": [image.tolist()]})
    assert answer.status_code == 200, answer.text


def test_max_images_has_an_upper_bound() -> None:
    from fashion_exp.config import ConfigError

    assert Settings(max_images=256).max_images == 256
    with pytest.raises(ConfigError, match=r"max_images=8000: must be in \[1, 256\]"):
        Settings(max_images=8000)


def test_ping_version_and_model_headers() -> None:
    with app_for(Registry()) as client:
        ping = client.get("/ping")
        assert (ping.status_code, ping.text) == (200, "\n")
        assert client.get("/version").text == scoring.MLFLOW_VERSION
        predicted = client.post("/predict", json={"images": [IMAGE.tolist()]})
    assert predicted.headers["X-Model-URI"] == "models:/shop@champion"
    assert predicted.headers["X-Model-Id"] == "m-1"
    assert predicted.json()["model"]["version"] == "1"


def test_a_model_answer_that_is_not_probabilities_is_a_json_500_never_a_bare_nan(caplog) -> None:
    # A model checked at load time may still overflow on some input (here: a white pixel at
    # the corner) or answer a batch with the wrong shape (here: two images at once).
    def fragile(images: np.ndarray) -> np.ndarray:
        probs = one_hot(2)(images)
        probs[images[:, 0, 0] == 255] = np.nan
        return probs if len(images) < 2 else probs[:, :9]

    ref = version(1)
    app = create_app(ServedModel(ref, "r", {}, fragile), lambda u: ref,
                     lambda r: ServedModel(r, "r", {}, fragile), Settings())
    white_corner = IMAGE.copy()
    white_corner[0, 0] = 255
    with TestClient(app, raise_server_exceptions=False) as client:
        answers = [client.post("/invocations", json={"inputs": [white_corner.tolist()]}),
                   client.post("/invocations", json={"inputs": [IMAGE.tolist()] * 2}),
                   client.post("/predict", json={"images": [white_corner.tolist()]}),
                   client.post("/predict", json={"images": [IMAGE.tolist()] * 2})]
        good = client.post("/invocations", json={"inputs": [IMAGE.tolist()]})
    for answer in answers:
        assert answer.status_code == 500, answer.text
        body = json.loads(answer.text, parse_constant=lambda word: pytest.fail(word))
        assert "NaN" not in answer.text and "the model failed" in str(body)
    assert [set(a.json()) for a in answers[:2]] == [{"error_code", "message"}] * 2
    assert answers[0].json()["error_code"] == "INTERNAL_ERROR"
    assert good.status_code == 200 and np.argmax(good.json()["predictions"][0]) == 2
    problems = [r.getMessage() for r in caplog.records if "on a /" in r.getMessage()]
    assert len(problems) == 4 and all("\n" not in p for p in problems), problems
    assert "not finite" in problems[0] and "(2, 9)" in problems[1]


def test_a_registered_name_of_any_script_fits_in_a_header() -> None:
    ref = ModelRef("models:/модель@prod", "r", "m-x", "file:///x", "модель", "3")
    app = create_app(ServedModel(ref, "r", {}, one_hot(0)), lambda u: ref,
                     lambda r: ServedModel(r, "r", {}, one_hot(0)), Settings())
    with TestClient(app) as client:
        answer = client.post("/invocations", json={"inputs": [IMAGE.tolist()]})
    assert answer.status_code == 200
    assert answer.headers["X-Model-URI"] == "models:/%D0%BC%D0%BE%D0%B4%D0%B5%D0%BB%D1%8C@prod"


@pytest.mark.parametrize("path,body,shape", [
    ("/invocations", {"inputs": [IMAGE.tolist()]}, {"error_code", "message"}),
    ("/predict", {"images": [IMAGE.tolist()]}, {"detail"}),
])
def test_a_request_cut_by_the_drain_gets_a_json_503_and_one_log_line(caplog, path, body,
                                                                     shape) -> None:
    # uvicorn cancels the requests still in flight once drain_seconds have passed.
    import socket
    import threading

    import uvicorn

    from devtools import servers
    from fashion_exp.serving.connections import limited_protocol

    registry = Registry()
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(registry.load(version(1)), registry.resolve, registry.load,
                   Settings(follow_seconds=0)),
        host="127.0.0.1", port=port, log_config=None, access_log=False,
        http=limited_protocol(32768, 10, 60), timeout_graceful_shutdown=0.5))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        payload = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                         + payload[:100])  # the rest never comes
            deadline = time.monotonic() + 10  # until the app has the request, not before
            while not server.server_state.tasks and time.monotonic() < deadline:
                time.sleep(0.01)
            server.should_exit = True
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        server.should_exit = True
        thread.join(10)
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert set(json.loads(content)) == shape and b"shutting down" in content
    assert "Traceback" not in caplog.text and "CancelledError" not in caplog.text
    cut = [r.getMessage() for r in caplog.records if "cut by the shutdown" in r.getMessage()]
    assert len(cut) == 1 and path in cut[0], caplog.text


# --- /metrics ----------------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics answer, parsed by Prometheus' own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_sent() -> None:
    with app_for(Registry()) as client:
        for _ in range(3):
            client.post("/invocations", json={"inputs": [IMAGE.tolist()] * 2})
        client.post("/invocations", json={"inputs": []})
        client.post("/predict", json={"images": [IMAGE.tolist()]})
        client.get("/ping")
        client.get("/no/such/path/12345")
        got = samples(client.get("/metrics").text)

    def requests(endpoint: str, status: str) -> float:
        return got[("fashion_exp_requests_total", (("endpoint", endpoint), ("status", status)))]

    assert requests("/invocations", "200") == 3 and requests("/invocations", "400") == 1
    assert requests("/predict", "200") == 1 and requests("other", "404") == 1
    assert not any("/no/such" in str(labels) for _, labels in got)  # made-up paths: no label
    assert got[("fashion_exp_request_seconds_count", (("endpoint", "/invocations"),))] == 4
    assert got[("fashion_exp_request_images_sum", (("endpoint", "/invocations"),))] == 6
    assert got[("fashion_exp_request_images_count", (("endpoint", "/invocations"),))] == 3
    assert got[("fashion_exp_batch_images_sum", ())] == 7  # every image went through the model
    # Answered requests are no longer in progress; the /metrics request itself still is.
    assert got[("fashion_exp_requests_in_progress", (("endpoint", "/invocations"),))] == 0
    assert got[("fashion_exp_requests_in_progress", (("endpoint", "/metrics"),))] == 1
    assert got[("fashion_exp_model_info", (("model_id", "m-1"), ("run_id", "run1"),
                                           ("uri", "models:/shop@champion"),
                                           ("version", "1")))] == 1
    assert got[("fashion_exp_model_loads_total", (("result", "loaded"),))] == 1
    assert got[("fashion_exp_model_loads_total", (("result", "failed"),))] == 0


def test_metrics_can_be_turned_off() -> None:
    with app_for(Registry(), metrics=False) as client:
        assert client.get("/metrics").status_code == 404


# --- A followed alias --------------------------------------------------------------------------

async def load_while_moving(registry: Registry, moves: list[tuple[int, ...]],
                            every: float = 0.1) -> tuple[list[tuple[int, str, int]], object]:
    """Send 8 concurrent request streams while the alias moves through `moves` (versions,
    each 0.5 s after the one before has answered). Each answer: (status, the version its
    headers name, its class)."""
    app = create_app(registry.load(version(1)), registry.resolve, registry.load,
                     Settings(follow_seconds=every), follow="models:/shop@champion")
    answers: list[tuple[int, str, int]] = []
    body = {"inputs": [IMAGE.tolist()]}
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        stop = asyncio.Event()

        async def stream() -> None:
            while not stop.is_set():
                answer = await client.post("/invocations", json=body)
                klass = int(np.argmax(answer.json()["predictions"][0])) \
                    if answer.status_code == 200 else -1
                answers.append((answer.status_code, answer.headers.get("X-Model-Version"),
                                klass))

        async def until(done: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 10  # a busy machine: wait for the event, not a time
            while not done() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        streams = [asyncio.create_task(stream()) for _ in range(8)]
        current = "1"
        for move in moves:  # each move once the version before it has answered
            await until(lambda seen=current: any(name == seen for _, name, _ in answers[-16:]))
            await asyncio.sleep(0.5)
            registry.alias = move
            current = str(move)
        await until(lambda: current in registry.loads)  # the follower has seen the last move
        await asyncio.sleep(0.5 + 4 * every)
        stop.set()
        await asyncio.gather(*streams)
        model = (await client.get("/model")).json()
        metrics = samples((await client.get("/metrics")).text)
    return answers, (model, metrics)


def test_a_moved_alias_is_swapped_in_under_load_without_a_failed_or_mixed_answer() -> None:
    registry = Registry(delay=0.002)
    answers, (model, metrics) = asyncio.run(load_while_moving(registry, [2, 3]))
    assert len(answers) > 100
    assert {status for status, _, _ in answers} == {200}
    # Every answer names the version whose model computed it (class n is version n's).
    assert all(name == str(klass) for _, name, klass in answers)
    served = [name for _, name, _ in answers]
    assert {"1", "2", "3"} <= set(served) and served[-1] == "3"
    assert model["version"] == "3" and model["follows"]["problem"] is None
    assert metrics[("fashion_exp_model_swaps_total", ())] == 2
    assert metrics[("fashion_exp_model_loads_total", (("result", "loaded"),))] == 3
    assert registry.loads == ["1", "2", "3"]  # each version loaded once


def test_a_version_that_cannot_load_leaves_the_old_one_serving(caplog) -> None:
    registry = Registry(unusable=(2,))
    answers, (model, metrics) = asyncio.run(load_while_moving(registry, [2]))
    assert {status for status, _, _ in answers} == {200}
    assert {name for _, name, _ in answers} == {"1"}
    assert model["version"] == "1"
    assert "version 2" in model["follows"]["problem"]
    assert "still serving version 1" in model["follows"]["problem"]
    assert metrics[("fashion_exp_model_loads_total", (("result", "failed"),))] == 1
    assert registry.loads == ["1", "2"]  # tried once, not at every check
    assert sum("cannot be served" in r.getMessage() for r in caplog.records) == 1


def test_a_refused_version_is_tried_again_after_a_while(monkeypatch) -> None:
    # Its files may have been restored meanwhile.
    from fashion_exp.serving.following import AliasFollower

    monkeypatch.setattr(AliasFollower, "retry_refused", lambda self: 0.6)
    registry = Registry(unusable=(2,))

    async def scenario() -> dict:
        app = create_app(registry.load(version(1)), registry.resolve, registry.load,
                         Settings(follow_seconds=0.1), follow="models:/shop@champion")
        follower = app.state.follower
        registry.alias = 2
        assert not await follower.check()
        assert not await follower.check()  # too soon: not loaded again
        registry.unusable = ()  # the files are back
        await asyncio.sleep(0.7)
        assert await follower.check()
        return follower.status()

    status = asyncio.run(scenario())
    assert registry.loads == ["1", "2", "2"] and status["problem"] is None


def test_a_load_that_fails_for_another_reason_is_tried_again() -> None:
    registry = Registry()
    load, failures = registry.load, []

    def flaky(ref: ModelRef) -> ServedModel:
        if ref.version == "2" and len(failures) < 2:  # e.g. an artifact download cut short
            failures.append(ref.version)
            raise ConnectionError("download interrupted")
        return load(ref)

    registry.load = flaky
    answers, (model, metrics) = asyncio.run(load_while_moving(registry, [2]))
    assert {status for status, _, _ in answers} == {200}
    assert model["version"] == "2" and model["follows"]["problem"] is None
    assert metrics[("fashion_exp_model_loads_total", (("result", "failed"),))] == 2


def test_a_swap_reuses_a_loaded_copy_and_keeps_the_old_default_for_requests_naming_it() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        registry = Registry()
        app = create_app(registry.load(version(1)), registry.resolve, registry.load,
                         Settings(follow_seconds=0.1, max_models=3),
                         follow="models:/shop@champion")
        models, follower = app.state.models, app.state.follower
        before = await models.take(version(2), registry.load)  # as if a request had named it
        models.loaded[before.ref.model_id] = models._attach(before)
        registry.alias = 2
        assert await follower.check()
        after = list(models.loaded)
        registry.alias = 1
        assert await follower.check()
        return registry.loads, after

    loads, loaded_after_first_swap = asyncio.run(scenario())
    assert loads == ["1", "2"]  # version 2 taken from the loaded ones, version 1 kept loaded
    assert loaded_after_first_swap == ["m-1"]


def test_a_swap_to_a_version_loaded_earlier_is_named_by_the_alias() -> None:
    async def scenario() -> tuple[dict, dict, dict]:
        registry = Registry()
        app = create_app(registry.load(version(1)), registry.resolve, registry.load,
                         Settings(follow_seconds=3600), follow="models:/shop@champion")
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            named = await client.post("/predict?model=models:/shop/2",
                                      json={"images": [IMAGE.tolist()]})
            assert named.headers["X-Model-URI"] == "models:/shop/2"
            registry.alias = 2
            assert await app.state.follower.check()
            invoked = await client.post("/invocations", json={"inputs": [IMAGE.tolist()]})
            health = (await client.get("/health")).json()
            metrics = samples((await client.get("/metrics")).text)
            again = await client.post("/predict?model=models:/shop/2",
                                      json={"images": [IMAGE.tolist()]})
        assert registry.loads == ["1", "2"]  # version 2 loaded once, by the request
        assert again.headers["X-Model-URI"] == "models:/shop/2"  # as that request asks
        return dict(invoked.headers), health, metrics

    headers, health, metrics = asyncio.run(scenario())
    assert headers["x-model-uri"] == "models:/shop@champion" and headers["x-model-version"] == "2"
    assert health["default_model"] == "models:/shop@champion"
    assert metrics[("fashion_exp_model_info", (("model_id", "m-2"), ("run_id", "run2"),
                                               ("uri", "models:/shop@champion"),
                                               ("version", "2")))] == 1


def test_max_models_1_keeps_only_the_default_loaded() -> None:
    # conf/serve.yaml: the default model counts in max_models. A request naming another model
    # is answered by it, and it leaves memory once answered.
    registry = Registry()
    with app_for(registry, max_models=1, follow_seconds=0) as client:
        for number in (2, 3, 2):
            answer = client.post("/invocations", json={"inputs": [IMAGE.tolist()]})
            named = client.post(f"/predict?model=models:/shop/{number}&top_k=1",
                                json={"images": [IMAGE.tolist()]})
            assert answer.status_code == named.status_code == 200
            assert named.json()["predictions"][0]["top"][0]["index"] == number
            assert client.get("/health").json()["models_loaded"] == 1
            assert not client.app.state.models.loaded
    assert registry.loads == ["1", "2", "3", "2"]


def test_a_store_that_stops_answering_keeps_the_model_serving() -> None:
    registry = Registry()

    def broken(uri: str) -> ModelRef:
        raise ConnectionError("store unreachable")

    registry.resolve = broken
    answers, (model, _) = asyncio.run(load_while_moving(registry, []))
    assert {status for status, _, _ in answers} == {200}
    assert "could not be looked up" in model["follows"]["problem"]


def test_an_alias_is_not_followed_when_follow_seconds_is_0() -> None:
    registry = Registry()
    with app_for(registry, follow_seconds=0) as client:
        registry.alias = 2
        time.sleep(0.3)
        model = client.get("/model").json()
    assert "follows" not in model and model["version"] == "1" and registry.loads == ["1"]


# --- The batcher -------------------------------------------------------------------------------

def test_a_request_that_took_a_closed_model_is_still_answered() -> None:
    async def scenario() -> np.ndarray:
        batcher = Batcher(one_hot(4), ThreadPoolExecutor(1), 8)
        await batcher(np.zeros((1, 28, 28), np.uint8))
        batcher.close()
        await asyncio.sleep(0.01)
        assert batcher.worker.done()
        late = await asyncio.wait_for(batcher(np.zeros((2, 28, 28), np.uint8)), 5)
        await asyncio.sleep(0.01)
        assert batcher.worker.done()  # and its worker ends again once it is answered
        return late

    assert np.argmax(asyncio.run(scenario()), axis=1).tolist() == [4, 4]


def test_a_closed_batcher_whose_last_batch_failed_still_ends() -> None:
    def failing(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("model failed")

    async def scenario() -> None:
        batcher = Batcher(failing, ThreadPoolExecutor(1), 8)
        pending = asyncio.ensure_future(batcher(np.zeros((1, 28, 28), np.uint8)))
        await asyncio.sleep(0)
        batcher.close()
        with pytest.raises(RuntimeError):
            await pending
        await asyncio.sleep(0.01)
        assert batcher.worker.done()

    asyncio.run(scenario())


def test_a_dropped_model_is_reclaimed_even_when_frozen(monkeypatch) -> None:
    import gc
    import weakref

    from fashion_exp.serving import models

    class Model:  # with a reference cycle, as Keras models have: only the collector frees it
        def __init__(self) -> None:
            self.me = self

        def __call__(self, images: np.ndarray) -> np.ndarray:
            return one_hot(1)(images)

    monkeypatch.setattr(models, "RECLAIM_AFTER_SECONDS", 0.05)

    async def scenario() -> weakref.ref:
        registry = Registry()
        old_model = Model()
        first = ServedModel(version(1), "run1", {}, old_model)
        app = create_app(first, registry.resolve, registry.load,
                         Settings(follow_seconds=0.1, max_models=1),
                         follow="models:/shop@champion")
        gone = weakref.ref(old_model)
        del old_model, first
        await app.state.models.default.batcher(np.zeros((1, 28, 28), np.uint8))
        gc.freeze()  # what fashion-exp-serve does once the first model is loaded
        try:
            registry.alias = 2
            assert await app.state.follower.check()  # max_models=1: version 1 is dropped
            await asyncio.sleep(0.3)
        finally:
            gc.unfreeze()
        return gone

    assert asyncio.run(scenario())() is None
