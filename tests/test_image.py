"""The serving image, built with podman once per session and run as SageMaker runs it:
`<image> serve` on port 8080 (or $SAGEMAKER_BIND_TO_PORT), /ping, /invocations with the same
answers as the service outside the container, a model extracted from model.tar.gz into
/opt/ml/model, a read-only root file system and a non-root user, SIGTERM drained to exit 0,
and a bad model folder refused in one line with a non-zero exit.

Containers get their own network (slirp4netns, no firewall rules on the host) and publish
their port on 127.0.0.1 only; they are stopped and removed by id."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from devtools import servers
from fashion_exp.core import data

from .helpers import real_data_dir

PODMAN = shutil.which("podman")
TAG = "localhost/fashion-exp-test"  # :model (the model baked in), :generic (none)


@dataclass(frozen=True)
class Images:
    baked: str  # the served_store's model at /opt/ml/model
    generic: str  # no model: reads /opt/ml/model at start
    tarball: Path  # the same model as SageMaker's model.tar.gz


def fashion_exp_image(*overrides: str) -> subprocess.CompletedProcess:
    """Run the fashion-exp-image entry point with overrides."""
    return subprocess.run([sys.executable, "-m", "fashion_exp.cli.image", *overrides],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def images(served_store, tmp_path_factory) -> Iterator[Images]:
    """Both images, built once for the session; removed at its end."""
    if PODMAN is None:
        pytest.skip("podman is not installed (./dev.sh setup installs it)")
    uri, _ = served_store
    tarball = tmp_path_factory.mktemp("image") / "model.tar.gz"
    built = [fashion_exp_image("model_uri=models:/fashion_serve/1", f"tracking.uri={uri}",
                               f"tag={TAG}:model", f"model_tarball={tarball}"),
             fashion_exp_image(f"tag={TAG}:generic")]
    try:
        for done in built:
            assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
            assert "Built localhost/fashion-exp-test:" in done.stdout
        yield Images(f"{TAG}:model", f"{TAG}:generic", tarball)
    finally:
        subprocess.run([PODMAN, "rmi", "--force", f"{TAG}:model", f"{TAG}:generic"],
                       capture_output=True)


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return data.read_idx(real_data_dir() / data.FILES["x_test"])[:16]


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class Container:
    id: str
    url: str
    ready_seconds: float  # from `podman run` to the first 200 on /ping


@contextmanager
def container(image: str, *options: str, port: int = 8080) -> Iterator[Container]:
    """`podman run <options> <image> serve`, its port published on 127.0.0.1 only; waits for
    /ping, then yields. Stopped and removed (by id) afterwards."""
    host_port = servers.free_port()
    started = time.monotonic()
    run = podman("run", "-d", "--network", "slirp4netns", "-p", f"127.0.0.1:{host_port}:{port}",
                 *options, image, "serve")
    assert run.returncode == 0, run.stderr
    cid = run.stdout.strip()
    url = f"http://127.0.0.1:{host_port}"
    try:
        ready = wait_for_ping(cid, url, timeout=60)
        yield Container(cid, url, ready - started)
    finally:
        podman("rm", "--force", "--time", "0", cid)


def wait_for_ping(cid: str, url: str, timeout: float) -> float:
    """When /ping first answered 200; AssertionError with the logs if the container exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", cid).stdout.strip()
        assert state == "running", f"container {state}: {podman('logs', cid).stderr[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no 200 on /ping after {timeout} s: {podman('logs', cid).stderr}")


def invocations(url: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """The predictions for `images` sent in each format /invocations takes."""
    formats = {
        "inputs": (json.dumps({"inputs": images.tolist()}), "application/json"),
        "instances": (json.dumps({"instances": images.tolist()}), "application/json"),
    }
    answers = {}
    for name, (body, content_type) in formats.items():
        answer = httpx.post(f"{url}/invocations", content=body,
                            headers={"Content-Type": content_type}, timeout=30)
        assert answer.status_code == 200, (name, answer.text)
        answers[name] = np.array(answer.json()["predictions"])
    return answers


def outside_predictions(served_app, images: np.ndarray) -> np.ndarray:
    """What fashion-exp-serve answers for the same model, outside any container."""
    client, _, _ = served_app
    answer = client.post("/invocations", json={"inputs": images.tolist()})
    assert answer.status_code == 200, answer.text
    return np.array(answer.json()["predictions"])


# --- The contract ---------------------------------------------------------------------------

@pytest.mark.slow
def test_the_image_serves_sagemakers_contract_with_the_answers_of_the_service_outside(
        images, served_app, test_images) -> None:
    expected = outside_predictions(served_app, test_images[:4])
    inspect = json.loads(podman("image", "inspect", images.baked).stdout)[0]
    assert inspect["Config"]["Entrypoint"] == ["/opt/venv/bin/python", "-m",
                                               "fashion_exp.cli.container"]  # exec form
    assert inspect["Config"]["Labels"][
        "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    with container(images.baked) as box:  # as SageMaker runs it: root, port 8080
        # The target is 15 s, timed by scripts/bench_image.py (7 s measured on 2 idle cores,
        # docs/deploy.md); this bound only catches a start that hangs, on a machine of any
        # speed (17 s was seen on one busy with other tests).
        assert box.ready_seconds <= 60, f"cold start {box.ready_seconds:.1f} s"
        started = time.monotonic()
        assert httpx.get(f"{box.url}/ping", timeout=2).status_code == 200
        assert time.monotonic() - started < 2
        for name, got in invocations(box.url, test_images[:4]).items():
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        page = httpx.get(f"{box.url}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        png = io.BytesIO()
        from PIL import Image

        Image.fromarray(test_images[0]).save(png, format="PNG")
        predicted = httpx.post(f"{box.url}/predict?top_k=10", timeout=30,
                               files={"files": ("shirt.png", png.getvalue(), "image/png")})
        assert predicted.status_code == 200, predicted.text
        model = httpx.get(f"{box.url}/model", timeout=10).json()
        assert model["uri"] == "models:/fashion_serve/1"  # named by what it was built from


@pytest.mark.slow
def test_a_model_tar_gz_in_opt_ml_model_is_served_read_only_as_a_non_root_user(
        images, served_app, test_images, tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    with tarfile.open(images.tarball) as archive:  # as SageMaker extracts it
        archive.extractall(model, filter="data")
    assert (model / "MLmodel").is_file()
    model.chmod(0o755)
    expected = outside_predictions(served_app, test_images[:4])
    with container(images.generic, "--read-only", "--user", "65534:65534",
                   "-e", "SAGEMAKER_BIND_TO_PORT=9090", "-v", f"{model}:/opt/ml/model:ro",
                   port=9090) as box:
        got = invocations(box.url, test_images[:4])["inputs"]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_then_exits_0_within_30_s(
        images, test_images) -> None:
    body = json.dumps({"inputs": test_images.tolist()})
    statuses: list[int] = []
    with container(images.baked) as box:
        def client() -> None:
            for _ in range(200):
                try:
                    answer = httpx.post(f"{box.url}/invocations", content=body, timeout=30,
                                        headers={"Content-Type": "application/json"})
                except httpx.TransportError:  # the port closed: no new requests after TERM
                    return
                statuses.append(answer.status_code)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60  # every client answered once: requests in flight
        while len(statuses) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = time.monotonic()
        assert podman("kill", "--signal", "TERM", box.id).returncode == 0
        waited = podman("wait", box.id, timeout=40)
        took = time.monotonic() - stopped
        for thread in threads:
            thread.join(timeout=30)
        assert waited.stdout.strip() == "0", (waited.stdout, podman("logs", box.id).stderr)
        assert took < 30
        assert statuses and set(statuses) == {200}, statuses


# --- A bad model folder ---------------------------------------------------------------------

def bad_folder(kind: str, tmp_path: Path, tarball: Path) -> Path:
    """An /opt/ml/model folder that cannot be served."""
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "empty":
        return folder
    with tarfile.open(tarball) as archive:
        archive.extractall(folder, filter="data")
    if kind == "not-keras":
        (folder / "MLmodel").write_text("flavors:\n  sklearn:\n    pickled_model: model.pkl\n"
                                        "  python_function:\n    loader_module: mlflow.sklearn\n")
    else:  # corrupt: the Keras file cut short
        (keras_file,) = folder.rglob("*.keras")
        keras_file.write_bytes(keras_file.read_bytes()[:500])
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind, reason", [
    ("empty", "holds no MLmodel file"),
    ("not-keras", "is not a Keras model logged with MLflow (flavors: ['python_function', "
                  "'sklearn']"),
    ("corrupt", "cannot load the Keras model in /opt/ml/model"),
])
def test_a_bad_model_folder_stops_the_container_in_one_line(images, tmp_path, kind,
                                                            reason) -> None:
    folder = bad_folder(kind, tmp_path, images.tarball)
    done = podman("run", "--rm", "--network", "none", "-v", f"{folder}:/opt/ml/model:ro",
                  images.generic, "serve", timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("fashion-exp-image:")]
    assert ours == [lines[-1]], done.stderr  # one line, the last (TensorFlow logs before it)
    assert ours[0].startswith("fashion-exp-image: error: ") and reason in ours[0], ours[0]
    assert "Traceback" not in done.stderr


# --- Without podman: the lock, the options, the entry point -------------------------------

def test_the_lock_pins_every_requirement_exactly_and_exclude_drops_only_what_it_alone_needs(
        ) -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from fashion_exp.image.lock import runtime_pins
    from fashion_exp.paths import PACKAGE_PARENT

    pins = runtime_pins()
    project = tomllib.loads((PACKAGE_PARENT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        assert pins[canonicalize_name(req.name)] == str(next(iter(req.specifier)).version)
    assert "pytest" not in pins and "playwright" not in pins  # dev extras stay out
    assert {"sqlalchemy", "alembic"} <= set(pins)  # MLflow's own requirements are walked
    trimmed = runtime_pins(["optuna"])
    assert "optuna" not in trimmed and "colorlog" not in trimmed  # only optuna needs colorlog
    assert "sqlalchemy" in trimmed  # MLflow still needs it


@pytest.mark.parametrize("overrides, message", [
    (["tag=Not A Tag"], "tag='Not A Tag': not an image name"),
    (["model_tarball=/tmp/model.tar.gz"], "model_tarball='/tmp/model.tar.gz': needs model_uri="),
    (["no_such_key=1"], "Key 'no_such_key' not in 'ImageConfig'"),
])
def test_bad_options_are_refused_in_one_line(overrides, message) -> None:
    done = fashion_exp_image(*overrides)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


@pytest.mark.parametrize("args, env, message", [
    (["train"], {}, "unknown command 'train': this image only serves"),
    (["serve"], {"FASHION_EXP_MODEL_DIR": "/nonexistent/model"},
     "model folder /nonexistent/model does not exist"),
    (["serve"], {"SAGEMAKER_BIND_TO_PORT": "80a"},
     "SAGEMAKER_BIND_TO_PORT='80a' is not a TCP port"),
])
def test_the_entry_point_refuses_what_it_cannot_serve_in_one_line(args, env, message) -> None:
    import os

    done = subprocess.run([sys.executable, "-m", "fashion_exp.cli.container", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert done.returncode == 2
    assert done.stderr.startswith("fashion-exp-image: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
