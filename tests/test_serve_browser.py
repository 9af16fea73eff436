"""The web page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from fashion_exp import data, servers
from fashion_exp.preprocess import render_product_photo

from .conftest import real_data_dir

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, no sandbox (tests may run as root), and no calls home: the machine may be offline.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def service(served_store, tmp_path_factory):
    """fashion-exp-serve as a real server on a free port: its base URL."""
    uri, run_id = served_store
    port = servers.free_port()
    log = tmp_path_factory.mktemp("browser") / "serve.log"
    command = servers.serve_command(f"runs:/{run_id}/model", port, uri,
                                    "tracking.experiment_name=serve")
    with servers.running(command, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def page(service):
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not installed: ./dev.sh setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1100, "height": 900})
        # blob: and data: URLs are the page's own images; anything else must be the service.
        tab.on("request", lambda r: None if r.url.startswith((service, "blob:", "data:"))
               else outside.append(r.url))
        tab.goto(f"{service}/")
        tab.outside_requests = outside
        yield tab
        browser.close()


def test_upload_a_photo_and_read_the_prediction(page, service, tmp_path) -> None:
    x = data.read_idx(real_data_dir() / data.FILES["x_test"])
    photo = tmp_path / "my_photo.jpg"
    photo.write_bytes(render_product_photo(x[0], np.random.default_rng(3)))
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('bars').children.length === 5")
    shown = page.text_content("#verdict")
    with photo.open("rb") as f:
        api = httpx.post(f"{service}/predict", files={"files": ("my_photo.jpg", f)}).json()
    best = api["predictions"][0]["top"][0]
    assert shown == f"{best['label']} ({100 * best['probability']:.1f}%)"
    # The canvas shows the 28x28 image the model saw, pixel for pixel.
    drawn = page.evaluate("""() => Array.from(document.getElementById('seen').getContext('2d')
                              .getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))""")
    assert drawn == sum(api["predictions"][0]["image"], [])
    assert page.text_content("#error") == ""
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert page.outside_requests == []  # nothing fetched from anywhere but the service


def test_random_test_image_and_model_picker(page, served_store) -> None:
    page.click("#random")
    page.wait_for_function("document.getElementById('truth').textContent.includes('true label')")
    page.wait_for_function("document.getElementById('verdict').textContent !== ''")
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    _, run_id = served_store
    assert options[0] == f"runs:/{run_id}/model" and "models:/fashion_serve/1" in options
    page.select_option("#model", "models:/fashion_serve/1")
    page.wait_for_function("document.getElementById('model-info').textContent"
                           ".includes('registered as fashion_serve v1')")
    page.set_input_files("#file", files=[{"name": "junk.png", "mimeType": "image/png",
                                           "buffer": b"not really a png"}])
    page.wait_for_function("document.getElementById('error').textContent.includes('junk.png')")
    assert "not a readable image" in page.text_content("#error")
