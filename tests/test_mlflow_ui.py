"""The MLflow UI on a real small sweep and a real small search, in headless Chromium, as a person
opens them: the link the runner prints, the sweep compared in the runs table, a search's swept
keys on a laptop's screen, a run's charts, a logged model's page."""

from __future__ import annotations

import os
import re
import sys

import mlflow
import pytest

from devtools import servers

from .helpers import REPO, requires_real_data, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.browser, requires_real_data]

# UPDATE_SCREENSHOTS=1 writes the README's screenshot, docs/mlflow_sweep.png, and the search's,
# docs/search_view.png.
UPDATE_SCREENSHOTS = bool(os.environ.get("UPDATE_SCREENSHOTS"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH, HEIGHT = 1440, 900
SWEEP = ["optimizer.lr=0.01,0.02,0.05", "model=mlp,cnn"]  # the README's sweep
EPOCHS = 2
# hparams_search=mlp_optuna's 7 swept keys, tiny: 4 trials of 2 epochs on 500 images, halving
# at epoch 1 so that some trials are pruned.
SEARCH = ["hparams_search=mlp_optuna", "debug=fast", "data.limit=500", "trainer.epochs=2",
          "trainer.early_stopping=false", "tracking.log_model=false", "tracking.figures=false",
          "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner.reduction_factor=2",
          "hydra.sweeper.study_name=ui_search"]
SEARCH_KEYS = ["optimizer", "optimizer.lr", "model.hidden", "model.dropout",
               "trainer.batch_size", "schedule", "trainer.label_smoothing"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """The README's 3x2 sweep, run by the real CLI (debug=fast): its store, printed link,
    parent, children."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    result = run_cli("-m", *SWEEP, "debug=fast", f"trainer.epochs={EPOCHS}", f"tracking.uri={uri}",
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
def search(sweep, tmp_path_factory) -> dict:
    """A tiny pruned search of hparams_search=mlp_optuna in the sweep's store: its printed link
    and its trials' runs."""
    tmp = tmp_path_factory.mktemp("ui_search")
    result = run_cli("-m", *SEARCH, f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
                     f"tracking.uri={sweep['uri']}", "tracking.experiment_name=ui",
                     f"hydra.sweep.dir={tmp / 'sweep'}", tmp_path=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"compare them: .* then open http://127\.0\.0\.1:5000/(\S+)",
                        result.stdout)
    assert printed, result.stdout[-2000:]
    client = sweep["client"]
    runs = client.search_runs([sweep["experiment_id"]], "tags.optuna_study = 'ui_search'")
    return {"link": printed.group(1), "trials": runs}


@pytest.fixture(scope="module")
def ui(sweep, search, tmp_path_factory) -> str:
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


def headers_on_screen(tab, headers: list[str]) -> None:
    """Each header is a column whose header is whole and inside the window, no scrolling."""
    for header in headers:
        cell = tab.get_by_role("columnheader").filter(
            has=tab.get_by_text(header, exact=True)).first
        box = cell.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH, header
        assert cell.evaluate("""(e, name) => {  // the header's text is not cut
            const text = [...e.querySelectorAll('*')].find(n => n.textContent.trim() === name
                                                             && !n.children.length);
            return text && text.scrollWidth <= text.clientWidth + 1;}""", header), header


# {run name: the text of one column's cell} of the rows shown (the grid draws its pinned
# columns, the name among them, in rows of their own: matched by row index).
COLUMN_BY_NAME = """(colId) => {
    const cells = (id) => Object.fromEntries([...document.querySelectorAll(
        `.ag-cell[col-id="${id}"]`)].map(c => [c.closest('[row-index]').getAttribute('row-index'),
                                               (c.querySelector('a') || c).innerText.trim()]));
    const names = cells('attributes.`Run Name`'), values = cells(colId);
    return Object.fromEntries(Object.keys(names).map(i => [names[i], values[i]]));}"""


def column_by_name(tab, col_id: str) -> dict[str, str]:
    """What one column shows for each run, by run name."""
    return tab.evaluate(COLUMN_BY_NAME, col_id)


def names_whole(tab, names: list[str]) -> list:
    """The runs' name links, each shown whole (not cut off with an ellipsis)."""
    shown = [tab.get_by_text(name, exact=True) for name in names]
    for link in shown:
        assert link.evaluate("e => e.scrollWidth <= e.clientWidth"), link
        box = link.bounding_box()
        assert box["x"] + box["width"] <= WIDTH
    return shown


def test_the_printed_link_opens_the_sweep_ready_to_compare(sweep, ui, tab, tmp_path) -> None:
    tab.goto(f"{ui}/{sweep['link']}")
    children = sorted(sweep["children"], key=lambda r: -r.data.metrics["best_val_accuracy"])
    names = [r.info.run_name for r in children]
    assert sorted(names) == [f"lr={lr} model={m}" for lr in ("0.01", "0.02", "0.05")
                             for m in ("cnn", "mlp")]
    tab.get_by_text(names[0], exact=True).wait_for(timeout=60_000)
    close_assistant(tab)
    # The model-training pages, not the GenAI ones.
    assert "workflowType=machine_learning" in tab.url
    assert tab.get_by_role("link", name="Judges").count() == 0
    assert tab.get_by_role("link", name="Runs").first.is_visible()
    # The swept keys (the model's option as `model`) and the key metrics are columns, on screen.
    headers_on_screen(tab, ["optimizer.lr", "model", "best_val_accuracy", "test_accuracy"])
    # The option column is filled: each row shows its run's model.
    assert column_by_name(tab, "params.`model`") == {
        r.info.run_name: r.data.params["model"] for r in children}
    # Best first, each name whole, only the sweep's jobs.
    ys = [link.bounding_box()["y"] for link in names_whole(tab, names)]
    assert ys == sorted(ys)
    assert tab.get_by_text(sweep["parent"].info.run_name, exact=True).count() == 0
    shot = REPO / "docs" / "mlflow_sweep.png" if UPDATE_SCREENSHOTS else tmp_path / "sweep.png"
    tab.screenshot(path=str(shot))


def test_a_searchs_view_shows_every_swept_key_and_its_pruned_trials(search, ui, tab,
                                                                     tmp_path) -> None:
    tab.goto(f"{ui}/{search['link']}")
    trials = search["trials"]
    names = [r.info.run_name for r in trials]
    tab.get_by_text(names[0], exact=True).wait_for(timeout=60_000)
    close_assistant(tab)
    headers_on_screen(tab, SEARCH_KEYS)
    names_whole(tab, names)
    # A trial's name says whether it was pruned: `trial 3 (pruned at epoch 1)`, else `trial 3`.
    assert len(trials) == 4
    for run in trials:
        number = run.data.tags["optuna_trial"]
        if run.data.tags.get("pruned") == "true":
            epoch = run.data.tags["pruned_at_epoch"]
            assert run.info.run_name == f"trial {number} (pruned at epoch {epoch})"
            assert int(epoch) < EPOCHS  # a trial judged at its last epoch is complete
            assert "test_accuracy" not in run.data.metrics
        else:
            assert run.info.run_name == f"trial {number}"
            assert "test_accuracy" in run.data.metrics
    shot = REPO / "docs" / "search_view.png" if UPDATE_SCREENSHOTS else tmp_path / "search.png"
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
        assert {m.step for m in model.metrics} == {EPOCHS}
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
    assert f"Sweep of optimizer.lr model with debug=fast trainer.epochs={EPOCHS}" in text
    assert re.search(r"Parameters \((\d+)\)", text).group(1) != "0"
    for metric in ("best_val_accuracy", "test_accuracy", "test_loss"):
        assert metric in text
    assert "jobs_total" in text and "jobs_failed" in text  # tags, not empty-looking charts
