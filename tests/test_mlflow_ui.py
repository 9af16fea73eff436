"""The MLflow UI on a real small sweep, in headless Chromium, as a person opens it: the link the
runner prints, the sweep compared in the runs table, a run's charts, a logged model's page."""

from __future__ import annotations

import os
import re
import sys

import mlflow
import pytest

from devtools import servers

from .conftest import REPO, requires_real_data, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.browser, requires_real_data]

# UPDATE_SCREENSHOTS=1 writes the README's screenshot, docs/mlflow_sweep.png.
UPDATE_SCREENSHOTS = bool(os.environ.get("UPDATE_SCREENSHOTS"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT = 1440, 900
SWEEP = ["optimizer.lr=0.01,0.05", "model.hidden=[64],[128,32]"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """The issue's 2x2 sweep, run by the real CLI: its store, printed link, parent, children."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    result = run_cli("-m", *SWEEP, "debug=fast", "trainer.epochs=3", f"tracking.uri={uri}",
                     "tracking.experiment_name=ui", f"hydra.sweep.dir={tmp / 'sweep'}",
                     tmp_path=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"compare them: .* then open http://127\.0\.0\.1:5000/(\S+)",
                        result.stdout)
    assert printed, result.stdout[-2000:]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ui")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") == "child"]
    return {"uri": uri, "link": printed.group(1), "client": client, "parent": parent,
            "children": children, "experiment_id": experiment.experiment_id}


@pytest.fixture(scope="module")
def ui(sweep, tmp_path_factory) -> str:
    """`mlflow server` on the sweep's store: its base URL."""
    port = servers.free_port()
    log = tmp_path_factory.mktemp("mlflow_ui") / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sweep["uri"],
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with servers.running(command, f"http://127.0.0.1:{port}/health", log, env=env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def tab(browser):
    """A new user's tab: nothing remembered from an earlier visit."""
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    yield context.new_page()
    context.close()


def close_assistant(tab) -> None:
    """MLflow opens its assistant panel once on a new browser's first visit; a person closes
    it (the browser remembers)."""
    tab.wait_for_timeout(1500)
    close = tab.locator("button[aria-label='Close']")
    for button in close.all():
        box = button.bounding_box()
        if box and box["x"] > WIDTH * 0.6 and box["y"] < 80:  # the panel's own close button
            button.click()
            tab.wait_for_timeout(500)


def test_the_printed_link_opens_the_sweep_ready_to_compare(sweep, ui, tab, tmp_path) -> None:
    tab.goto(f"{ui}/{sweep['link']}")
    children = sorted(sweep["children"], key=lambda r: -r.data.metrics["best_val_accuracy"])
    names = [r.info.run_name for r in children]
    assert sorted(names) == ["lr=0.01 hidden=[128,32]", "lr=0.01 hidden=[64]",
                             "lr=0.05 hidden=[128,32]", "lr=0.05 hidden=[64]"]
    tab.get_by_text(names[0], exact=True).wait_for(timeout=60_000)
    close_assistant(tab)
    # The model-training pages, not the GenAI ones.
    assert "workflowType=machine_learning" in tab.url
    assert tab.get_by_role("link", name="Judges").count() == 0
    assert tab.get_by_role("link", name="Runs").first.is_visible()
    # The swept params and the key metrics are columns, on screen without scrolling.
    for header in ("optimizer.lr", "model.hidden", "best_val_accuracy", "test_accuracy"):
        cell = tab.get_by_role("columnheader").filter(has_text=header).first
        box = cell.bounding_box()
        assert box and box["x"] + box["width"] <= WIDTH, header
    # Best first, each name whole (not cut off with an ellipsis), only the sweep's jobs.
    shown = [tab.get_by_text(name, exact=True) for name in names]
    ys = [link.bounding_box()["y"] for link in shown]
    assert ys == sorted(ys)
    for link in shown:
        assert link.evaluate("e => e.scrollWidth <= e.clientWidth"), link
    assert tab.get_by_text(sweep["parent"].info.run_name, exact=True).count() == 0
    shot = REPO / "docs" / "mlflow_sweep.png" if UPDATE_SCREENSHOTS else tmp_path / "sweep.png"
    tab.screenshot(path=str(shot))


def test_a_logged_model_carries_its_runs_final_metrics(sweep, ui, tab) -> None:
    client = sweep["client"]
    for run in sweep["children"]:
        (output,) = run.outputs.model_outputs
        model = client.get_logged_model(output.model_id)
        linked = {m.key: m.value for m in model.metrics}
        # Every metric of the run's last step: the last epoch's and the test metrics.
        for key in ("epoch/val_accuracy", "epoch/loss", "test_accuracy", "test_loss",
                    "best_val_accuracy"):
            assert linked[key] == run.data.metrics[key], (run.info.run_name, key)
        assert {m.step for m in model.metrics} == {3}
    run = sweep["children"][0]
    model_id = run.outputs.model_outputs[0].model_id
    tab.goto(f"{ui}/#/experiments/{sweep['experiment_id']}/models/{model_id}"
             "?workflowType=machine_learning")
    row = tab.get_by_role("row").filter(has_text="epoch/val_accuracy").first
    row.wait_for(timeout=60_000)
    assert str(run.data.metrics["epoch/val_accuracy"]) in row.inner_text()


def test_a_runs_charts_start_with_the_learning_curves(sweep, ui, tab) -> None:
    run = sweep["children"][0]
    tab.goto(f"{ui}/#/experiments/{sweep['experiment_id']}/runs/{run.info.run_id}"
             "/model-metrics?workflowType=machine_learning")
    tab.get_by_text("Add chart").first.wait_for(timeout=60_000)
    tab.wait_for_timeout(1000)
    # Each section's heading reads "<name>\n(<charts>)\nAdd chart".
    sections = re.findall(r"^([^\n]+)\n\((\d+)\)\nAdd chart$", tab.inner_text("body"), re.M)
    assert sections == [("epoch", "4"), ("test_class_accuracy", "10"), ("training", "2"),
                        ("Model metrics", "4")]


def test_the_sweeps_parent_says_what_was_swept_and_fixed(sweep, ui, tab) -> None:
    parent = sweep["parent"]
    tab.goto(f"{ui}/#/experiments/{sweep['experiment_id']}/runs/{parent.info.run_id}"
             "?workflowType=machine_learning")
    tab.get_by_text("Best:", exact=False).first.wait_for(timeout=60_000)
    text = tab.inner_text("body")
    assert "Sweep of optimizer.lr model.hidden with debug=fast trainer.epochs=3" in text
    assert re.search(r"Parameters \((\d+)\)", text).group(1) != "0"
    for metric in ("best_val_accuracy", "test_accuracy", "test_loss"):
        assert metric in text
    assert "jobs_total" in text and "jobs_failed" in text  # tags, not empty-looking charts
