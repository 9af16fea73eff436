"""The prediction service, in-process (FastAPI's TestClient) and as real servers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import jsonschema
import mlflow
import numpy as np
import pytest
from PIL import Image

from devtools import servers
from fashion_exp.core import data
from fashion_exp.core.preprocess import render_product_photo
from fashion_exp.serving.batching import Batcher

from .helpers import encode, framing_error, probabilities, real_data_dir


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    folder = real_data_dir()
    return (data.read_idx(folder / data.FILES["x_test"]),
            data.read_idx(folder / data.FILES["y_test"]))


@pytest.fixture(scope="module")
def client(served_app):
    return served_app[0]


def photo(image: np.ndarray, fmt: str = "JPEG", seed: int = 0) -> bytes:
    return render_product_photo(image, np.random.default_rng(seed), fmt)


# --- What it answers ---------------------------------------------------------------------------

def test_json_batch_gives_the_logged_models_probabilities(client, served_store, test_set) -> None:
    uri, run_id = served_store
    images = test_set[0][:3]
    answer = client.post("/predict?top_k=10", json={"images": images.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"]["run_id"] == run_id
    assert [p["source"] for p in body["predictions"]] == ["images[0]", "images[1]", "images[2]"]
    mlflow.set_tracking_uri(uri)
    expected = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(images)
    for p, want, image in zip(body["predictions"], expected, images, strict=True):
        got = [c["probability"] for c in p["top"]]
        assert got == sorted(got, reverse=True)
        np.testing.assert_allclose(probabilities(p), want, atol=1e-5)
        assert np.array_equal(np.array(p["image"]), image)  # arrays are used as they are


def test_top_k_defaults_to_the_configured_number(client, test_set) -> None:
    answer = client.post("/predict", json={"images": [test_set[0][0].tolist()]}).json()
    assert len(answer["predictions"][0]["top"]) == 5
    one = client.post("/predict?top_k=1", json={"images": [test_set[0][0].tolist()]}).json()
    assert one["predictions"][0]["top"][0] == answer["predictions"][0]["top"][0]


def test_uploads_of_every_format_in_one_request(client, test_set) -> None:
    x = test_set[0]
    rgba = Image.fromarray(255 - np.kron(x[1], np.ones((6, 6), np.uint8))).convert("RGBA")
    gif = encode(Image.fromarray(255 - x[2]).convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    files = [("files", ("a.jpg", photo(x[0]), "image/jpeg")),
             ("files", ("b.webp", photo(x[1], "WEBP"), "image/webp")),
             ("files", ("c.gif", gif, "image/gif")),
             ("files", ("d.png", encode(rgba, "PNG"), "image/png"))]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["source"] for p in predictions] == ["a.jpg", "b.webp", "c.gif", "d.png"]
    errors = []
    for p, original in zip(predictions, x[[0, 1, 2, 1]], strict=True):
        seen = np.array(p["image"])
        assert seen.shape == (28, 28) and 0 <= seen.min() and seen.max() <= 255
        errors.append(framing_error(seen, original))
    # Framed back like the dataset images (resampling alone leaves ~9 levels of mean error).
    assert np.mean(errors) < 20 and max(errors) < 35, errors


def test_photos_mostly_get_the_class_of_their_originals(client, test_set) -> None:
    x = test_set[0][:40]
    originals = client.post("/predict?top_k=1", json={"images": x.tolist()[:4]}).json()
    agree = 0
    for start in range(0, len(x), 4):
        chunk = x[start:start + 4]
        arrays = client.post("/predict?top_k=1", json={"images": chunk.tolist()}).json()
        photos = client.post("/predict?top_k=1", files=[
            ("files", (f"{start + i}.jpg", photo(img, seed=start + i), "image/jpeg"))
            for i, img in enumerate(chunk)]).json()
        agree += sum(a["top"][0]["index"] == b["top"][0]["index"]
                     for a, b in zip(arrays["predictions"], photos["predictions"], strict=True))
    assert originals["predictions"]
    assert agree >= 32, f"only {agree}/40 photos got their original's class"


def test_model_info_registered_versions_and_aliases(client, served_store, test_set) -> None:
    uri, run_id = served_store
    info = client.get("/model").json()
    assert info["run_id"] == run_id and info["name"] is None
    assert 0 < info["metrics"]["test_accuracy"] <= 1 and len(info["classes"]) == 10
    mlflow.MlflowClient(uri).set_registered_model_alias("fashion_serve", "champion", "1")
    for ref in ("models:/fashion_serve/1", "models:/fashion_serve@champion"):
        registered = client.get("/model", params={"model": ref}).json()
        assert (registered["name"], registered["version"], registered["run_id"]) == \
            ("fashion_serve", "1", run_id)
        answer = client.post("/predict", params={"model": ref},
                             json={"images": [test_set[0][0].tolist()]}).json()
        assert answer["model"]["uri"] == ref and answer["model"]["version"] == "1"
    listed = client.get("/models").json()
    uris = [m["uri"] for m in listed["models"]]
    assert listed["default"] == f"runs:/{run_id}/model" == uris[0]
    assert "models:/fashion_serve/1" in uris and len(uris) == len(set(uris))
    # Every choice is named by its run or registered name, the default too, never its URI.
    default = client.get("/model").json()
    assert listed["models"][0]["label"] == (f"default: {default['run_name']} "
                                            f"(test {default['metrics']['test_accuracy']:.4f})")
    assert all(m["uri"] not in m["label"] for m in listed["models"])
    # The model's metrics are the logged model's: its run's values at the last epoch.
    assert {"test_accuracy", "epoch/val_accuracy", "best_val_accuracy"} <= set(default["metrics"])
    assert not any(k.startswith("test_class_accuracy/") for k in default["metrics"])


def test_random_samples_come_from_the_test_set(client, test_set) -> None:
    sample = client.get("/samples/random").json()
    assert sample["label"] == data.CLASSES[test_set[1][sample["index"]]]
    assert np.array_equal(np.array(sample["image"]), test_set[0][sample["index"]])


def test_page_is_served_without_outside_assets(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "What the model saw" in page.text
    assert "http://" not in page.text and "https://" not in page.text


# --- Bad input: a 4xx with a reason, and the service goes on ----------------------------------

GOOD = np.zeros((28, 28), int).tolist()
# The table of bad requests is tests/helpers.py's BAD_REQUESTS, run by tests/test_cli_bad_inputs.py.


def test_unknown_model_info_is_404(client) -> None:
    answer = client.get("/model", params={"model": "models:/no_such_model/1"})
    assert answer.status_code == 404 and "no_such_model" in answer.json()["detail"]


# --- The OpenAPI description is the truth ------------------------------------------------------

def validate_against(spec: dict, schema: dict, instance: object) -> None:
    jsonschema.validate(instance, {**schema, "components": spec["components"]})


def test_openapi_describes_requests_and_answers(client, test_set) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["files"]["type"] == "array"
    request_schema = body["application/json"]["schema"]
    good = {"images": [test_set[0][0].tolist()]}
    validate_against(spec, request_schema, good)
    with pytest.raises(jsonschema.ValidationError):
        validate_against(spec, request_schema, {"images": [GOOD[:27]]})
    with pytest.raises(jsonschema.ValidationError):
        validate_against(spec, request_schema, {"images": [[[300] * 28] * 28]})
    answers = {("/predict", "post"): client.post("/predict", json=good),
               ("/model", "get"): client.get("/model"),
               ("/models", "get"): client.get("/models"),
               ("/health", "get"): client.get("/health"),
               ("/samples/random", "get"): client.get("/samples/random")}
    for (path, method), answer in answers.items():
        assert answer.status_code == 200, (path, answer.text)
        schema = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]
        validate_against(spec, schema["schema"], answer.json())
    assert {p["name"] for p in predict["parameters"]} == {"model", "top_k"}


# --- Batching ----------------------------------------------------------------------------------

def test_concurrent_requests_share_model_calls() -> None:
    """Requests that arrive while the model is busy are answered by one call together."""
    from concurrent.futures import ThreadPoolExecutor

    calls: list[int] = []

    def slow_predict(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        time.sleep(0.05)
        return images.reshape(len(images), -1)[:, :10].astype(np.float32)

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(slow_predict, ThreadPoolExecutor(1), max_batch=64)
        requests = [np.full((1 + i % 2, 28, 28), i, np.uint8) for i in range(8)]
        return await asyncio.gather(*(batcher(r) for r in requests))

    results = asyncio.run(scenario())
    assert sum(calls) == 12 and len(calls) < 8, calls  # 8 requests, 12 images, fewer calls
    for i, result in enumerate(results):  # each request gets its own rows back
        assert result.shape == (1 + i % 2, 10) and np.all(result == i)


def test_a_failing_model_call_fails_only_its_requests() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def predict(images: np.ndarray) -> np.ndarray:
        if images.max() == 7:
            raise ValueError("boom")
        return np.zeros((len(images), 10), np.float32)

    async def scenario() -> tuple[object, np.ndarray]:
        batcher = Batcher(predict, ThreadPoolExecutor(1), max_batch=1)
        bad = await asyncio.gather(batcher(np.full((1, 28, 28), 7, np.uint8)),
                                   return_exceptions=True)
        return bad[0], await batcher(np.zeros((1, 28, 28), np.uint8))

    error, good = asyncio.run(scenario())
    assert isinstance(error, ValueError) and good.shape == (1, 10)


# --- The command line and real servers ---------------------------------------------------------

def serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashion_exp.cli.serve", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("args,message", [
    (["model_uri=runs:/0123456789abcdef/model"], "is not a model of this tracking store"),
    (["model_uri=models:/fashion_serve/42"], "is not a model of this tracking store"),
    (["model_uri=s3://bucket/model"], "use runs:/<run_id>/model"),
    (["port=70000"], "port=70000: must be in [1, 65535]"),
    (["top_k=0"], "top_k=0: must be in [1, 10]"),
    (["prot=8000"], "Key 'prot' not in 'ServeConfig'"),
    (["log_level=loud"], "log_level='loud': use one of critical"),
    (["+extra=1"], "extra=1: no such key"),
    (["header_timeout=inf"], "header_timeout=inf: must be in (0, 3600] seconds"),
    (["decode_workers=0"], "decode_workers=0: must be in [1, 64] threads"),
    (["follow_seconds=0.01"], "follow_seconds=0.01: must be 0 (do not follow) or in [0.1, "),
    (["drain_seconds=nan"], "drain_seconds=nan: must be in [0, 3600] seconds"),
    (["metrics=maybe"], "Value 'maybe' is not a valid bool"),
    (["max_header_bytes=100"], "max_header_bytes=100: must be in [1024, 1048576] bytes"),
    (["host=999.1.1.1"], "host='999.1.1.1': not an address of this machine"),
    (["tracking.experiment_name=nothing_here"], "no finished run with a logged model"),
])
def test_serve_refuses_bad_config_in_one_line(served_store, args, message) -> None:
    uri, _ = served_store
    result = serve_cli(f"tracking.uri={uri}", "tracking.experiment_name=serve", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fashion-exp-serve:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_serve_without_a_store_says_so(tmp_path) -> None:
    result = serve_cli(f"tracking.uri=sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    assert result.returncode == 2 and "no tracking store there" in result.stderr
    assert not (tmp_path / "none").exists()  # nothing created by a refusal


def test_models_are_loaded_once_per_model_and_the_least_recent_dropped() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fashion_exp.schemas import ServiceSettings as Settings
    from fashion_exp.serving.models import Models, ServedModel
    from fashion_exp.tracking.logged_models import ModelRef, UnknownModel

    loads: list[str] = []
    # Two spellings of model a: a run URI and a registered version.
    store = {"runs:/d/model": "d", "runs:/a/model": "a", "models:/A/1": "a",
             "runs:/b/model": "b"}

    def resolver(uri: str) -> ModelRef:
        if uri not in store:
            raise UnknownModel(uri)
        return ModelRef(uri, store[uri], f"m-{store[uri]}", f"file:///{store[uri]}")

    def answer(images: np.ndarray) -> np.ndarray:
        return np.full((len(images), 10), 0.1, np.float32)

    def loader(ref: ModelRef) -> ServedModel:
        loads.append(ref.model_id)
        return ServedModel(ref, ref.run_id, {}, answer)

    async def scenario(capacity: int) -> tuple[list[str], list[ServedModel]]:
        default = ServedModel(resolver("runs:/d/model"), "d", {}, answer)
        models = Models(default, resolver, loader, Settings(max_models=capacity),
                        ThreadPoolExecutor(1))
        got, workers = [], []
        for uri in (None, "runs:/a/model", "models:/A/1", "runs:/b/model", "runs:/a/model"):
            ref, served = await models.get(uri)
            await served.batcher(np.zeros((1, 28, 28), np.uint8))  # starts its worker
            if served.batcher.worker not in workers:
                workers.append(served.batcher.worker)
            got.append((ref.uri, served.ref.model_id))
        with pytest.raises(UnknownModel):
            await models.get("runs:/missing/model")
        kept = list(models.loaded.values())
        models.close()
        await asyncio.sleep(0.01)
        # Dropped and closed models' workers have ended: none is left pending at exit.
        assert all(w.done() for w in workers) and len(workers) == 1 + len(loads)
        return got, kept

    # max_models counts the default: with 1, a named model answers its request and leaves.
    for capacity, expected_loads in ((3, ["m-a", "m-b"]), (1, ["m-a", "m-a", "m-b", "m-a"])):
        loads.clear()
        got, kept = asyncio.run(scenario(capacity))
        assert got == [("runs:/d/model", "m-d"), ("runs:/a/model", "m-a"), ("models:/A/1", "m-a"),
                       ("runs:/b/model", "m-b"), ("runs:/a/model", "m-a")]
        assert loads == expected_loads, (capacity, loads)
        assert len(kept) == capacity - 1


# --- Models that cannot answer are refused; the model serving keeps serving --------------------

# Registered versions of `shop` in the store of the fixture below: version 1 answers, the others
# are Keras models of 28x28 uint8 images that cannot give 10 class probabilities.
UNSERVABLE = {2: "(4, 12)", 3: "not finite", 4: "(4,)", 5: "not probabilities"}


def tiny_model(outputs: int = 10, activation: str | None = "softmax", nan: bool = False,
               scalar: bool = False):
    """A small Keras model of (n, 28, 28) uint8 images."""
    import keras
    from keras import layers

    model = keras.Sequential([keras.Input((28, 28), dtype="uint8"), layers.Rescaling(1 / 255),
                              layers.Flatten(), layers.Dense(outputs, activation=activation)]
                             + ([layers.Reshape(())] if scalar else []))
    if nan:
        model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def shop_store(tmp_path_factory) -> str:
    """A store holding `shop` versions 1 (good), 2 (12 outputs), 3 (NaN weights), 4 (one
    number per image) and 5 (logits, no softmax), each logged by a run of its own, with alias
    `champion` on version 1: its tracking URI."""
    from fashion_exp.tracking import logged_models

    uri = f"sqlite:///{tmp_path_factory.mktemp('shop') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = mlflow.set_experiment("shop")
    models = [tiny_model(), tiny_model(outputs=12), tiny_model(nan=True),
              tiny_model(outputs=1, scalar=True), tiny_model(activation=None)]
    for number, model in enumerate(models, start=1):
        run = client.create_run(experiment.experiment_id, run_name=f"shop_v{number}")
        logged_models.log_keras(model, uri, run.info.run_id, "shop", 0)
        client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("shop", "champion", "1")
    return uri


def shop_app(uri: str, model_uri: str, *overrides: str):
    from fashion_exp.cli import serve
    from fashion_exp.config import compose_checked

    cfg = compose_checked("serve", [f"tracking.uri={uri}", f"model_uri={model_uri}",
                                    "samples=false", *overrides])
    return serve.build(cfg)[0]


@pytest.mark.parametrize("number", sorted(UNSERVABLE))
def test_a_model_that_cannot_answer_is_refused_at_startup(shop_store, number) -> None:
    from fashion_exp.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        shop_app(shop_store, f"models:/shop/{number}")
    message = str(refused.value)
    assert f"models:/shop/{number}" in message and UNSERVABLE[number] in message, message
    assert "\n" not in message


@pytest.mark.slow  # a subprocess
def test_a_startup_with_a_model_that_cannot_answer_exits_2_in_one_line(shop_store) -> None:
    result = subprocess.run([sys.executable, "-m", "fashion_exp.cli.serve",
                             f"tracking.uri={shop_store}", "model_uri=models:/shop/2",
                             "samples=false", f"port={servers.free_port()}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fashion-exp-serve:")]
    assert len(lines) == 1 and "models:/shop/2" in lines[0] and "(4, 12)" in lines[0], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_request_naming_a_model_that_cannot_answer_is_refused(shop_store) -> None:
    from fastapi.testclient import TestClient

    image = {"images": [GOOD]}
    with TestClient(shop_app(shop_store, "models:/shop/1")) as client:
        for number, problem in UNSERVABLE.items():
            for _ in range(2):  # refused again, not loaded and kept
                answer = client.post("/predict", params={"model": f"models:/shop/{number}"},
                                     json=image)
                assert answer.status_code == 422, answer.text
                detail = answer.json()["detail"]
                assert f"models:/shop/{number}" in detail and problem in detail, detail
        predicted = client.post("/predict?top_k=10", json=image)
        invoked = client.post("/invocations", json={"inputs": [GOOD]})
        health = client.get("/health").json()
    assert predicted.status_code == 200 and invoked.status_code == 200
    assert predicted.headers["X-Model-Version"] == invoked.headers["X-Model-Version"] == "1"
    probs = np.asarray(invoked.json()["predictions"])
    assert probs.shape == (1, 10) and abs(probs.sum() - 1) < 1e-5
    assert health["models_loaded"] == 1


def test_an_alias_moved_to_a_model_that_cannot_answer_is_not_followed(shop_store) -> None:
    import httpx

    from fashion_exp.serving.models import ModelUnusable

    app = shop_app(shop_store, "models:/shop@champion", "follow_seconds=3600")
    client = mlflow.MlflowClient(shop_store)

    async def scenario() -> list[tuple[int, str, str]]:
        follower, seen = app.state.follower, []
        assert follower.permanent == (ModelUnusable,)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for number in UNSERVABLE:
                client.set_registered_model_alias("shop", "champion", str(number))
                assert not await follower.check()
                answer = await http.post("/invocations", json={"inputs": [GOOD]})
                seen.append((answer.status_code, answer.headers["X-Model-Version"],
                             follower.status()["problem"]))
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        client.set_registered_model_alias("shop", "champion", "1")
    for (status, served, problem), (number, what) in zip(seen, UNSERVABLE.items(), strict=True):
        assert (status, served) == (200, "1"), problem
        assert f"version {number}" in problem and what in problem, problem
        assert "still serving version 1" in problem
