"""The typed config schemas: one dataclass per option of a group with options (model=mlp and
model=cnn, each optimizer, each schedule), one per group whose options share their keys (data,
augment, trainer, tracking), and the top-level configs of the entry points.

Every key of the training config says what it is (`option`, `param` or `setting` below): the
rule that decides which keys describe an experiment as MLflow params (`run_params`) and which
are operational settings, kept only in the run's logged config file. `__post_init__` checks
values (ranges, allowed names) and raises `ConfigError`. Nothing here imports TensorFlow or
MLflow, nor Hydra: fashion_exp.config registers these schemas and composes the config.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from fashion_exp.uris import MODEL_FORMS, MODEL_SCHEMES, SERVERS, URI_SCHEMES, scheme, shown

IMAGE_SIDE = 28  # side of a Fashion-MNIST image, pixels: what every model takes
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
ACTIVATIONS = ("relu", "elu", "gelu", "selu", "silu", "tanh", "sigmoid")
POOLINGS = ("max", "avg")
SCHEDULES = ("constant", "cosine", "one_cycle", "plateau")
AUGMENTS = ("none", "standard", "strong")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored")
TRACKING_MODES = ("local", "server")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# Metrics the runner can hand back to a sweeper.
OPTIMIZABLE = ("val_accuracy", "val_loss", "accuracy", "loss", "test_accuracy", "test_loss")


class ConfigError(ValueError):
    """A config value that is out of range or not one of the allowed names."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")

    def prefixed(self, group: str) -> ConfigError:
        """The same error with the config group in front of the key."""
        return ConfigError(f"{group}.{self.key}", self.value, self.allowed)


class NotAKeyError(ConfigError):
    """A key that the chosen option of a group (or a group without options) does not have."""

    def __init__(self, group: str, option: str | None, key: str, keys: list[str],
                 source: str | None = None) -> None:
        chosen = f"{group}={option}" if option else group
        super().__init__(f"{group}.{key}", None, f"not a key of {chosen}")
        has = f"its keys: {', '.join(keys)}" if keys else "it has no keys"
        self.args = (f"{group}.{key} is not a key of {chosen} ({has})"
                     + (f", set by {source}" if source else ""),)


# --- What each key is: the rule for MLflow params ----------------------------------------------
# option:  the name of a group's chosen option, logged as the param `<group>` (model=mlp).
# param:   changes what is trained or measured, logged as `<group>.<key>`; with `when`, only
#          while that key of the same group is on (trainer.patience with early_stopping).
# setting: operational (where, how fast, how verbose): only in the logged config file.
ROLE = "role"
ROLES = ("option", "param", "setting")


def _field(default: Any, role: str, when: str | None = None) -> Any:
    meta = {ROLE: role, "when": when}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def option(default: Any) -> Any:
    """The name of the option: logged as the param named after the group."""
    return _field(default, "option")


def param(default: Any, when: str | None = None) -> Any:
    """A key that changes the result: an MLflow param (only while key `when` is on)."""
    return _field(default, "param", when)


def setting(default: Any) -> Any:
    """An operational key: kept in the logged config file, not a param."""
    return _field(default, "setting")


def role_of(schema: type, name: str) -> tuple[str | None, str | None]:
    """(role, when) of a schema's field; (None, None) for a field nobody classified."""
    meta = {f.name: f.metadata for f in dataclasses.fields(schema)}[name]
    return meta.get(ROLE), meta.get("when")


def keys_of(schema: type) -> list[str]:
    """The keys a user sets in an option, in schema order (its name is the option itself)."""
    return [f.name for f in dataclasses.fields(schema) if f.metadata.get(ROLE) != "option"]


# --- Value checks -------------------------------------------------------------------------------

def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _one_of(key: str, value: str, names: tuple[str, ...]) -> None:
    _check(value in names, key, value, f"use one of {', '.join(names)}")


def _dropout(key: str, value: float) -> None:
    _check(0.0 <= value < 1.0, key, value, "must be in [0, 1)")


def _ratio(key: str, value: float, low_open: bool = False) -> None:
    _check(0 < value < 1 if low_open else 0 <= value < 1, key, value,
           "must be in (0, 1)" if low_open else "must be in [0, 1)")


def _widths(key: str, values: list[int], allow_empty: bool = False) -> None:
    _check(allow_empty or len(values) > 0, key, values, "must list at least one width")
    for v in values:
        _check(v >= 1, key, values, "every width must be >= 1")


def _convs_per_block(value: Any, blocks: int) -> None:
    """One conv count for every block, or a list with one count per block."""
    is_list = isinstance(value, (list, tuple))
    counts = list(value) if is_list else [value]
    ok = (not is_list or len(counts) == blocks) and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
    _check(ok, "convs_per_block", value,
           f"use one count >= 1 for all blocks or a list of {blocks} counts >= 1, one per block")


def _name(group: str, value: str, own: str, names: tuple[str, ...]) -> None:
    """An option's name is the option chosen: another one is chosen with group=<name>."""
    _check(value == own, "name", value,
           f"must be {own}, the name of {group}={own}; choose another option with "
           f"{group}=<name>, one of {', '.join(names)}")


# --- data ---------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    dir: str | None = setting(None)
    val_split: float = param(0.2)
    limit: int | None = param(None)
    verify_checksums: bool = setting(True)
    shuffle_seed: int | None = param(None)
    download: bool = setting(True)

    def __post_init__(self) -> None:
        _check(0.0 < self.val_split < 1.0, "val_split", self.val_split, "must be in (0, 1)")
        if self.limit is not None:
            _check(self.limit >= 10, "limit", self.limit, "must be >= 10, or null for all")


# --- model: mlp, cnn ----------------------------------------------------------------------------

@dataclass
class MLPConfig:
    name: str = option("mlp")
    hidden: list[int] = param([256, 128, 32])
    activation: str = param("relu")
    dropout: float = param(0.0)

    def __post_init__(self) -> None:
        _name("model", self.name, "mlp", MODELS)
        _widths("hidden", self.hidden)
        _one_of("activation", self.activation, ACTIVATIONS)
        _dropout("dropout", self.dropout)


@dataclass
class CNNConfig:
    name: str = option("cnn")
    filters: list[int] = param([32, 64])
    # Any: one int for every block or a list with one count per block (OmegaConf 2.3 has no
    # Union of int and list); __post_init__ checks which it is.
    convs_per_block: Any = param(1)
    kernel_size: int = param(3)
    pooling: str = param("max")
    global_pooling: bool = param(False)
    dense: list[int] = param([128])
    activation: str = param("relu")
    batch_norm: bool = param(False)
    dropout: float = param(0.25)

    def __post_init__(self) -> None:
        _name("model", self.name, "cnn", MODELS)
        _widths("filters", self.filters)
        _convs_per_block(self.convs_per_block, len(self.filters))
        _check(self.kernel_size in (1, 3, 5, 7), "kernel_size", self.kernel_size,
               "use 1, 3, 5 or 7")
        _check(
            len(self.filters) <= 4, "filters", self.filters,
            f"at most 4 pooled blocks fit a {IMAGE_SIDE}x{IMAGE_SIDE} image",
        )
        _one_of("pooling", self.pooling, POOLINGS)
        _widths("dense", self.dense, allow_empty=True)
        _one_of("activation", self.activation, ACTIVATIONS)
        _dropout("dropout", self.dropout)


# --- optimizer: sgd, adam, rmsprop --------------------------------------------------------------

def _lr_and_decay(lr: float, weight_decay: float) -> None:
    _check(lr > 0, "lr", lr, "must be > 0")
    _check(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")


@dataclass
class SGDConfig:
    name: str = option("sgd")
    lr: float = param(0.02)
    momentum: float = param(0.0)
    nesterov: bool = param(False, when="momentum")  # no momentum: nothing to look ahead with
    weight_decay: float = param(0.0)

    def __post_init__(self) -> None:
        _name("optimizer", self.name, "sgd", OPTIMIZERS)
        _lr_and_decay(self.lr, self.weight_decay)
        _ratio("momentum", self.momentum)


@dataclass
class AdamConfig:
    name: str = option("adam")
    lr: float = param(0.001)
    beta_1: float = param(0.9)
    beta_2: float = param(0.999)
    weight_decay: float = param(0.0)

    def __post_init__(self) -> None:
        _name("optimizer", self.name, "adam", OPTIMIZERS)
        _lr_and_decay(self.lr, self.weight_decay)
        _ratio("beta_1", self.beta_1, low_open=True)
        _ratio("beta_2", self.beta_2, low_open=True)


@dataclass
class RMSpropConfig:
    name: str = option("rmsprop")
    lr: float = param(0.001)
    rho: float = param(0.9)
    momentum: float = param(0.0)
    weight_decay: float = param(0.0)

    def __post_init__(self) -> None:
        _name("optimizer", self.name, "rmsprop", OPTIMIZERS)
        _lr_and_decay(self.lr, self.weight_decay)
        _ratio("rho", self.rho, low_open=True)
        _ratio("momentum", self.momentum)


# --- schedule: constant, cosine, one_cycle, plateau ---------------------------------------------

def _warmup(value: float) -> None:
    _check(value >= 0, "warmup_epochs", value, "must be >= 0")


@dataclass
class ConstantSchedule:
    name: str = option("constant")

    def __post_init__(self) -> None:
        _name("schedule", self.name, "constant", SCHEDULES)


@dataclass
class CosineSchedule:
    name: str = option("cosine")
    warmup_epochs: float = param(0.0)
    min_lr_ratio: float = param(0.0)

    def __post_init__(self) -> None:
        _name("schedule", self.name, "cosine", SCHEDULES)
        _warmup(self.warmup_epochs)
        _ratio("min_lr_ratio", self.min_lr_ratio)


@dataclass
class OneCycleSchedule:
    name: str = option("one_cycle")
    warmup_epochs: float = param(0.0)
    start_lr_ratio: float = param(0.04)
    min_lr_ratio: float = param(0.0)

    def __post_init__(self) -> None:
        _name("schedule", self.name, "one_cycle", SCHEDULES)
        _warmup(self.warmup_epochs)
        _check(0 < self.start_lr_ratio <= 1, "start_lr_ratio", self.start_lr_ratio,
               "must be in (0, 1]")
        _ratio("min_lr_ratio", self.min_lr_ratio)


@dataclass
class PlateauSchedule:
    name: str = option("plateau")
    factor: float = param(0.5)
    patience: int = param(2)
    monitor: str = param("val_loss")
    min_lr_ratio: float = param(0.01)

    def __post_init__(self) -> None:
        _name("schedule", self.name, "plateau", SCHEDULES)
        _ratio("factor", self.factor, low_open=True)
        _check(self.patience >= 1, "patience", self.patience, "must be >= 1")
        _one_of("monitor", self.monitor, ("val_loss", "val_accuracy"))
        _ratio("min_lr_ratio", self.min_lr_ratio)


# --- augment: none, standard, strong (the same keys, other values) ------------------------------

@dataclass
class AugmentConfig:
    name: str = option("none")
    shift: float = param(0.0)
    flip: bool = param(False)
    erasing: float = param(0.0)
    erasing_max_area: float = param(0.25, when="erasing")
    test_flip: bool = param(False)

    def __post_init__(self) -> None:
        _one_of("name", self.name, AUGMENTS)
        _check(0 <= self.shift <= 0.5, "shift", self.shift, "must be in [0, 0.5]")
        _check(0 <= self.erasing <= 1, "erasing", self.erasing, "must be in [0, 1]")
        _check(0.02 < self.erasing_max_area <= 1, "erasing_max_area", self.erasing_max_area,
               "must be in (0.02, 1]")


# --- trainer ------------------------------------------------------------------------------------

@dataclass
class TrainerConfig:
    epochs: int = param(30)
    batch_size: int = param(32)
    seed: int = param(0)
    deterministic: bool = param(False)
    early_stopping: bool = param(False)
    patience: int = param(5, when="early_stopping")
    monitor: str = param("val_loss", when="early_stopping")
    # Speed settings: the same results (docs/configuration.md#speed-settings).
    steps_per_execution: int = setting(32)
    jit_compile: bool | None = setting(None)
    onednn: bool | None = setting(True)
    fused_batch_norm: bool = setting(True)
    threads: int = setting(0)
    verbose: int = setting(1)
    label_smoothing: float = param(0.0)
    precision: str = param("float32")
    strategy: str = param("default")
    checkpoint: bool = setting(True)
    checkpoint_dir: str | None = setting(None)
    resume: str | None = setting(None)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _check(self.patience >= 1, "patience", self.patience, "must be >= 1")
        _one_of("monitor", self.monitor, ("val_loss", "val_accuracy"))
        _check(
            self.steps_per_execution >= 1, "steps_per_execution", self.steps_per_execution,
            "must be >= 1",
        )
        _check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: TensorFlow decides)")
        _check(self.verbose in (0, 1, 2), "verbose", self.verbose, "use 0, 1 or 2")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing,
               "must be in [0, 1)")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("strategy", self.strategy, STRATEGIES)
        _check(self.resume is None or bool(re.fullmatch(r"latest|[0-9a-f]{32}", self.resume)),
               "resume", self.resume, "use a run id (32 hex digits) or latest")


# --- tracking: local, server (the same keys; all operational) -----------------------------------

@dataclass
class TrackingConfig:
    mode: str = setting("local")
    uri: str | None = setting(None)
    experiment_name: str = setting("fashion_exp")
    log_model: bool = setting(True)
    registered_model_name: str | None = setting(None)
    figures: bool = setting(True)
    request_timeout: float = setting(10.0)
    retries: int = setting(3)
    reconnect_seconds: float = setting(60.0)
    offline_dir: str | None = setting(None)
    connect_timeout: float = setting(5.0)

    def __post_init__(self) -> None:
        _one_of("mode", self.mode, TRACKING_MODES)
        kind = scheme(self.uri or "")  # lower case: URI schemes are case-insensitive
        uri = shown(self.uri) if self.uri else self.uri  # a password in it is not printed
        _check(not kind or kind in URI_SCHEMES, "uri", uri,
               f"use a path or a URI of scheme {', '.join(URI_SCHEMES)}")
        _check(self.mode != "server" or kind in SERVERS, "uri", uri,
               "tracking=server needs the server's http:// or https:// address")
        _check(self.request_timeout > 0, "request_timeout", self.request_timeout, "must be > 0")
        _check(self.retries >= 0, "retries", self.retries, "must be >= 0")
        _check(self.reconnect_seconds >= 0, "reconnect_seconds", self.reconnect_seconds,
               "must be >= 0")
        _check(0 < self.connect_timeout <= 600, "connect_timeout", self.connect_timeout,
               "must be in (0, 600] seconds")
        _check(bool(self.experiment_name.strip()), "experiment_name", self.experiment_name,
               "must not be empty")


# --- The training config ------------------------------------------------------------------------

@dataclass
class Config:
    # Groups whose options have their own keys are typed by their option's file (Any here).
    data: DataConfig = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    augment: AugmentConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    optimized_metric: str = setting("val_accuracy")
    task_name: str = setting("train")


# Groups with options of their own keys: option name -> schema (ConfigStore: <option>_schema).
OPTION_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"mlp": MLPConfig, "cnn": CNNConfig},
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig, "rmsprop": RMSpropConfig},
    "schedule": {"constant": ConstantSchedule, "cosine": CosineSchedule,
                 "one_cycle": OneCycleSchedule, "plateau": PlateauSchedule},
}
# Groups whose options share one schema (ConfigStore: <group>_schema).
GROUP_SCHEMAS: dict[str, type] = {"data": DataConfig, "augment": AugmentConfig,
                                  "trainer": TrainerConfig, "tracking": TrackingConfig}
GROUPS = ("data", "model", "optimizer", "schedule", "augment", "trainer", "tracking")


def schema_of(group: str, node: Any) -> type:
    """The schema of a training config group as composed: its option's, or the group's.
    ConfigError for an option name the group does not have."""
    if group not in OPTION_SCHEMAS:
        return GROUP_SCHEMAS[group]
    options = OPTION_SCHEMAS[group]
    name = node.get("name") if hasattr(node, "get") else None
    _one_of(f"{group}.name", name, tuple(options))
    return options[name]


def training_schemas() -> list[type]:
    """Every schema of the training config: the ones whose keys must say what they are."""
    return [Config, *GROUP_SCHEMAS.values(),
            *(s for options in OPTION_SCHEMAS.values() for s in options.values())]


def unclassified() -> list[str]:
    """`Schema.key` for each key of the training config that is not marked option, param or
    setting, or whose `when` names no key of its schema: a new key must say what it is."""
    bad = []
    for schema in training_schemas():
        names = {f.name for f in dataclasses.fields(schema)}
        for f in dataclasses.fields(schema):
            if schema is Config and f.name in GROUPS:
                continue  # a group: its own schema says
            if f.metadata.get(ROLE) not in ROLES or f.metadata.get("when") not in names | {None}:
                bad.append(f"{schema.__name__}.{f.name}")
    return bad


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def run_params(cfg: DictConfig) -> dict[str, str]:
    """The MLflow params of a training config: what determines the result. Each group's chosen
    option as `<group>` (model=mlp), then that option's params as `<group>.<key>`; operational
    settings are left out (they are in the logged config file)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    params: dict[str, str] = {}
    for group in GROUPS:
        node = values[group]
        for f in dataclasses.fields(schema_of(group, node)):
            role, when = f.metadata.get(ROLE), f.metadata.get("when")
            if role == "option":
                params[group] = _text(node[f.name])
            elif role == "param" and (when is None or node[when]):
                params[f"{group}.{f.name}"] = _text(node[f.name])
    return params


# --- The other entry points: fashion-exp-serve, fashion-exp-evaluate ----------------------------

@dataclass
class ServiceSettings:
    """What the prediction service itself needs (fashion_exp/serving/)."""

    top_k: int = 5
    max_batch: int = 64
    max_images: int = 16
    max_upload_bytes: int = 10_000_000
    max_request_bytes: int = 32_000_000
    max_image_pixels: int = 40_000_000
    object_size: int = IMAGE_SIDE
    max_models: int = 4
    decode_workers: int = 2
    max_header_bytes: int = 32_768
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    follow_seconds: float = 30.0
    metrics: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.top_k <= 10, "top_k", self.top_k, "must be in [1, 10]")
        _check(8 <= self.object_size <= IMAGE_SIDE, "object_size", self.object_size,
               f"must be in [8, {IMAGE_SIDE}] pixels")
        for key in ("max_batch", "max_images", "max_upload_bytes", "max_request_bytes",
                    "max_image_pixels", "max_models"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        # Upper bounds too: a limit that cannot bind (inf, 1e12) is no limit.
        _check(1 <= self.decode_workers <= 64, "decode_workers", self.decode_workers,
               "must be in [1, 64] threads")
        _check(1024 <= self.max_header_bytes <= 1_048_576, "max_header_bytes",
               self.max_header_bytes, "must be in [1024, 1048576] bytes")
        _check(self.max_image_pixels <= 1_000_000_000, "max_image_pixels", self.max_image_pixels,
               "must be at most 1000000000 (decoding takes ~7 bytes per pixel)")
        _check(self.max_images <= 256, "max_images", self.max_images,
               "must be in [1, 256] (a JSON body may take 16 bytes per pixel: 3.2 MB for 256)")
        for key in ("header_timeout", "body_timeout"):
            _check(0 < getattr(self, key) <= 3600, key, getattr(self, key),
                   "must be in (0, 3600] seconds")
        _check(self.follow_seconds == 0 or 0.1 <= self.follow_seconds <= 86400,
               "follow_seconds", self.follow_seconds,
               "must be 0 (do not follow) or in [0.1, 86400] seconds")


@dataclass
class ServeConfig(ServiceSettings):
    model_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    samples: bool = True
    threads: int = 0
    log_level: str = "info"
    drain_seconds: float = 30.0
    data: DataConfig = MISSING
    tracking: TrackingConfig = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_uri is not None:
            _check(self.model_uri.startswith(MODEL_SCHEMES), "model_uri", self.model_uri,
                   f"use {MODEL_FORMS}, or null for the best run")
        _check(bool(self.host.strip()), "host", self.host, "give an address to listen on: "
               "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
        _check(1 <= self.port <= 65535, "port", self.port, "must be in [1, 65535]")
        _check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: TensorFlow decides)")
        _one_of("log_level", self.log_level, LOG_LEVELS)
        _check(0 <= self.drain_seconds <= 3600, "drain_seconds", self.drain_seconds,
               "must be in [0, 3600] seconds")


@dataclass
class EvaluateConfig:
    """fashion-exp-evaluate (conf/evaluate.yaml): a logged model scored on the test set."""

    model_uri: str = MISSING
    batch_size: int = 1024
    gallery_size: int = 40
    task_name: str = "evaluate"
    data: DataConfig = MISSING
    tracking: TrackingConfig = MISSING

    def __post_init__(self) -> None:
        _check(self.model_uri.startswith(MODEL_SCHEMES), "model_uri", self.model_uri,
               f"use {MODEL_FORMS}")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.gallery_size >= 1, "gallery_size", self.gallery_size, "must be >= 1")

