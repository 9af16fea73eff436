"""What a person reads in the MLflow UI: metric names and values, run names, saved views."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from omegaconf import OmegaConf

from fashion_exp.cli import compare
from fashion_exp.core import metrics
from fashion_exp.sweeps import leaderboard, multirun
from fashion_exp.tracking import views


def test_float32_values_are_written_as_their_shortest_decimal() -> None:
    assert float(np.float32(0.695)) == 0.6949999928474426  # what MLflow showed before
    assert metrics.tidy(float(np.float32(0.695))) == 0.695
    assert metrics.tidy(1 / 3) == 1 / 3  # a float64 value keeps its digits
    assert metrics.tidy(4) == 4.0 and metrics.tidy(float("inf")) == float("inf")


def test_metric_names_put_the_learning_curves_in_the_first_section() -> None:
    names = [metrics.epoch_metric(k) for k in ("loss", "val_accuracy", "learning_rate",
                                               "epoch_seconds")]
    assert names == ["epoch/loss", "epoch/val_accuracy", "training/learning_rate",
                     "training/epoch_seconds"]
    sections = sorted({n.split("/")[0] for n in [*names, metrics.PER_CLASS_PREFIX + "bag"]})
    assert sections[0] == "epoch"  # MLflow shows prefixed sections alphabetically
    assert metrics.objective_metric("val_accuracy") == "best_val_accuracy"
    assert metrics.objective_metric("test_loss") == "test_loss"


@pytest.mark.parametrize(("keys", "short"), [
    (["optimizer.lr", "model.hidden"], ["lr", "hidden"]),
    (["model.size", "data.size", "trainer.seed"], ["model.size", "data.size", "seed"]),
    (["a.b.c", "x.b.c"], ["a.b.c", "x.b.c"]),
    (["size", "model.size"], ["size", "model.size"]),
])
def test_swept_keys_are_shortened_only_as_far_as_they_stay_distinct(keys, short) -> None:
    assert list(multirun.short_keys(keys).values()) == short


def test_child_run_names_show_what_varies_briefly() -> None:
    keys = ["optimizer.lr", "model.hidden"]
    assert multirun.child_run_name(["debug=fast", "optimizer.lr=0.05", "model.hidden=[64]"],
                                 keys) == "lr=0.05 hidden=[64]"
    # A sampler's float is cut to 4 significant digits; integers and words stay whole.
    assert multirun.child_run_name(["optimizer.lr=0.012345678", "model.hidden=[128,32]"],
                                 keys) == "lr=0.01235 hidden=[128,32]"
    assert multirun.child_run_name(["+trainer.seed=12345678"], ["trainer.seed"]) \
        == "seed=12345678"
    assert multirun.short_value("1000000000.0") == "1e+09"
    assert multirun.short_value("adam") == "adam"


def test_a_sweep_view_shows_swept_params_then_key_metrics_best_first() -> None:
    state = views.sweep_state("abc", ["optimizer.lr", "model"], "val_accuracy")
    assert state["selectedColumns"] == [
        "params.`optimizer.lr`", "params.`model`", "metrics.`best_val_accuracy`",
        "metrics.`test_accuracy`", "metrics.`test_loss`", "attributes.`Models`"]
    # Left to right: name, created, what was swept, the optimized value; Duration last.
    assert state["columnOrder"][:6] == ["0", "attributes.`Run Name`", "runDateAndNestInfo",
                                        "params.`optimizer.lr`", "params.`model`",
                                        "metrics.`best_val_accuracy`"]
    assert state["columnOrder"][-1] == "duration"
    assert state["searchFilter"] == "tags.sweep_id = 'abc' and tags.sweep = 'child'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best_val_accuracy`", False)
    loss = views.sweep_state("abc", ["trainer.seed"], "test_loss")
    assert (loss["orderByKey"], loss["orderByAsc"]) == ("metrics.`test_loss`", True)
    assert loss["selectedColumns"].count("metrics.`test_loss`") == 1
    json.dumps(state)  # stored as an experiment tag
    pruned = views.sweep_state("abc", ["optimizer.lr"], "val_accuracy", ("pruned_at_epoch",))
    assert "tags.`pruned_at_epoch`" in pruned["selectedColumns"]
    assert "tags.`pruned_at_epoch`" in pruned["columnOrder"]
    search = OmegaConf.create({"hydra": {"sweeper": {"pruner": {
        "_target_": "optuna.pruners.MedianPruner"}}}})
    assert multirun.view_tags(search) == ("pruned_at_epoch",)
    search.hydra.sweeper.pruner._target_ = "optuna.pruners.NopPruner"
    assert multirun.view_tags(search) == () == multirun.view_tags(OmegaConf.create({}))


def test_a_seven_key_search_view_fits_a_laptop_screen() -> None:
    """The pinned columns and every swept key of hparams_search=mlp_optuna within the runs
    table's 1186 px at 1440 px (measured in Chromium; the browser test checks it for real)."""
    keys = ["optimizer", "optimizer.lr", "model.hidden", "model.dropout",
            "trainer.batch_size", "schedule", "trainer.label_smoothing"]
    names = ["trial 12", "trial 13 (pruned at epoch 3)"]
    widths = views.sweep_state("abc", keys, "val_accuracy", ("pruned_at_epoch",),
                               names)["columnWidths"]
    checkbox = 73
    shown = checkbox + sum(widths[c] for c in ("attributes.`Run Name`", "runDateAndNestInfo"))
    assert shown + sum(widths[f"params.`{k}`"] for k in keys) <= 1186
    assert widths["attributes.`Run Name`"] >= 5.1 * len(names[1]) + 30  # the name whole
    for key in keys:  # each header whole, at about 6 px a character
        assert widths[f"params.`{key}`"] >= 6 * len(key) + 24


def test_links_open_the_model_training_pages() -> None:
    assert views.view_link("3", "abc") == \
        "#/experiments/3/runs?viewStateShareKey=abc&workflowType=machine_learning"
    link = views.search_link("3", "params.model.name = 'cnn'", "best_val_accuracy")
    query = parse_qs(urlsplit(link.removeprefix("#")).query)
    assert query["searchFilter"] == ["params.model.name = 'cnn'"]
    assert query["orderByKey"] == ["metrics.`best_val_accuracy`"]
    assert query["workflowType"] == ["machine_learning"]
    assert views.ui_hint("http://tracker:5000/", "#/x") == "open http://tracker:5000/#/x"
    assert views.ui_hint("sqlite:////a/mlflow.db", "#/x") == \
        "mlflow ui --backend-store-uri sqlite:////a/mlflow.db  then open http://127.0.0.1:5000/#/x"


def test_leaderboard_cells_have_at_most_four_significant_digits() -> None:
    rows = [{"run": "a", "optimizer.lr": "0.0024234724484675954", "batch": "128",
             "best_val_accuracy": 0.6949999928474426, "test_loss": 1.115445,
             "duration_s": 12345.6}]
    table = leaderboard.markdown(rows)
    assert "| a | 0.002423 | 128 | 0.695 | 1.115 | 12346 |" in table
    assert leaderboard.short_number("adam") == "adam" and leaderboard.short_number(None) == ""
    assert leaderboard.short_number("[128, 32]") == "[128, 32]"
    assert leaderboard.metric_columns("val_accuracy") == ["best_val_accuracy", "test_accuracy",
                                                      "test_loss"]
    assert leaderboard.metric_columns("test_accuracy") == ["test_accuracy", "test_loss"]


def test_metric_against_params_names_the_metric_and_colours_the_other_param() -> None:
    rows = [{"optimizer.lr": lr, "model": m, "best_val_accuracy": acc, "status": "FINISHED"}
            for lr, m, acc in [("0.01", "mlp", 0.5), ("0.05", "mlp", 0.7),
                               ("0.01", "cnn", 0.46), ("0.05", "cnn", 0.68)]]
    fig = compare.params_figure(rows, ["optimizer.lr", "model"], "best_val_accuracy")
    lr_panel, model_panel = fig.axes
    assert lr_panel.get_ylabel() == "best_val_accuracy" and lr_panel.get_xlabel() == "optimizer.lr"
    assert [t.get_text() for t in lr_panel.get_legend().get_texts()] == ["cnn", "mlp"]
    assert [t.get_text() for t in model_panel.get_legend().get_texts()] == ["0.01", "0.05"]
    assert [t.get_text() for t in model_panel.get_xticklabels()] == ["cnn", "mlp"]  # categories


def test_metric_against_seven_params_is_a_readable_grid_without_warnings(tmp_path) -> None:
    import warnings

    from PIL import Image

    keys = ["optimizer", "optimizer.lr", "model.hidden", "model.dropout",
            "trainer.batch_size", "schedule", "trainer.label_smoothing"]
    rng = np.random.default_rng(0)
    rows = [{"optimizer": str(rng.choice(["sgd", "adam"])),
             "optimizer.lr": str(10 ** rng.uniform(-4, -1)),
             "model.hidden": str(rng.choice(["[512, 256]", "[2048, 1024]"])),
             "model.dropout": str(rng.uniform(0.1, 0.5)), "trainer.batch_size": "128",
             "schedule": "cosine", "trainer.label_smoothing": str(rng.choice([0.0, 0.1])),
             "best_val_accuracy": rng.uniform(0.5, 0.9),
             "status": "PRUNED" if i % 2 else "FINISHED"} for i in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        fig = compare.params_figure(rows, keys, "best_val_accuracy")
        fig.savefig(tmp_path / "m.png", dpi=100)
    assert Image.open(tmp_path / "m.png").size[0] <= 1200  # 100% on a laptop screen
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in panels] == keys
    assert panels[1].get_xscale() == "log" and panels[3].get_xscale() == "linear"
    assert not any(ax.get_legend() for ax in panels)  # colours only for two keys


def test_compare_shows_the_swept_keys_and_writes_under_the_current_folder(
        tmp_path, monkeypatch, capsys) -> None:
    """A 2-key sweep compares on its 2 keys, though its runs differ in more params (each
    option's own keys); the files go under the folder compare runs in."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fashion_exp")
    parent = client.create_run(exp, run_name="sweep lr,model",
                               tags={"sweep": "parent", "swept": "optimizer.lr model"})
    client.set_tag(parent.info.run_id, "sweep_id", parent.info.run_id)
    for i, (lr, model, extra) in enumerate([("0.0024234724484675954", "mlp", "model.hidden"),
                                            ("0.05", "cnn", "model.filters")]):
        run = client.create_run(exp, run_name=f"lr={lr[:6]} model={model}",
                                tags={"sweep": "child", "sweep_id": parent.info.run_id})
        client.log_batch(run.info.run_id, params=[
            mlflow.entities.Param(k, v) for k, v in
            {"optimizer.lr": lr, "model": model, extra: "[64]", "trainer.seed": str(i)}.items()],
            metrics=[mlflow.entities.Metric("best_val_accuracy", 0.5 + i / 10, 0, 1)])
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    monkeypatch.chdir(tmp_path)
    assert compare.main(["--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "varied params: optimizer.lr, model\n" in printed
    assert "| run | status | optimizer.lr | model | best_val_accuracy |" in printed
    assert "| 0.002423 | mlp |" in printed  # 4 significant digits
    out = tmp_path / "outputs" / "compare" / f"sweep_{parent.info.run_id[:8]}"
    assert (out / "metric_vs_params.png").is_file()
    assert "0.0024234724484675954" in (out / "leaderboard.csv").read_text()  # as logged
