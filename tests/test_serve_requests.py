"""The service under hostile requests: model references that try to leave the store, bodies and
headers that try to stall or swell it, and connections that never finish.

What it trusts is the tracking store; what it never trusts is a request (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools import servers
from fashion_exp.cli import serve
from fashion_exp.core import preprocess
from fashion_exp.schemas import ServiceSettings
from fashion_exp.serving.models import ServedModel
from fashion_exp.serving.service import create_app
from fashion_exp.tracking.logged_models import ModelRef

GOOD = np.zeros((28, 28), int).tolist()


def store_digest(folder: Path) -> dict[str, str]:
    """Every file of a store folder (database included) with its hash."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def served(served_app):
    return served_app


# --- Model references resolve only to logged models of the store -----------------------------

def test_no_reference_reaches_outside_the_store(served, tmp_path) -> None:
    client, store, run_id = served
    model_dir = next(store.glob("artifacts/models/m-*/artifacts"))
    outside = tmp_path / "outside_model"  # a real, loadable model, but not one of the store
    shutil.copytree(model_dir, outside)
    up = "../" * 12
    references = [
        f"runs:/{run_id}/{up}{str(outside).lstrip('/')}",
        f"runs:/{run_id}/model/{up}{str(outside).lstrip('/')}",
        f"runs:/{run_id}/%2e%2e/%2e%2e/{outside.name}",
        f"runs:/{run_id}/..%2F..%2F{outside.name}",
        f"runs:/{run_id}//model", f"runs:/{run_id}/./model", f"runs:/{run_id}/model/",
        f"runs:/{run_id}/model\x00", f"runs:/{run_id}/model\\..\\..",
        f"runs:/{run_id}/config.yaml", f"runs:/{run_id}/hydra",  # artifacts, not models
        f"runs:/{run_id}/..", f"runs:/{run_id.upper()}/model",
        str(outside), outside.as_uri(), f"file://{outside}", "/etc/passwd",
        "models:/fashion_serve/1/../../..", "models:/../../etc@x", "models:/fashion_serve@../x",
        f"models:/m-{'0' * 32}", "models:/fashion_serve/99", "models:/nope@champion",
        "runs:/" + "a" * 5000, "s3://bucket/model", "",
    ]
    before, temps = store_digest(store), temp_folders()
    details = set()
    for reference in references:
        if reference == "":
            continue  # the empty reference means the default model
        for answer in (client.get("/model", params={"model": reference}),
                       client.post("/predict", params={"model": reference},
                                   json={"images": [GOOD]})):
            assert answer.status_code == 404, (reference, answer.text)
            detail = answer.json()["detail"]
            assert detail.startswith("model=")
            said = detail.rsplit("' is not a model of this tracking store", 1)[1]
            assert "/tmp" not in said and str(store) not in said
            details.add(said)  # all but the echoed reference
    assert len(details) == 1, details  # one answer for every bad reference: no oracle
    assert client.get("/health").json()["models_loaded"] == 1  # nothing was loaded
    assert store_digest(store) == before  # reads never write the store
    assert temp_folders() <= temps  # and leave nothing behind


def test_every_spelling_of_a_model_is_one_model(served) -> None:
    client, store, run_id = served
    before = store_digest(store)
    model_id = next(store.glob("artifacts/models/m-*")).name
    answers = [client.get("/model", params={"model": m}).json()
               for m in (f"runs:/{run_id}/model", "models:/fashion_serve/1",
                         "models:/fashion_serve/1", f"models:/{model_id}")]
    assert {a["model_id"] for a in answers} == {model_id}
    assert [a["version"] for a in answers] == [None, "1", "1", None]
    assert client.get("/health").json()["models_loaded"] == 1  # all of them are the default
    assert store_digest(store) == before  # a registry read writes nothing into the store


def test_a_deleted_runs_model_is_gone_under_every_name(served_store, tmp_path) -> None:
    import mlflow

    from fashion_exp.tracking import logged_models

    uri, run_id = served_store
    folder = Path(uri.removeprefix("sqlite:///")).parent
    shutil.copytree(folder, tmp_path / "store")  # the shared store stays as it is
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    model_id = logged_models.resolve(client, f"runs:/{run_id}/model").model_id
    client.set_registered_model_alias("fashion_serve", "champion", "1")
    client.delete_run(run_id)
    for reference in (f"runs:/{run_id}/model", "models:/fashion_serve/1",
                      "models:/fashion_serve@champion", f"models:/{model_id}"):
        with pytest.raises(logged_models.UnknownModel):
            logged_models.resolve(client, reference)


# --- Limits apply before work -----------------------------------------------------------------

def test_json_bodies_are_bounded_before_they_are_parsed(served) -> None:
    client, _, _ = served
    zeros = json.dumps({"images": [0] * 1_000_000}).encode()  # 3 MB
    answer = client.post("/predict", content=zeros,
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "over the limit of" in answer.json()["detail"]

    def chunks():  # no Content-Length: refused while it streams in
        yield b'{"images": ['
        for _ in range(2000):
            yield b"0, " * 1000
    answer = client.post("/predict", content=chunks(),
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text

    garbage = {"images": [[["x"]]] * 5}  # 5 images, each invalid: the count is checked first
    answer = client.post("/predict", json=garbage)
    assert answer.status_code == 413 and "5 images" in answer.json()["detail"]

    deep = b"[" * 50_000  # under the size limit, deeper than any parser's recursion
    answer = client.post("/predict", content=deep, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "Invalid JSON" in answer.json()["detail"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("parts,message", [
    ([("files", (f"{i}.png", b"x", "image/png")) for i in range(5)], "Too many files"),
    ([("files", ("a.png", b"x", "image/png"))] + [(f"f{i}", (None, "v")) for i in range(9)],
     "Too many fields"),
])
def test_multipart_limits_are_413(served, parts, message) -> None:
    client, _, _ = served
    answer = client.post("/predict", files=parts)
    assert answer.status_code == 413 and message in answer.json()["detail"], answer.text


def test_decoding_runs_at_most_decode_workers_images_at_once(monkeypatch) -> None:
    running, most, lock = [0], [0], threading.Lock()
    real_prepare = preprocess.prepare

    def counting_prepare(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real_prepare(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(preprocess, "prepare", counting_prepare)
    png = preprocess_png()
    for workers in (1, 2):
        most[0] = 0
        ref = ModelRef("runs:/x/model", "x", "m-x", "file:///x")
        model = ServedModel(ref, "x", {}, lambda images: np.full((len(images), 10), 0.1))
        app = create_app(model, lambda u, ref=ref: ref, lambda r, model=model: model,
                         ServiceSettings(decode_workers=workers))

        async def flood(app=app) -> list[int]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers = await asyncio.gather(*[
                    client.post("/predict", files=[("files", ("a.png", png, "image/png"))] * 2)
                    for _ in range(6)])
            return [a.status_code for a in answers]

        assert asyncio.run(flood()) == [200] * 6
        assert most[0] == workers, (workers, most[0])


def preprocess_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((20, 20), np.uint8))).save(
        out, "PNG")
    return out.getvalue()


def test_api_docs_work_offline(served) -> None:
    client, _, _ = served
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "https://" not in html and "cdn" not in html.lower(), page
        scripts = [part.split('"')[0] for part in html.split('src="')[1:]]
        assert scripts, page
        for script in scripts:
            asset = client.get(script)
            assert asset.status_code == 200 and len(asset.content) > 100_000, script


# --- Connections: header size, header and body time, aborted uploads --------------------------

def serve_process(served_store, tmp_path, *overrides: str):
    uri, run_id = served_store
    port = servers.free_port()
    command = [sys.executable, "-m", "fashion_exp.cli.serve", f"model_uri=runs:/{run_id}/model",
               f"port={port}", f"tracking.uri={uri}", "samples=false", "log_level=info",
               *overrides]
    return port, servers.running(command, f"http://127.0.0.1:{port}/health",
                                 tmp_path / "serve.log")


def exchange(port: int, data: bytes, wait: float = 15.0, close: bool = False) -> bytes:
    """Send raw bytes; what the server answers before it closes (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        if close:
            return b""
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


@pytest.mark.slow
def test_connections_that_stall_or_swell_are_cut(served_store, tmp_path) -> None:
    port, server = serve_process(served_store, tmp_path, "max_header_bytes=4096",
                                 "header_timeout=1", "body_timeout=2")
    with server as proc:
        big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
        for request, status in ((big, b"431"), (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"408"),
                                (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc"
                                 b"\r\n\r\n", b"400")):
            head, _, body = exchange(port, request).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 " + status), head
            assert b"application/json" in head and json.loads(body)["detail"], body
        slow_body = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{\"images\": [")
        started = time.monotonic()
        assert exchange(port, slow_body) == b""  # closed after body_timeout, not left open
        assert time.monotonic() - started < 10
        for _ in range(20):  # clients that go away in the middle of an upload
            exchange(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                           b"form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n",
                     close=True)
        deadline = time.monotonic() + 30  # each aborted upload logged before the stop
        while (tmp_path / "serve.log").read_text().count("request body ended") < 21 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "Task was destroyed" not in log, log[-3000:]
    assert log.count("request body ended") == 21, log[-3000:]  # one line per aborted upload
    assert log.count("Invalid HTTP request") == 1  # uvicorn's line, and no second one of ours


def test_non_local_hosts_are_warned_about_and_empty_ones_refused(served_store, tmp_path) -> None:
    uri, run_id = served_store
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    base = [sys.executable, "-m", "fashion_exp.cli.serve", f"model_uri=runs:/{run_id}/model",
            f"tracking.uri={uri}", "samples=false"]
    empty = subprocess.run([*base, "host="], capture_output=True, text=True, env=env,
                           timeout=120)
    assert empty.returncode == 2 and "host='': give an address" in empty.stderr
    with socket.socket() as taken:  # the warning comes first, before the port is tried
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        exposed = subprocess.run([*base, "host=0.0.0.0", f"port={taken.getsockname()[1]}"],
                                 capture_output=True, text=True, env=env, timeout=120)
    lines = exposed.stderr.strip().splitlines()
    assert exposed.returncode == 2 and len(lines) == 2, exposed.stderr
    assert lines[0].startswith("fashion-exp-serve: warning: host=0.0.0.0 accepts connections")
    assert "no authentication" in lines[0] and "cannot listen on 0.0.0.0" in lines[1]
    assert serve.is_loopback("127.0.0.2") and serve.is_loopback("::1")
    assert serve.is_loopback("localhost") and not serve.is_loopback("0.0.0.0")
    assert not serve.is_loopback("::") and not serve.is_loopback("example.org")


def test_a_logged_model_that_cannot_be_served_is_a_422_without_details() -> None:
    from fashion_exp.serving.models import ModelUnusable

    default_ref = ModelRef("runs:/d/model", "d", "m-d", "file:///d")
    other = ModelRef("runs:/o/model", "o", "m-o", "file:///secret/path")
    default = ServedModel(default_ref, "d", {}, lambda images: np.zeros((len(images), 10)))

    def loader(ref: ModelRef) -> ServedModel:
        raise ModelUnusable(ref.uri)

    app = create_app(default, lambda uri: other, loader, ServiceSettings())
    with TestClient(app) as client:
        answer = client.get("/model", params={"model": "runs:/o/model"})
    assert answer.status_code == 422 and "cannot be served" in answer.json()["detail"]
    assert "/secret/path" not in answer.text
