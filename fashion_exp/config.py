"""Typed config schema: registered in Hydra's ConfigStore, checked before any heavy import.

Hydra checks key names and types while it composes the config; `validate` then checks values
(ranges, allowed names) by building the dataclasses below, whose `__post_init__` raise
`ConfigError`. Nothing here imports TensorFlow or MLflow.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from fashion_exp.paths import PACKAGE_PARENT, project_root
from fashion_exp.uris import MODEL_FORMS, MODEL_SCHEMES, URI_SCHEMES, scheme, shown

# conf/ sits beside the package in the repository (the package is installed editable).
CONF_DIR = PACKAGE_PARENT / "conf"

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
ACTIVATIONS = ("relu", "elu", "gelu", "selu", "silu", "tanh", "sigmoid")
POOLINGS = ("max", "avg")
SCHEDULES = ("constant", "cosine", "one_cycle", "plateau")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored")
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


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _one_of(key: str, value: str, names: tuple[str, ...]) -> None:
    _check(value in names, key, value, f"use one of {', '.join(names)}")


def _dropout(key: str, value: float) -> None:
    _check(0.0 <= value < 1.0, key, value, "must be in [0, 1)")


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


@dataclass
class DataConfig:
    dir: str | None = None
    val_split: float = 0.2
    limit: int | None = None
    verify_checksums: bool = True
    shuffle_seed: int | None = None
    download: bool = True

    def __post_init__(self) -> None:
        _check(0.0 < self.val_split < 1.0, "val_split", self.val_split, "must be in (0, 1)")
        if self.limit is not None:
            _check(self.limit >= 10, "limit", self.limit, "must be >= 10, or null for all")


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128, 32])
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _one_of("name", self.name, ("mlp",))
        _widths("hidden", self.hidden)
        _one_of("activation", self.activation, ACTIVATIONS)
        _dropout("dropout", self.dropout)


@dataclass
class CNNConfig:
    name: str = "cnn"
    filters: list[int] = field(default_factory=lambda: [32, 64])
    # Any: one int for every block or a list with one count per block (OmegaConf 2.3 has no
    # Union of int and list); __post_init__ checks which it is.
    convs_per_block: Any = 1
    kernel_size: int = 3
    pooling: str = "max"
    global_pooling: bool = False
    dense: list[int] = field(default_factory=lambda: [128])
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.25

    def __post_init__(self) -> None:
        _one_of("name", self.name, ("cnn",))
        _widths("filters", self.filters)
        _convs_per_block(self.convs_per_block, len(self.filters))
        _check(self.kernel_size in (1, 3, 5, 7), "kernel_size", self.kernel_size,
               "use 1, 3, 5 or 7")
        _check(
            len(self.filters) <= 4, "filters", self.filters,
            "at most 4 pooled blocks fit a 28x28 image",
        )
        _one_of("pooling", self.pooling, POOLINGS)
        _widths("dense", self.dense, allow_empty=True)
        _one_of("activation", self.activation, ACTIVATIONS)
        _dropout("dropout", self.dropout)


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 0.02
    momentum: float = 0.0
    nesterov: bool = False
    beta_1: float = 0.9
    beta_2: float = 0.999
    rho: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _one_of("name", self.name, OPTIMIZERS)
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "must be in [0, 1)")
        for key in ("beta_1", "beta_2", "rho"):
            value = getattr(self, key)
            _check(0.0 < value < 1.0, key, value, "must be in (0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class ScheduleConfig:
    name: str = "constant"
    warmup_epochs: float = 0.0
    start_lr_ratio: float = 0.04
    min_lr_ratio: float = 0.0
    factor: float = 0.5
    patience: int = 2
    monitor: str = "val_loss"

    def __post_init__(self) -> None:
        _one_of("name", self.name, SCHEDULES)
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(0 < self.start_lr_ratio <= 1, "start_lr_ratio", self.start_lr_ratio,
               "must be in (0, 1]")
        _check(0 <= self.min_lr_ratio < 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1)")
        _check(0 < self.factor < 1, "factor", self.factor, "must be in (0, 1)")
        _check(self.patience >= 1, "patience", self.patience, "must be >= 1")
        _one_of("monitor", self.monitor, ("val_loss", "val_accuracy"))


@dataclass
class AugmentConfig:
    shift: float = 0.0
    flip: bool = False
    erasing: float = 0.0
    erasing_max_area: float = 0.25
    test_flip: bool = False

    def __post_init__(self) -> None:
        _check(0 <= self.shift <= 0.5, "shift", self.shift, "must be in [0, 0.5]")
        _check(0 <= self.erasing <= 1, "erasing", self.erasing, "must be in [0, 1]")
        _check(0.02 < self.erasing_max_area <= 1, "erasing_max_area", self.erasing_max_area,
               "must be in (0.02, 1]")


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 32
    seed: int = 0
    deterministic: bool = False
    early_stopping: bool = False
    patience: int = 5
    monitor: str = "val_loss"
    steps_per_execution: int = 32
    jit_compile: bool | None = None
    onednn: bool | None = True
    fused_batch_norm: bool = True
    threads: int = 0
    verbose: int = 1
    label_smoothing: float = 0.0
    precision: str = "float32"
    strategy: str = "default"
    checkpoint: bool = True
    checkpoint_dir: str | None = None
    resume: str | None = None

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


@dataclass
class TrackingConfig:
    mode: str = "local"
    uri: str | None = None
    experiment_name: str = "fashion_exp"
    log_model: bool = True
    registered_model_name: str | None = None
    figures: bool = True
    request_timeout: float = 10.0
    retries: int = 3
    reconnect_seconds: float = 60.0
    offline_dir: str | None = None
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        _one_of("mode", self.mode, TRACKING_MODES)
        kind = scheme(self.uri or "")  # lower case: URI schemes are case-insensitive
        uri = shown(self.uri) if self.uri else self.uri  # a password in it is not printed
        _check(not kind or kind in URI_SCHEMES, "uri", uri,
               f"use a path or a URI of scheme {', '.join(URI_SCHEMES)}")
        _check(self.mode != "server" or kind in ("http", "https"), "uri", uri,
               "tracking=server needs the server's http:// or https:// address")
        _check(self.request_timeout > 0, "request_timeout", self.request_timeout, "must be > 0")
        _check(self.retries >= 0, "retries", self.retries, "must be >= 0")
        _check(self.reconnect_seconds >= 0, "reconnect_seconds", self.reconnect_seconds,
               "must be >= 0")
        _check(0 < self.connect_timeout <= 600, "connect_timeout", self.connect_timeout,
               "must be in (0, 600] seconds")
        _check(bool(self.experiment_name.strip()), "experiment_name", self.experiment_name,
               "must not be empty")


@dataclass
class Config:
    data: DataConfig = MISSING
    model: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    augment: AugmentConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    optimized_metric: str = "val_accuracy"
    task_name: str = "train"


TRACKING_MODES = ("local", "server")
# Stores MLflow can log to: SQL databases, a legacy file store, a tracking server.

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServiceSettings:
    """What the prediction service itself needs (fashion_exp/serving/service.py)."""

    top_k: int = 5
    max_batch: int = 64
    max_images: int = 16
    max_upload_bytes: int = 10_000_000
    max_request_bytes: int = 32_000_000
    max_image_pixels: int = 40_000_000
    object_size: int = 28
    max_models: int = 4
    decode_workers: int = 2
    max_header_bytes: int = 32_768
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    follow_seconds: float = 30.0
    metrics: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.top_k <= 10, "top_k", self.top_k, "must be in [1, 10]")
        _check(8 <= self.object_size <= 28, "object_size", self.object_size,
               "must be in [8, 28] pixels")
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


GROUP_SCHEMAS = {"data": DataConfig, "optimizer": OptimizerConfig,
                 "schedule": ScheduleConfig, "augment": AugmentConfig,
                 "trainer": TrainerConfig, "tracking": TrackingConfig}
MODEL_SCHEMAS = {"mlp": MLPConfig, "cnn": CNNConfig}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; the YAML files in conf/ extend them."""
    # ${project_root:} in configs: the repository, wherever the command runs from.
    OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)
    # ${pid:} in Hydra's output folders: two runs started in the same second get their own.
    # Cached like Hydra's ${now:}: the jobs of a sweep (parallel processes included) resolve
    # the sweep folder to the value of the process that started it.
    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    for name, schema in MODEL_SCHEMAS.items():
        cs.store(group="model", name=f"{name}_schema", node=schema)


def _known_keys(node: DictConfig, prefix: str, known: set[str]) -> None:
    """Hydra lets `+key=value` add any key: refuse keys the schema does not have."""
    for key in node:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", node[key],
                              f"no such key; {prefix.rstrip('.') or 'the config'} has "
                              f"{', '.join(sorted(known - {'hydra'}))}")


def _all_fields(node: DictConfig, prefix: str, schema: type) -> None:
    """Hydra lets `~key` delete a key that has a default, and the dataclass would quietly put
    the default back while the run reads the config itself: refuse a schema key that is gone."""
    for name in (f.name for f in dataclasses.fields(schema)):
        if name not in node:
            raise ConfigError("overrides", f"~{prefix}{name}",
                              f"{prefix}{name} cannot be deleted: every key is read; "
                              "set a value instead")


def refuse_added_keys(cfg: DictConfig, base: DictConfig | None = None) -> None:
    """ConfigError for a key added with +key=value (or deleted with ~key): every node with a
    schema must hold exactly the schema's keys; without a schema, the top level only those of
    `base` (the config as composed without overrides)."""
    if base is not None:
        _known_keys(cfg, "", set(base) | {"hydra"})
    _schema_keys_only(cfg, "")


def _schema_keys_only(node: DictConfig, prefix: str) -> None:
    """_known_keys and _all_fields for every node of a config that has a schema, however
    deep."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        _known_keys(node, prefix, {f.name for f in dataclasses.fields(schema)} | {"hydra"})
        _all_fields(node, prefix, schema)
    for key in node:
        if isinstance(node[key], DictConfig):
            _schema_keys_only(node[key], f"{prefix}{key}.")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first missing or out-of-range key of a composed config."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "???", "a value is required; set it on the command line")
    _known_keys(cfg, "", {f.name for f in dataclasses.fields(Config)} | {"hydra"})
    _all_fields(cfg, "", Config)
    for group in ("data", "model", "optimizer", "schedule", "augment", "trainer", "tracking"):
        node = cfg[group]
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            _known_keys(node, f"{group}.", {f.name for f in dataclasses.fields(schema)})
            _all_fields(node, f"{group}.", schema)
        if group == "model":
            _one_of("model.name", node.get("name"), MODELS)
        try:
            OmegaConf.to_object(node)
        except ConfigError as err:
            raise err.prefixed(group) from None
    _one_of("optimized_metric", cfg.optimized_metric, OPTIMIZABLE)


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf error message folded onto one line, without its internal details."""
    parts: list[str] = []
    text = str(err) + (f"\n{err.__cause__}" if err.__cause__ else "")
    for line in text.splitlines():
        line = line.strip().removeprefix("In 'config': ").rstrip(".:")
        if line.startswith(("full_key", "object_type", "reference_type", "Config search path",
                            "provider=", "Set the environment")) or line.endswith("_schema"):
            continue
        if line and line not in parts:
            parts.append(line)
    return "; ".join(parts).replace("options in", "options for")


# --- The command line: every override checked before Hydra makes an output folder -----------

def command_line(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun) of a command line that runs jobs, parsed with Hydra's own flags;
    None for one that only shows something (--help, --hydra-help, --cfg, --info, -sc).

    Flags may come anywhere (`a=1 -m b=1,2`; Hydra alone wants them first: hand it
    hydra_argv's order). ConfigError for the flags that would run a job on a config other
    than the entry point's (--config-path, --config-name, --config-dir, --experimental-rerun):
    its overrides could not be checked."""
    from hydra._internal.utils import get_args_parser  # the flags exactly as Hydra reads them

    args = get_args_parser().parse_intermixed_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    for flag in ("config_path", "config_name", "config_dir", "experimental_rerun"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')}", getattr(args, flag),
                              "not supported: the command composes its own config from conf/; "
                              "give key=value overrides instead")
    return list(args.overrides), bool(args.multirun)


def hydra_argv(overrides: list[str], multirun: bool) -> list[str]:
    """The arguments of a checked command line in the order Hydra parses (flags first)."""
    return (["--multirun"] if multirun else []) + overrides


def is_hydra_setting(override: str) -> bool:
    """Whether a command-line override sets Hydra's own config (hydra.run.dir=...,
    hydra/launcher=..., with +, ++ or ~ in front)."""
    return re.match(r"[+~]*hydra([./@=]|$)", override) is not None


def optional_groups(config_name: str) -> list[str]:
    """The groups conf/<config_name>.yaml may leave unselected (`group: null` or `optional
    group: ...` in its defaults list): the only ones a `~group` override may delete."""
    import yaml

    text = (CONF_DIR / f"{config_name}.yaml").read_text()
    names = []
    for entry in yaml.safe_load(text).get("defaults", []):
        for key, value in entry.items() if isinstance(entry, dict) else ():
            if key.startswith("optional "):
                names.append(key.split()[-1])
            elif value is None:
                names.append(key)
    return names


def _as_override(value: Any) -> str:
    """A config value as it is written on the command line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


_ABSENT = object()  # OmegaConf.select's answer for a key that is not there


def _refuse_deletes(config_name: str, deletes: list[Any], others: list[str]) -> None:
    """ConfigError for a delete override (`~key`) unless it deletes an optional group: the
    run reads every key of the schema (each has a default or is required), a required group
    needs one of its options, and Hydra's own settings need theirs."""
    from hydra import compose

    optional = optional_groups(config_name)
    only = (f"~ deletes only the optional groups {', '.join(optional)}" if optional else
            "no key or group of this command may be deleted with ~")
    base = None
    for override in deletes:
        key = override.key_or_group
        if key in optional:
            continue  # Hydra checks that it is selected
        if override.is_hydra_override() or key == "hydra":
            reason = ("Hydra's own settings cannot be deleted; set them instead "
                      "(hydra.<key>=<value> or hydra/<group>=<option>)")
        else:
            if base is None:  # the config without the deletes: what they would remove
                base = compose(config_name, overrides=others, return_hydra_config=True)
            choices = base.hydra.runtime.choices
            value = OmegaConf.select(base, key.replace("/", "."), default=_ABSENT,
                                     throw_on_resolution_failure=False)
            if key in choices:
                reason = (f"{key} needs one of its options; choose one instead, e.g. "
                          f"{key}={choices[key]}; {only}")
            elif value is _ABSENT:
                reason = f"no key or group {key} to delete; {only}"
            elif isinstance(value, DictConfig):
                reason = f"{key} cannot be deleted: every key is read; {only}"
            else:
                reason = (f"{key} cannot be deleted: every key is read; set a value "
                          f"instead, e.g. {key}={_as_override(value)}; {only}")
        raise ConfigError("overrides", override.input_line, reason)



def _refuse_added_hydra_keys(config_name: str, added: list[Any], others: list[str]) -> None:
    """ConfigError for `+hydra.key=value` unless it adds to one of Hydra's free-form
    dictionaries (hydra.job.env_set, a launcher's options...): Hydra's settings with a schema
    have fixed keys, and a key added there would be ignored."""
    from hydra import compose

    base = compose(config_name, overrides=others, return_hydra_config=True)
    for override in added:
        path = override.key_or_group.split(".")
        node: Any = base
        depth = 0
        while depth < len(path) and isinstance(node, DictConfig) and path[depth] in node:
            try:
                node = node[path[depth]]
            except Exception:  # noqa: BLE001 - an interpolation: a value, not a dictionary
                node = None
            depth += 1
        if depth == len(path):
            continue  # there already: Hydra refuses `+` and sets it with `++`
        free = isinstance(node, DictConfig) and not dataclasses.is_dataclass(
            OmegaConf.get_type(node))
        if not free:
            where = ".".join(path[:depth])
            keys = ", ".join(sorted(str(k) for k in node)) if isinstance(node, DictConfig) else ""
            raise ConfigError("overrides", override.input_line,
                              f"no such key; {where} has {keys}" if keys else
                              f"no such key: {where} holds a value, not settings")


def _check_overrides(config_name: str, overrides: list[str], hydra_settings: bool) -> None:
    """The overrides Hydra's composition lets through: deletes (~key), keys added to Hydra's
    settings (+hydra.key=...), and Hydra's settings themselves (names and types, composed with
    Hydra's config). Runs inside initialize_config_dir; ConfigError (one line) if refused."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not hydra_settings:
        for override in parsed:
            if override.is_hydra_override() or override.key_or_group == "hydra":
                raise ConfigError("overrides", override.input_line,
                                  "this command runs no Hydra job and makes no output folder: "
                                  "it has no hydra settings; give the keys of "
                                  f"conf/{config_name}.yaml")
    # Each swept key at its first value (an interval at the config's): what is composed here.
    first = [values[0] for o in parsed if not o.is_delete() and (values := swept_values(o))]
    deletes = [o for o in parsed if o.is_delete()]
    if deletes:
        _refuse_deletes(config_name, deletes, first)
    added = [o for o in parsed if (o.is_add() or o.is_force_add()) and o.is_hydra_override()]
    if added:
        lines = {o.input_line for o in added}
        _refuse_added_hydra_keys(config_name, added, [o for o in first if o not in lines])
    if hydra_settings and any(is_hydra_setting(o) for o in first):
        compose(config_name, overrides=first, return_hydra_config=True)


def swept_values(override: Any) -> list[str] | None:
    """The values of a sweep override as `key=value` lines (`a=1,2` -> [`a=1`, `a=2`]); the
    override itself if it sweeps nothing; None for an interval (no values to list)."""
    if not override.is_sweep_override():
        return [override.input_line]
    try:
        values = list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - interval sweeps have no values to list
        return None
    return [f"{override.get_key_element()}={value}" for value in values]


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The variants of a multirun's overrides that are checked before it starts: every swept
    key at its first value, then each other listed value of one key with the rest at their
    first. Values a sweeper draws from an interval are checked by each job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:  # a syntax error
        raise ConfigError("overrides", " ".join(overrides), one_line(err)) from None
    listed = [values for values in map(swept_values, parsed) if values]
    first = [values[0] for values in listed]
    return [first] + [first[:i] + [value] + first[i + 1:]
                      for i, values in enumerate(listed) for value in values[1:]]


def precheck(overrides: list[str], multirun: bool = False) -> list[DictConfig]:
    """Compose the config for these command-line overrides and validate it; returns the
    composed configs (one per checked variant of a multirun, then, for a multirun, the first
    variant with Hydra's config, whose hydra.sweeper the caller checks).

    Raises ConfigError (one line) for an unknown key or group option, a wrong type, an
    out-of-range value, a deleted key (~key) or a key added to Hydra's settings, so that the
    runner can stop before Hydra starts a job. For a multirun every listed value of each swept
    key is checked (the other keys at their first value); values a sweeper draws from an
    interval are checked by each job.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    job_overrides = [o for o in overrides if not is_hydra_setting(o)]
    try:
        variants = sweep_variants(job_overrides) if multirun else [job_overrides]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            _check_overrides("config", overrides, hydra_settings=True)
            configs = []
            for variant in variants:
                configs.append(compose("config", overrides=variant))
                validate(configs[-1])
            if multirun:  # the first variant with Hydra's own config: the sweeper's settings
                hydra_overrides = [o for o in overrides if o not in job_overrides]
                configs.append(compose("config", overrides=variants[0] + hydra_overrides,
                                       return_hydra_config=True))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("overrides", " ".join(overrides), one_line(err)) from None
    return configs


def compose_checked(config_name: str, overrides: list[str],
                    hydra_settings: bool = True) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides and check every value of its schema.

    For the entry points other than training (evaluate, serve): raises ConfigError in one
    line, before Hydra makes an output folder. Hydra's settings (hydra.*) are checked, not
    composed into the result; hydra_settings=False refuses them (a command without Hydra's
    app: serve)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            _check_overrides(config_name, overrides, hydra_settings)
            cfg = compose(config_name,
                          overrides=[o for o in overrides if not is_hydra_setting(o)])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("overrides", " ".join(overrides), one_line(err)) from None
    for key in sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(key, "???", f"required: give {key}=... on the command line")
    refuse_added_keys(cfg)
    for group, node in cfg.items():  # building the dataclasses runs their range checks
        if isinstance(node, DictConfig):
            try:
                OmegaConf.to_object(node)
            except ConfigError as err:
                raise err.prefixed(str(group)) from None
    OmegaConf.to_object(cfg)
    return cfg


def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as MLflow params with dot keys: {'optimizer.lr': '0.02', ...}."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = "null" if node is None else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
