"""The web page in a real headless Chromium (Debian's), driven by Playwright, as a person uses
it: on a desktop and on a phone. Every tab fails its test on a console error (a 404 included),
an uncaught exception or a request to anywhere but the service."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
from PIL import Image

from devtools import servers
from fashion_exp.core import data
from fashion_exp.core.preprocess import render_product_photo

from .helpers import REPO, real_data_dir

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, no sandbox (tests may run as root), and no calls home: the machine may be offline.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"viewport": {"width": 1000, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True,
         "has_touch": True}
# UPDATE_SCREENSHOTS=1 writes the README's screenshot, docs/serve_page.png; otherwise the
# screenshots go to the tests' temporary folders.
UPDATE_SCREENSHOTS = bool(os.environ.get("UPDATE_SCREENSHOTS"))
OTHER_MODEL = "models:/fashion_serve/1"  # the conftest's store registers its model as this

# The images and canvases a person sees, and whether each shows a picture.
SHOWN = """() => [...document.querySelectorAll('img, canvas')].filter((e) => e.checkVisibility())
  .map((e) => ({id: e.id, width: e.getBoundingClientRect().width,
                pixelated: getComputedStyle(e).imageRendering === 'pixelated',
                loaded: e.tagName === 'CANVAS' || (e.complete && e.naturalWidth > 0)}))"""
# How wide the page is laid out. On a phone, content wider than the screen (a long word) widens
# the layout past the screen's width, and the page scrolls sideways.
LAYOUT_WIDTH = "[innerWidth, document.documentElement.scrollWidth]"
UPLOAD_LOADED = "(img => img.complete && img.naturalWidth > 0)(document.getElementById('upload'))"
BARS_SHOWN = "document.getElementById('bars').children.length === 5"


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
def browser(service):
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not installed: ./dev.sh setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_tab(browser, service: str, **options):
    """The page, loaded in a new tab; after the test, no problems and nothing from outside.

    tab.problems collects console errors and uncaught exceptions; a test that expects one
    (a refused request logs its status) takes it out."""
    tab = browser.new_page(**options)
    tab.problems, tab.outside_requests = [], []
    tab.on("console", lambda m: m.type == "error" and tab.problems.append(
        f"{m.text} ({m.location['url']})"))
    tab.on("pageerror", lambda err: tab.problems.append(f"uncaught {err}"))
    # blob: and data: URLs are the page's own images; anything else must be the service.
    tab.on("request", lambda r: None if r.url.startswith((service, "blob:", "data:"))
           else tab.outside_requests.append(r.url))
    tab.goto(f"{service}/")
    tab.wait_for_function("document.getElementById('model-info').textContent !== ''")
    yield tab
    problems, outside = tab.problems, tab.outside_requests
    tab.close()
    assert problems == [], "the browser's console shows errors"
    assert outside == [], "the page fetched something from elsewhere than the service"


@pytest.fixture
def page(browser, service):
    yield from open_tab(browser, service, **DESKTOP)


@pytest.fixture
def phone(browser, service):
    yield from open_tab(browser, service, **PHONE)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A product photo of the test set's first sneaker."""
    x = data.read_idx(real_data_dir() / data.FILES["x_test"])
    y = data.read_idx(real_data_dir() / data.FILES["y_test"])
    path = tmp_path_factory.mktemp("photos") / "my_sneaker.jpg"
    path.write_bytes(render_product_photo(x[np.flatnonzero(y == 7)[0]],
                                          np.random.default_rng(3)))
    return path


def api_prediction(service: str, photo: Path, model: str | None = None) -> dict:
    """The service's own answer for the photo: what the page must show."""
    params = {"top_k": 5, **({"model": model} if model else {})}
    with photo.open("rb") as f:
        answer = httpx.post(f"{service}/predict", params=params, files={"files": (photo.name, f)})
    assert answer.status_code == 200, answer.text
    return answer.json()


UNSURE_TOP, UNSURE_GAP = 0.5, 0.15  # the page's rule for a low-confidence answer


def unsure(top: list[dict]) -> bool:
    return (top[0]["probability"] < UNSURE_TOP
            or len(top) > 1 and top[0]["probability"] - top[1]["probability"] < UNSURE_GAP)


def verdict_of(answer: dict) -> str:
    """The verdict the page shows: the best class, or a question when the model is unsure."""
    top = answer["predictions"][0]["top"]
    shown = [f"{c['label']} ({100 * c['probability']:.1f}%)" for c in top[:2]]
    return f"Not sure: {shown[0]} or {shown[1]}?" if unsure(top) else shown[0]


def upload(tab, photo: Path) -> None:
    tab.set_input_files("#file", str(photo))
    tab.wait_for_function(f"{BARS_SHOWN} && {UPLOAD_LOADED}")


def hold(tab, part: str, action):
    """Runs `action` and returns its first request whose URL has `part`, held unanswered
    until the test answers it. Later requests go through."""
    held: list = []

    def keep_first(route) -> None:
        if held:
            route.fallback()
        else:
            held.append(route)

    tab.route(lambda url: part in url, keep_first)
    action()
    while not held:
        tab.wait_for_timeout(20)
    return held[0]


def test_first_load_shows_nothing_broken_and_readable_model_names(page, service,
                                                                  served_store) -> None:
    assert page.evaluate(SHOWN) == []  # no broken image, no empty black canvas
    assert not page.is_visible("#verdict") and page.text_content("#error") == ""
    options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.text])")
    _, run_id = served_store
    default = httpx.get(f"{service}/model").json()
    assert options[0] == [f"runs:/{run_id}/model", f"default: {default['run_name']} "
                          f"(test {default['metrics']['test_accuracy']:.4f})"]
    assert [OTHER_MODEL, "fashion_serve v1"] in options
    assert all(uri not in label for uri, label in options)  # a name, not the raw URI
    assert page.get_attribute("link[rel=icon]", "href").startswith("data:image/svg+xml,")
    # What it knows, where its model came from, and the API's description.
    assert page.eval_on_selector_all("#classes li", "ls => ls.map(l => l.textContent)") == \
        default["classes"] and len(default["classes"]) == 10
    assert page.is_visible("#known") and page.text_content("#class-count") == "10"
    link = page.get_attribute("#run-link", "href")
    assert link == default["run_url"] and page.is_visible("#run-link")
    experiment = mlflow.MlflowClient(served_store[0]).get_run(run_id).info.experiment_id
    assert link == (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
                    "?workflowType=machine_learning")  # the local UI: ./dev.sh ui
    assert page.get_attribute("#docs-link", "href") == "/docs"
    assert httpx.get(f"{service}/docs").status_code == 200
    assert httpx.get(f"{service}/favicon.ico").status_code == 204  # for browsers that ask


def test_upload_a_photo_and_read_the_prediction(page, service, photo, tmp_path) -> None:
    upload(page, photo)
    api = api_prediction(service, photo)
    assert page.text_content("#verdict") == verdict_of(api)
    info = httpx.get(f"{service}/model").json()
    assert page.text_content("#answered-by") == f"Answered by run {info['run_name']}"
    confidence = "low" if unsure(api["predictions"][0]["top"]) else "high"
    assert page.get_attribute("#result", "data-confidence") == confidence
    assert page.get_attribute("#verdict", "data-model") == api["model"]["uri"]
    # The canvas shows the 28x28 image the model saw, pixel for pixel.
    drawn = page.evaluate("""() => Array.from(document.getElementById('seen').getContext('2d')
                              .getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0))""")
    assert drawn == sum(api["predictions"][0]["image"], [])
    shown = page.evaluate(SHOWN)
    assert [(s["id"], s["loaded"]) for s in shown] == [("upload", True), ("seen", True)]
    assert page.text_content("#error") == "" and page.text_content("#truth") == ""
    shot = REPO / "docs" / "serve_page.png" if UPDATE_SCREENSHOTS else tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_random_test_image_is_shown_large_and_replaces_the_upload(page, photo) -> None:
    upload(page, photo)
    page.click("#random")
    page.wait_for_function("document.getElementById('truth').textContent.includes('true label')"
                           f" && {BARS_SHOWN} && {UPLOAD_LOADED}")
    assert page.get_attribute("#upload", "src").startswith("data:image/png")
    best = page.text_content("#bars li:first-child span")  # the best class's name
    truth = page.text_content("#truth")
    right = truth.split("true label: ")[1].startswith(best + " ")
    assert page.get_attribute("#truth", "data-correct") == str(right).lower()
    assert truth.endswith("\u2713 right" if right else "\u2717 wrong")
    upload_shown, seen = page.evaluate(SHOWN)
    assert upload_shown["width"] >= 140 and upload_shown["width"] == seen["width"]
    assert upload_shown["pixelated"] and upload_shown["loaded"]
    upload(page, photo)  # and back: the test image's label goes with it
    assert page.text_content("#truth") == ""
    assert page.get_attribute("#truth", "data-correct") is None
    assert page.get_attribute("#upload", "src").startswith("blob:")
    assert not page.evaluate(SHOWN)[0]["pixelated"]


def answer_with(top: list[tuple[str, float]]) -> dict:
    """A /predict answer of the registered model with these class probabilities (the rest of
    the top 5 at 0)."""
    rest = [(label, 0.0) for label in ("Pullover", "Ankle boot", "Bag", "Coat", "Dress")
            if label not in dict(top)]
    return {"model": {**STALE_PREDICTION["model"], "uri": OTHER_MODEL, "name": "fashion_serve"},
            "predictions": [{"source": "x", "image": [[0] * 28] * 28, "top": [
                {"label": label, "index": 0, "probability": p}
                for label, p in (top + rest)[:5]]}]}


@pytest.mark.parametrize(("top", "confidence", "verdict", "note"), [
    ([("Bag", 0.401), ("Sneaker", 0.400), ("Sandal", 0.1)], "low",
     "Not sure: Bag (40.1%) or Sneaker (40.0%)?", "The model is not sure: its best guess has only"),
    ([("Shirt", 0.55), ("T-shirt/top", 0.42), ("Coat", 0.03)], "low",
     "Not sure: Shirt (55.0%) or T-shirt/top (42.0%)?", "cannot decide: Shirt and T-shirt/top "
                                                        "are 13.0 points apart"),
    ([("Trouser", 0.9), ("Dress", 0.05), ("Bag", 0.05)], "high", "Trouser (90.0%)", None),
], ids=["top-two-close-and-low", "top-two-close", "sure"])
def test_a_low_confidence_answer_says_the_model_is_not_sure(page, service, photo, top,
                                                            confidence, verdict, note,
                                                            tmp_path) -> None:
    page.route("**/predict?*", lambda route: route.fulfill(json=answer_with(top)))
    upload(page, photo)
    page.wait_for_function(f"document.getElementById('verdict').dataset.model === "
                           f"'{OTHER_MODEL}'")
    assert page.get_attribute("#result", "data-confidence") == confidence
    assert page.text_content("#verdict") == verdict
    assert page.is_visible("#unsure") == (note is not None)
    if note:
        assert note in page.text_content("#unsure")
        shot = (REPO / "docs" / "serve_page_unsure.png" if UPDATE_SCREENSHOTS and
                confidence == "low" and top[0][1] < 0.5 else tmp_path / "unsure.png")
        page.locator("#result").screenshot(path=str(shot))
    # The model that answered, by its registered name (and its run, once described).
    assert page.text_content("#answered-by").startswith("Answered by fashion_serve v1 (run ")


def test_model_switch_shows_only_the_new_models_answer(page, service, photo) -> None:
    upload(page, photo)
    default = page.input_value("#model")
    # Right after the switch, in the same task: nothing the old model said is left.
    left = page.evaluate("""(uri) => {
        const select = document.getElementById('model');
        select.value = uri;
        select.dispatchEvent(new Event('change'));
        return [document.getElementById('verdict').textContent,
                document.getElementById('bars').children.length,
                document.getElementById('model-info').textContent];
    }""", OTHER_MODEL)
    assert left == ["", 0, ""]
    page.wait_for_function(f"document.getElementById('verdict').dataset.model === '{OTHER_MODEL}'"
                           f" && {BARS_SHOWN}")
    assert page.text_content("#verdict") == verdict_of(api_prediction(service, photo,
                                                                      OTHER_MODEL))
    page.wait_for_function("document.getElementById('model-info').textContent"
                           ".includes('registered as fashion_serve v1')")
    page.select_option("#model", default)
    page.wait_for_function(f"document.getElementById('verdict').dataset.model === '{default}'"
                           f" && {BARS_SHOWN}")


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 200).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(("name", "content", "status", "message"), [
    ("junk.png", b"not really a png", 415, "not a readable image"),  # the browser cannot show it
    ("thin.png", png(400, 4), 422, "too thin"),  # the browser can, the service refuses it
], ids=["not-an-image", "too-thin"])
def test_a_failed_upload_leaves_only_its_error(page, photo, name, content, status,
                                               message) -> None:
    upload(page, photo)
    page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png",
                                          "buffer": content}])
    page.wait_for_function(f"document.getElementById('error').textContent.includes('{name}')")
    assert message in page.text_content("#error")
    assert page.evaluate(SHOWN) == []  # neither the old image nor the new one
    assert not page.is_visible("#verdict") and not page.is_visible("#bars")
    refused = [p for p in page.problems if f"status of {status}" in p and "/predict" in p]
    assert len(refused) == 1  # Chromium logs every refused request
    page.problems.remove(refused[0])
    upload(page, photo)  # and the next photo is shown as usual
    assert page.text_content("#error") == ""


STALE_PREDICTION = {
    "model": {"uri": "models:/stale/1", "run_id": "0" * 32, "model_id": "m-" + "0" * 32,
              "name": "stale", "version": "1"},
    "predictions": [{"source": "stale", "image": [[0] * 28] * 28,
                     "top": [{"label": "Bag", "index": 8, "probability": 0.999}]}]}


def test_a_late_answer_to_an_older_upload_is_ignored(page, photo) -> None:
    older = hold(page, "/predict", lambda: page.set_input_files("#file", str(photo)))
    page.click("#random")
    page.wait_for_function(f"document.getElementById('truth').textContent !== '' && {BARS_SHOWN}")
    shown = page.text_content("#verdict"), page.get_attribute("#verdict", "data-model")
    older.fulfill(json=STALE_PREDICTION)
    page.wait_for_timeout(300)
    assert (page.text_content("#verdict"), page.get_attribute("#verdict", "data-model")) == shown
    assert page.text_content("#truth") != ""


def test_a_late_random_image_is_ignored(page, photo) -> None:
    older = hold(page, "/samples/random", lambda: page.click("#random"))
    upload(page, photo)
    shown = page.text_content("#verdict")
    older.fulfill(json={"index": 0, "label": "Bag", "image": [[0] * 28] * 28})
    page.wait_for_timeout(300)
    assert page.text_content("#verdict") == shown and page.text_content("#truth") == ""
    assert page.get_attribute("#upload", "src").startswith("blob:")


# The phone's model choices: the widest one's right edge, and whether any is cut.
CHOICES = """() => [...document.querySelectorAll('#choices label')].map((l) => ({
  text: l.textContent, right: l.getBoundingClientRect().right,
  cut: l.scrollWidth > l.clientWidth}))"""


def test_phone_shows_whole_model_choices_and_touch_wording(phone, service) -> None:
    choices = phone.evaluate(CHOICES)
    labels = phone.eval_on_selector_all("#model option", "os => os.map(o => o.text)")
    assert [c["text"] for c in choices] == labels and len(labels) >= 2
    assert all(c["right"] <= PHONE["viewport"]["width"] and not c["cut"] for c in choices)
    assert not phone.is_visible("#model")  # the picker would cut its longest name
    phone.check(f"#choices input[value='{OTHER_MODEL}']")
    assert phone.input_value("#model") == OTHER_MODEL
    phone.wait_for_function("document.getElementById('model-info').textContent"
                            ".includes('registered as fashion_serve v1')")
    assert not phone.is_visible("#drop .pointer-only")  # "Drop a photo here"
    assert phone.text_content("#drop .touch-only") == "Choose a photo"
    assert phone.is_visible("#drop .touch-only")


def test_desktop_says_drop_a_photo_and_has_a_picker(page) -> None:
    assert page.is_visible("#drop .pointer-only") and not page.is_visible("#drop .touch-only")
    assert page.text_content("#drop .pointer-only").startswith("Drop a photo here")
    assert page.is_visible("#model") and not page.is_visible("#choices")


def test_phone_scrolls_the_verdict_into_view(phone, photo, tmp_path) -> None:
    screen = [PHONE["viewport"]["width"]] * 2
    assert phone.evaluate(LAYOUT_WIDTH) == screen  # nothing to scroll sideways to
    upload(phone, photo)
    # Scrolled into view (smoothly) when it lands below the fold: the whole result, bars too
    # (+1: layout has fractions of a pixel, scrolling does not).
    phone.wait_for_function("""(r => r.top >= 0 && r.bottom <= innerHeight + 1)(
                                 document.getElementById('result').getBoundingClientRect())""")
    assert phone.evaluate(LAYOUT_WIDTH) == screen
    assert all(s["width"] >= 140 for s in phone.evaluate(SHOWN))
    shot = REPO / "docs" / "serve_page_phone.png" if UPDATE_SCREENSHOTS else tmp_path / "phone.png"
    phone.screenshot(path=str(shot), full_page=True)
