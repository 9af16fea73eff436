"""The schema: every shipped config composes and validates; bad values fail with one line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fashion_exp.config import ConfigError, compose_checked, precheck

from .helpers import run_cli


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
    ("schedule=cosine schedule.min_lr_ratio=1", "schedule.min_lr_ratio=1.0", "[0, 1)"),
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
    with pytest.raises(ConfigError, match=r"model.hidden is not a key of model=cnn \(its keys"):
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


# --- Deletes (~key), appends (+key) and Hydra's own settings on the command line -------------

ONLY = "~ deletes only the optional groups experiment, hparams_search, debug, local"


@pytest.mark.parametrize(("overrides", "message"), [
    (["~task_name"], "overrides='~task_name': task_name cannot be deleted: every key is read; "
                     f"set a value instead, e.g. task_name=train; {ONLY}"),
    (["~trainer.batch_size"], "trainer.batch_size cannot be deleted: every key is read; set a "
                              "value instead, e.g. trainer.batch_size=32"),
    (["~model.hidden"], "e.g. model.hidden=[256, 128, 32]"),
    (["~tracking.uri"], "e.g. tracking.uri=null"),
    (["~optimizer"], "overrides='~optimizer': optimizer needs one of its options; choose one "
                     "instead, e.g. optimizer=sgd"),
    (["~foo"], f"overrides='~foo': no key or group foo to delete; {ONLY}"),
    (["~hydra/launcher"], "overrides='~hydra/launcher': Hydra's own settings cannot be deleted"),
    (["~hydra.callbacks.mlflow_sweep"], "Hydra's own settings cannot be deleted"),
    (["+hydra.foo=1"], "overrides='+hydra.foo=1': no such key; hydra has callbacks"),
    (["+hydra.run.foo=1"], "overrides='+hydra.run.foo=1': no such key; hydra.run has dir"),
    (["hydra.job.chdr=true"], "Key 'chdr' not in 'JobConf'"),
    (["hydra.job.chdir=maybe"], "Value 'maybe' is not a valid bool"),
    (["+trainer.epochs=3"], "An item is already at 'trainer.epochs'"),
    (["++trainer.epochz=3"], "trainer.epochz is not a key of trainer (its keys: epochs, "),
])
def test_training_refuses_deletes_and_hydra_setting_typos(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        precheck(overrides)
    assert message in str(err.value) and "\n" not in str(err.value), err.value


def test_a_sweep_refuses_deletes_too() -> None:
    with pytest.raises(ConfigError, match=r"'~trainer.epochs': trainer.epochs cannot be"):
        precheck(["trainer.seed=0,1", "~trainer.epochs"], multirun=True)


@pytest.mark.parametrize("overrides", [
    ["~experiment"], ["debug=fast", "~debug"], ["experiment=cnn", "~experiment"],
    ["+hydra.job.env_set.FOO=1"], ["++hydra.run.dir=/tmp/x"], ["++trainer.epochs=3"],
    ["tracking=server", "tracking.uri=HTTP://127.0.0.1:5000"],
    ["tracking.uri=Sqlite:///mlflow.db"],
])
def test_what_may_be_deleted_or_added(overrides) -> None:
    precheck(overrides)


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("evaluate", ["model_uri=runs:/x/model", "~batch_size"],
     "overrides='~batch_size': batch_size cannot be deleted: every key is read; set a value "
     "instead, e.g. batch_size=1024; no key or group of this command may be deleted with ~"),
    ("evaluate", ["model_uri=runs:/x/model", "~data"], "data needs one of its options"),
    ("evaluate", ["model_uri=runs:/x/model", "~hydra.run.dir"], "Hydra's own settings"),
    ("evaluate", ["model_uri=runs:/x/model", "+hydra.job.foo=1"], "no such key; hydra.job has"),
    ("serve", ["~drain_seconds"], "overrides='~drain_seconds': drain_seconds cannot be deleted"),
    ("serve", ["~follow_seconds"], "follow_seconds cannot be deleted"),
    ("serve", ["~decode_workers"], "e.g. decode_workers=2"),
    ("serve", ["~host"], "e.g. host=127.0.0.1"),
    ("serve", ["~tracking"], "tracking needs one of its options"),
    ("serve", ["hydra.run.dir=/tmp/x"], "overrides='hydra.run.dir=/tmp/x': this command runs no "
                                        "Hydra job"),
])
def test_evaluate_and_serve_refuse_deletes(name, overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        compose_checked(name, overrides, hydra_settings=name != "serve")
    assert message in str(err.value), err.value


def test_a_deleted_key_is_refused_after_composition_too() -> None:
    """validate, for the jobs Hydra starts itself: a deleted key is not filled with its
    default behind the run's back."""
    from hydra import compose, initialize_config_dir

    from fashion_exp.config import CONF_DIR, validate

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["~task_name"])
    with pytest.raises(ConfigError, match="'~task_name': task_name cannot be deleted"):
        validate(cfg)


def test_command_line_flags() -> None:
    from fashion_exp.config import command_line

    assert command_line(["a=1", "-m", "b=2,3"]) == (["a=1", "b=2,3"], True)  # -m anywhere
    assert command_line(["-r", "a=1"]) == (["a=1"], False)
    assert command_line(["--help"]) is None and command_line(["--cfg", "job", "a=1"]) is None
    for flag in (["-cn", "evaluate"], ["--config-dir", "/tmp"], ["-cp", "/tmp"],
                 ["--experimental-rerun", "x.pickle"]):
        with pytest.raises(ConfigError, match="not supported: the command composes its own"):
            command_line(flag)


def test_uri_schemes_are_case_insensitive(tmp_path) -> None:
    from fashion_exp.schemas import TrackingConfig
    from fashion_exp.tracking.store_checks import check_store, resolve_uri

    TrackingConfig(mode="server", uri="HTTPS://mlflow.example.org")
    TrackingConfig(uri="SQLite:///x.db")
    assert resolve_uri("HTTP://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_uri(f"Sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    # MLflow (SQLAlchemy) opens the store only with a lower-case scheme: what resolve_uri hands on
    assert check_store(f"SQLITE:///{tmp_path}/m.db", write=True, create=True,
                       connect_timeout=5) == f"sqlite:///{tmp_path}/m.db"
