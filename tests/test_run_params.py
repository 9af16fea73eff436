"""One schema per option and the params a run logs: a key the chosen option lacks is refused in
one line; params are each group's option and what changes the result, never a setting."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
from omegaconf import OmegaConf

from fashion_exp import schemas
from fashion_exp.config import ConfigError, compose_checked, precheck
from fashion_exp.schemas import run_params

from .helpers import run_cli

MLP_KEYS = "hidden, activation, dropout"
CNN_KEYS = ("filters, convs_per_block, kernel_size, pooling, global_pooling, dense, "
            "activation, batch_norm, dropout")

# (command line, multirun, the one line it gets)
REFUSED = [
    ("model=mlp model.filters=[32,64]", False,
     f"model.filters is not a key of model=mlp (its keys: {MLP_KEYS})"),
    ("model.filtrs=[32,64]", False,
     f"model.filtrs is not a key of model=mlp (its keys: {MLP_KEYS})"),
    ("+model.filters=[32,64]", False,
     f"model.filters is not a key of model=mlp (its keys: {MLP_KEYS})"),
    ("model=cnn model.hidden=[64]", False,
     f"model.hidden is not a key of model=cnn (its keys: {CNN_KEYS})"),
    ("optimizer=adam optimizer.momentum=0.9", False,
     "optimizer.momentum is not a key of optimizer=adam (its keys: lr, beta_1, beta_2, "
     "weight_decay)"),
    ("optimizer.rho=0.8", False,
     "optimizer.rho is not a key of optimizer=sgd (its keys: lr, momentum, nesterov, "
     "weight_decay)"),
    ("optimizer=rmsprop optimizer.nesterov=true", False,
     "optimizer.nesterov is not a key of optimizer=rmsprop (its keys: lr, rho, momentum, "
     "weight_decay)"),
    ("schedule.factor=0.3", False,
     "schedule.factor is not a key of schedule=constant (it has no keys)"),
    ("schedule=cosine schedule.patience=3", False,
     "schedule.patience is not a key of schedule=cosine (its keys: warmup_epochs, min_lr_ratio)"),
    ("schedule=one_cycle schedule.monitor=val_accuracy", False,
     "schedule.monitor is not a key of schedule=one_cycle (its keys: warmup_epochs, "
     "start_lr_ratio, min_lr_ratio)"),
    ("augment=strong augment.rotate=0.1", False,
     "augment.rotate is not a key of augment=strong (its keys: shift, flip, erasing, "
     "erasing_max_area, test_flip)"),
    ("augment=standard +augment.rotate=0.1", False,
     "augment.rotate is not a key of augment=standard"),
    ("trainer.epoch=3", False, "trainer.epoch is not a key of trainer (its keys: epochs, "),
    ("experiment=original optimizer=adam", False,
     "optimizer.momentum is not a key of optimizer=adam (its keys: lr, beta_1, beta_2, "
     "weight_decay), set by experiment/original"),
    ("model=mlp,cnn model.hidden=[64]", True,
     f"model.hidden is not a key of model=cnn (its keys: {CNN_KEYS})"),
    ("optimizer=sgd,adam optimizer.momentum=0.9", True,
     "optimizer.momentum is not a key of optimizer=adam"),
]


@pytest.mark.parametrize(("line", "multirun", "message"), REFUSED)
def test_a_key_the_chosen_option_lacks_is_refused_in_one_line(line, multirun, message) -> None:
    with pytest.raises(ConfigError) as err:
        precheck(line.split(), multirun=multirun)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize(("line", "message"), [
    ("model=mpl", "Could not find 'model/mpl'; Available options for 'model'; cnn; mlp"),
    ("optimizer=adamw", "Could not find 'optimizer/adamw'; Available options for 'optimizer'; "
                        "adam; rmsprop; sgd"),
    ("schedule=cosin", "Available options for 'schedule'; constant; cosine; one_cycle; plateau"),
    ("augment=light", "Available options for 'augment'; none; standard; strong"),
    ("model.name=cnn", "model.name='cnn': must be mlp, the name of model=mlp; choose another "
                       "option with model=<name>, one of mlp, cnn"),
])
def test_a_typo_in_an_option_names_the_options(line, message) -> None:
    with pytest.raises(ConfigError) as err:
        precheck(line.split())
    assert message in str(err.value) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize(("line", "key", "allowed"), [
    ("optimizer=adam optimizer.beta_1=1", "optimizer.beta_1=1.0", "(0, 1)"),
    ("optimizer=rmsprop optimizer.rho=0", "optimizer.rho=0.0", "(0, 1)"),
    ("optimizer=rmsprop optimizer.momentum=1", "optimizer.momentum=1.0", "[0, 1)"),
    ("optimizer.momentum=-0.1", "optimizer.momentum=-0.1", "[0, 1)"),
    ("optimizer=adam optimizer.weight_decay=-1", "optimizer.weight_decay=-1.0", ">= 0"),
    ("schedule=one_cycle schedule.start_lr_ratio=0", "schedule.start_lr_ratio=0.0", "(0, 1]"),
    ("schedule=cosine schedule.warmup_epochs=-1", "schedule.warmup_epochs=-1.0", ">= 0"),
    ("schedule=plateau schedule.patience=0", "schedule.patience=0", ">= 1"),
    ("schedule=plateau schedule.monitor=loss", "schedule.monitor='loss'", "val_loss"),
    ("model=cnn model.kernel_size=4", "model.kernel_size=4", "1, 3, 5 or 7"),
    ("augment=standard augment.erasing_max_area=0", "augment.erasing_max_area=0.0", "(0.02, 1]"),
])
def test_each_option_checks_its_own_values(line, key, allowed) -> None:
    with pytest.raises(ConfigError) as err:
        precheck(line.split())
    assert f"{key}: " in str(err.value) and allowed in str(err.value), err.value


def test_the_command_refuses_it_before_anything_runs(tmp_path) -> None:
    result = run_cli("model=mlp", "model.filters=[32,64]", tmp_path=tmp_path)
    assert result.returncode == 2  # like every other config error
    assert result.stderr.strip().splitlines() == [
        "fashion-exp-train: invalid config: model.filters is not a key of model=mlp "
        f"(its keys: {MLP_KEYS})"]
    assert not (tmp_path / "hydra").exists() and not (tmp_path / "mlruns").exists()


def test_every_key_says_whether_it_is_a_param() -> None:
    assert schemas.unclassified() == []
    for schema in schemas.training_schemas():
        for f in dataclasses.fields(schema):
            if not (schema is schemas.Config and f.name in schemas.GROUPS):
                assert f.metadata["role"] in ("option", "param", "setting"), f


def test_a_key_without_a_role_stops_every_command(monkeypatch) -> None:
    @dataclasses.dataclass
    class Unmarked:
        epochs: int = schemas.param(1)
        fast: bool = False  # nobody said whether it changes the result

    monkeypatch.setitem(schemas.GROUP_SCHEMAS, "trainer", Unmarked)
    assert schemas.unclassified() == ["Unmarked.fast"]
    with pytest.raises(TypeError, match="without a role .* Unmarked.fast"):
        precheck([])


COMMON = {
    "data.val_split": "0.2", "data.limit": "null", "data.shuffle_seed": "null",
    "augment": "none", "augment.shift": "0.0", "augment.flip": "False",
    "augment.erasing": "0.0", "augment.test_flip": "False",
    "trainer.epochs": "30", "trainer.batch_size": "32", "trainer.seed": "0",
    "trainer.deterministic": "False", "trainer.early_stopping": "False",
    "trainer.label_smoothing": "0.0", "trainer.precision": "float32",
    "trainer.strategy": "default",
}
SGD = {"optimizer": "sgd", "optimizer.lr": "0.02", "optimizer.momentum": "0.0",
       "optimizer.weight_decay": "0.0"}


def test_params_of_the_default_run() -> None:
    params = run_params(compose_checked("config", []))
    assert params == COMMON | SGD | {
        "model": "mlp", "model.hidden": "[256, 128, 32]", "model.activation": "relu",
        "model.dropout": "0.0", "schedule": "constant"}
    assert len(params) == 25


def test_params_of_a_cnn_run() -> None:
    params = run_params(compose_checked("config", ["model=cnn"]))
    assert params == COMMON | SGD | {
        "model": "cnn", "model.filters": "[32, 64]", "model.convs_per_block": "1",
        "model.kernel_size": "3", "model.pooling": "max", "model.global_pooling": "False",
        "model.dense": "[128]", "model.activation": "relu", "model.batch_norm": "False",
        "model.dropout": "0.25", "schedule": "constant"}


def test_params_of_a_search_trial() -> None:
    """A trial of hparams_search=mlp_optuna: the config with the values Optuna drew."""
    trial = ["hparams_search=mlp_optuna", "optimizer=adam", "optimizer.lr=0.003",
             "model.hidden=[512,256]", "model.dropout=0.2", "trainer.batch_size=128",
             "schedule=one_cycle", "trainer.label_smoothing=0.1"]
    params = run_params(compose_checked("config", trial))
    assert params == COMMON | {
        "model": "mlp", "model.hidden": "[512, 256]", "model.activation": "relu",
        "model.dropout": "0.2",
        "optimizer": "adam", "optimizer.lr": "0.003", "optimizer.beta_1": "0.9",
        "optimizer.beta_2": "0.999", "optimizer.weight_decay": "0.0",
        "schedule": "one_cycle", "schedule.warmup_epochs": "0.0",
        "schedule.start_lr_ratio": "0.04", "schedule.min_lr_ratio": "0.0",
        "trainer.epochs": "20", "trainer.batch_size": "128", "trainer.label_smoothing": "0.1",
        "trainer.early_stopping": "True", "trainer.patience": "3",
        "trainer.monitor": "val_accuracy"}


@pytest.mark.parametrize(("line", "shown", "hidden"), [
    (["optimizer.momentum=0.9"], {"optimizer.nesterov": "False"}, set()),
    ([], {}, {"optimizer.nesterov", "trainer.patience", "trainer.monitor",
              "augment.erasing_max_area"}),
    (["trainer.early_stopping=true"], {"trainer.patience": "5", "trainer.monitor": "val_loss"},
     set()),
    (["augment=strong"], {"augment": "strong", "augment.erasing_max_area": "0.25"}, set()),
    (["schedule=plateau"], {"schedule.factor": "0.5", "schedule.min_lr_ratio": "0.01"}, set()),
])
def test_a_key_that_applies_only_with_another_is_a_param_only_then(line, shown, hidden) -> None:
    params = run_params(compose_checked("config", line))
    assert params.items() >= shown.items() and not hidden & set(params)


def test_settings_are_never_params() -> None:
    settings = {f"{group}.{f.name}" for group in schemas.GROUPS
                for s in ([schemas.GROUP_SCHEMAS[group]] if group in schemas.GROUP_SCHEMAS
                          else schemas.OPTION_SCHEMAS[group].values())
                for f in dataclasses.fields(s) if f.metadata["role"] == "setting"}
    assert {"tracking.uri", "tracking.connect_timeout", "trainer.verbose",
            "trainer.checkpoint_dir", "trainer.resume", "trainer.threads", "data.dir",
            "trainer.steps_per_execution"} <= settings
    for line in ([], ["tracking=server", "tracking.uri=http://127.0.0.1:1"], ["model=cnn"],
                 ["experiment=cnn_best"], ["hparams_search=cnn_optuna"], ["debug=fast"]):
        params = run_params(compose_checked("config", line))
        assert not settings & set(params) and "optimized_metric" not in params, line


@pytest.mark.parametrize("preset", ["original", "cnn", "cnn_fast", "cnn_best",
                                    "mlp_search_best"])
def test_every_preset_composes_and_logs_only_its_options_keys(preset) -> None:
    cfg = compose_checked("config", [f"experiment={preset}"])
    params = run_params(cfg)
    for group in schemas.OPTION_SCHEMAS:
        own = {f"{group}.{k}" for k in schemas.keys_of(schemas.schema_of(group, cfg[group]))}
        assert {k for k in params if k.startswith(f"{group}.")} <= own
        assert params[group] == cfg[group].name


def test_the_sweep_parent_names_its_params_like_its_jobs(tmp_path) -> None:
    """`-m model=mlp,cnn optimizer.lr=0.01,0.05`: the parent logs `model`=`mlp,cnn` and no
    key of either model (they differ from job to job), and the shared params by their names."""
    from fashion_exp.sweeps.multirun import describe_parent

    job = compose_checked("config", ["trainer.epochs=2"])  # what Hydra gives the parent
    cfg = OmegaConf.create({**OmegaConf.to_container(job), "hydra": {
        "sweeper": {"params": None},
        "overrides": {"task": ["model=mlp,cnn", "optimizer.lr=0.01,0.05", "trainer.epochs=2"]}}})
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("sweep"))
    describe_parent(client, run.info.run_id, cfg, ["model", "optimizer.lr"])
    params = client.get_run(run.info.run_id).data.params
    assert params == {k: v for k, v in run_params(job).items() if not k.startswith("model.")} \
        | {"model": "mlp,cnn", "optimizer.lr": "0.01,0.05"}


@pytest.mark.parametrize("search", ["mlp_optuna", "cnn_optuna"])
def test_every_trial_of_a_search_space_composes(search) -> None:
    """Each combination of the options a search draws (optimizer, schedule...), and each
    listed value of its other keys, composes (the other keys at their first value, an
    interval at its lower end): no key of the space is missing from an option it may draw."""
    import itertools

    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fashion_exp.config import CONF_DIR, register_configs, validate

    space = yaml.safe_load((CONF_DIR / "hparams_search" / f"{search}.yaml").read_text())
    parser = OverridesParser.create()
    values: dict[str, list[str]] = {}
    for key, text in space["hydra"]["sweeper"]["params"].items():
        sweep = parser.parse_override(f"{key}={text}").value()
        values[key] = ([str(v) for v in sweep.list] if hasattr(sweep, "list")
                       else [str(sweep.start)])
    groups = [k for k in values if k in schemas.GROUPS]
    assert groups, "the search draws options"
    first = {k: v[0] for k, v in values.items()}
    lines = [first | dict(zip(groups, chosen, strict=True))
             for chosen in itertools.product(*(values[g] for g in groups))]
    lines += [first | {key: value} for key in values if key not in groups
              for value in values[key][1:]]
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # once: 20-odd configs
        for line in lines:
            cfg = compose("config", overrides=[f"hparams_search={search}"]
                          + [f"{k}={v}" for k, v in line.items()])
            validate(cfg)
            assert all(run_params(cfg)[g] == line[g] for g in groups), line


@pytest.mark.parametrize(("command", "space", "message"), [
    ([], {"optimizer": "choice(sgd, adam)", "optimizer.momentum": "interval(0.0, 0.9)"},
     "optimizer.momentum is not a key of optimizer=adam (its keys: lr, beta_1, beta_2, "
     "weight_decay), set by the search space hydra.sweeper.params"),
    (["optimizer=adam"], {"optimizer.rho": "interval(0.8, 0.99)"},
     "optimizer.rho is not a key of optimizer=adam"),
    (["model=cnn"], {"schedule": "choice(constant, cosine)",
                     "schedule.warmup_epochs": "interval(0, 2)"},
     "schedule.warmup_epochs is not a key of schedule=constant (it has no keys)"),
    ([], {"optimizer": "choice(sgd, rmsprop)", "optimizer.momentum": "interval(0.0, 0.9)",
          "schedule": "choice(cosine, one_cycle)", "schedule.min_lr_ratio": "choice(0.0, 0.1)"},
     None),
])
def test_a_search_space_key_every_drawn_option_lacks_is_refused(command, space,
                                                                message) -> None:
    from fashion_exp.config import search_space_keys

    job = compose_checked("config", command)
    cfg = OmegaConf.create({**OmegaConf.to_container(job),
                            "hydra": {"sweeper": {"params": space}}})
    if message is None:
        search_space_keys(cfg)
        return
    with pytest.raises(ConfigError) as err:
        search_space_keys(cfg)
    assert str(err.value).startswith(message), err.value
