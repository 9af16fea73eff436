"""The schema: every shipped config composes and validates; bad values fail with one line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fashion_exp.config import ConfigError, compose_checked, precheck

from .conftest import run_cli


@pytest.mark.parametrize("overrides", [
    [], ["experiment=original"], ["experiment=cnn"], ["debug=fast"], ["model=cnn"],
    ["optimizer=adam"], ["optimizer=rmsprop"], ["model=cnn", "model.batch_norm=true"],
    ["model.hidden=[64]", "model.dropout=0.5"], ["schedule=cosine"], ["schedule=one_cycle"],
    ["schedule=plateau"], ["augment=standard"], ["augment=strong"],
    ["experiment=cnn_fast"], ["experiment=cnn_best"],
    ["trainer.precision=mixed_bfloat16", "trainer.strategy=mirrored"],
])
def test_shipped_configs_are_valid(overrides: list[str]) -> None:
    precheck(overrides)


def test_original_experiment_is_the_original_setup() -> None:
    cfg = compose_checked("config", ["experiment=original"])
    assert OmegaConf.to_container(cfg.model) == {
        "name": "mlp", "hidden": [256, 128, 32], "activation": "relu", "dropout": 0.0}
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.02, 0.0)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.data.val_split) == (30, 32, 0.2)


BAD = [
    ("optimizer.lr=0", "optimizer.lr=0.0", "must be > 0"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0", "must be > 0"),
    ("model.hidden=[128,0]", "model.hidden=[128, 0]", "every width must be >= 1"),
    ("model.hidden=[]", "model.hidden=[]", "at least one width"),
    ("model.dropout=1.0", "model.dropout=1.0", "[0, 1)"),
    ("model.dropout=-0.1", "model.dropout=-0.1", "[0, 1)"),
    ("trainer.epochs=0", "trainer.epochs=0", "must be >= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0", "must be >= 1"),
    ("data.val_split=0", "data.val_split=0.0", "(0, 1)"),
    ("data.val_split=1.5", "data.val_split=1.5", "(0, 1)"),
    ("optimizer.name=lion", "optimizer.name='lion'", "sgd, adam, rmsprop"),
    ("model.name=resnet", "model.name='resnet'", "mlp, cnn"),
    ("model.activation=foo", "model.activation='foo'", "relu"),
    ("optimized_metric=acc", "optimized_metric='acc'", "val_accuracy"),
    ("optimzer.lr=0.1", "overrides=", "Key 'optimzer' not in 'Config'"),
    ("optimizer=lion", "overrides=", "Available options for 'optimizer'; adam; rmsprop; sgd"),
    ("model=resnet", "overrides=", "Could not find 'model/resnet'"),
    ("trainer.epochs=ten", "overrides=", "could not be converted to Integer"),
    ("schedule=linear", "overrides=", "Available options for 'schedule'"),
    ("schedule.min_lr_ratio=1", "schedule.min_lr_ratio=1.0", "[0, 1)"),
    ("schedule=plateau schedule.factor=2", "schedule.factor=2.0", "(0, 1)"),
    ("augment.shift=0.9", "augment.shift=0.9", "[0, 0.5]"),
    ("model=cnn model.convs_per_block=0", "model.convs_per_block=0", "one count >= 1"),
    ("model=cnn model.convs_per_block=[1,2,2]", "model.convs_per_block=[1, 2, 2]",
     "a list of 2 counts >= 1, one per block"),
    ("model=cnn model.convs_per_block=[2,0]", "model.convs_per_block=[2, 0]", "counts >= 1"),
    ("model=cnn model.convs_per_block=two", "model.convs_per_block='two'", "one count >= 1"),
    ("augment.erasing=1.5", "augment.erasing=1.5", "[0, 1]"),
    ("trainer.label_smoothing=1", "trainer.label_smoothing=1.0", "[0, 1)"),
    ("trainer.precision=half", "trainer.precision='half'", "float32, mixed_float16"),
    ("trainer.strategy=tpu", "trainer.strategy='tpu'", "default, mirrored"),
]


@pytest.mark.parametrize(("override", "key", "allowed"), BAD)
def test_bad_values_name_key_value_and_what_is_allowed(override, key, allowed) -> None:
    with pytest.raises(ConfigError) as info:
        precheck(override.split())
    message = str(info.value)
    assert key in message and allowed in message
    assert "\n" not in message


def test_cli_rejects_bad_value_before_anything_runs(tmp_path, tracking_uri) -> None:
    result = run_cli("optimizer.lr=-0.5", f"tracking.uri={tracking_uri}", tmp_path=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["fashion-exp-train: invalid config: optimizer.lr=-0.5: must be > 0"]
    # Stopped before TensorFlow, MLflow and Hydra's job: no store, no output folder.
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "hydra").exists()


def test_validation_does_not_import_tensorflow() -> None:
    import subprocess
    import sys

    code = ("import sys; from fashion_exp.config import precheck; precheck(['model=cnn']); "
            "import fashion_exp.cli.train; "
            "print('tensorflow' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_presets_override_the_root_config() -> None:
    cfg = compose_checked("config", ["debug=fast", "experiment=cnn"])
    assert (cfg.task_name, cfg.trainer.epochs, cfg.data.limit) == ("debug", 1, 2000)
    assert (cfg.model.name, cfg.optimizer.name, cfg.trainer.early_stopping) == ("cnn", "adam", True)


def test_multirun_overrides_are_checked_before_the_sweep() -> None:
    precheck(["model=mlp,cnn", "optimizer.lr=0.1,0.2"], multirun=True)
    precheck(["model.hidden=[64],[128,64]", "optimizer.lr=interval(0.001,0.1)",
              "hparams_search=mlp_optuna"], multirun=True)
    with pytest.raises(ConfigError, match=r"trainer.epochs=0: must be >= 1"):
        precheck(["trainer.epochs=2,0"], multirun=True)  # every listed value, not the first
    with pytest.raises(ConfigError, match=r"Key 'hidden' not in 'CNN"):
        precheck(["model=mlp,cnn", "model.hidden=[64]"], multirun=True)  # the cnn jobs
    precheck(["hparams_search=cnn_optuna"], multirun=True)
    precheck(["experiment=mlp_search_best"])
    with pytest.raises(ConfigError, match="Key 'optimzer' not in 'Config'"):
        precheck(["optimzer.lr=0.1,0.2"], multirun=True)
    with pytest.raises(ConfigError, match=r"optimizer.lr=-1.0: must be > 0"):
        precheck(["optimizer.lr=-1,0.1"], multirun=True)
    with pytest.raises(ConfigError, match=r"optimized_metric='acc'"):
        precheck(["trainer.seed=0,1", "optimized_metric=acc"], multirun=True)


@pytest.mark.parametrize(("overrides", "message"), [
    ([], "model_uri='???': required: give model_uri=... on the command line"),
    (["model_uri=s3://bucket/model"], "model_uri='s3://bucket/model': use runs:/<run_id>/model"),
    (["model_uri=runs:/x/model", "batch_size=0"], "batch_size=0: must be >= 1"),
    (["model_uri=runs:/x/model", "gallery_size=0"], "gallery_size=0: must be >= 1"),
    (["model_uri=runs:/x/model", "+foo=1"], "foo=1: no such key"),
])
def test_evaluate_checks_its_schema_like_the_other_entry_points(overrides, message) -> None:
    from fashion_exp.cli import evaluate

    with pytest.raises(ConfigError) as err:
        evaluate.precheck(overrides)
    assert str(err.value).startswith(message), err.value
