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


def test_a_sweep_view_shows_swept_params_and_key_metrics_best_first() -> None:
    state = views.sweep_state("abc", ["optimizer.lr", "model.hidden"], "val_accuracy")
    assert state["selectedColumns"] == [
        "params.`optimizer.lr`", "params.`model.hidden`", "metrics.`best_val_accuracy`",
        "metrics.`test_accuracy`", "metrics.`test_loss`", "attributes.`Models`"]
    assert state["searchFilter"] == "tags.sweep_id = 'abc' and tags.sweep = 'child'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best_val_accuracy`", False)
    loss = views.sweep_state("abc", ["trainer.seed"], "test_loss")
    assert (loss["orderByKey"], loss["orderByAsc"]) == ("metrics.`test_loss`", True)
    assert loss["selectedColumns"].count("metrics.`test_loss`") == 1
    json.dumps(state)  # stored as an experiment tag
    pruned = views.sweep_state("abc", ["optimizer.lr"], "val_accuracy", ("pruned_at_epoch",))
    assert pruned["selectedColumns"][-2:] == ["tags.`pruned_at_epoch`", "attributes.`Models`"]
    assert "tags.`pruned_at_epoch`" in pruned["columnOrder"]
    assert pruned["columnWidths"]["tags.`pruned_at_epoch`"] >= 7 * len("pruned_at_epoch")
    search = OmegaConf.create({"hydra": {"sweeper": {"pruner": {
        "_target_": "optuna.pruners.MedianPruner"}}}})
    assert multirun.view_tags(search) == ("pruned_at_epoch",)
    search.hydra.sweeper.pruner._target_ = "optuna.pruners.NopPruner"
    assert multirun.view_tags(search) == () == multirun.view_tags(OmegaConf.create({}))


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


def test_leaderboard_cells_have_at_most_four_decimals_and_no_trailing_zeros() -> None:
    rows = [{"run": "a", "best_val_accuracy": 0.6949999928474426, "duration_s": 4.9}]
    table = leaderboard.markdown(rows)
    assert "| a | 0.695 | 4.9 |" in table
    assert leaderboard.metric_columns("val_accuracy") == ["best_val_accuracy", "test_accuracy",
                                                      "test_loss"]
    assert leaderboard.metric_columns("test_accuracy") == ["test_accuracy", "test_loss"]


def test_metric_against_params_names_the_metric_and_colours_the_other_param() -> None:
    rows = [{"optimizer.lr": lr, "model.hidden": h, "best_val_accuracy": acc}
            for lr, h, acc in [("0.01", "[64]", 0.5), ("0.05", "[64]", 0.7),
                               ("0.01", "[128, 32]", 0.46), ("0.05", "[128, 32]", 0.68)]]
    fig = compare.params_figure(rows, ["optimizer.lr", "model.hidden"], "best_val_accuracy")
    lr_panel, hidden_panel = fig.axes
    assert lr_panel.get_ylabel() == "best_val_accuracy" and lr_panel.get_xlabel() == "optimizer.lr"
    assert [t.get_text() for t in lr_panel.get_legend().get_texts()] == [
        "hidden=[128, 32]", "hidden=[64]"]
    assert [t.get_text() for t in hidden_panel.get_legend().get_texts()] == [
        "lr=0.01", "lr=0.05"]
