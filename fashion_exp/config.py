"""Composing the config: the schemas (fashion_exp/schemas.py) registered in Hydra's
ConfigStore, and every command line checked before any heavy import.

Hydra checks key names and types while it composes the config; `validate` then checks values
(ranges, allowed names) by building the schemas' dataclasses, whose `__post_init__` raise
`ConfigError`. A key that the chosen option of a group does not have is refused in one line
that names the option and its keys. Nothing here imports TensorFlow or MLflow.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from fashion_exp.paths import PACKAGE_PARENT, project_root
from fashion_exp.schemas import (
    GROUP_SCHEMAS,
    GROUPS,
    OPTIMIZABLE,
    OPTION_SCHEMAS,
    Config,
    ConfigError,
    EvaluateConfig,
    NotAKeyError,
    ServeConfig,
    _one_of,
    keys_of,
    schema_of,
    unclassified,
)

# conf/ sits beside the package in the repository (the package is installed editable).
CONF_DIR = PACKAGE_PARENT / "conf"

def register_resolvers() -> None:
    """The resolvers of the configs' ${project_root:} and ${pid:}."""
    # ${project_root:} in configs: the repository, wherever the command runs from.
    OmegaConf.register_new_resolver("project_root", lambda: str(project_root()), replace=True)
    # ${pid:} in Hydra's output folders: two runs started in the same second get their own.
    # Cached like Hydra's ${now:}: the jobs of a sweep (parallel processes included) resolve
    # the sweep folder to the value of the process that started it.
    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore, which the YAML files in conf/ extend, and
    register the configs' resolvers."""
    missing = unclassified()
    if missing:  # a programming error: the params of every run would be undecided
        raise TypeError(f"config keys without a role (option, param or setting) in "
                        f"fashion_exp/schemas.py: {', '.join(missing)}")
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    for group, options in OPTION_SCHEMAS.items():
        for name, schema in options.items():
            cs.store(group=group, name=f"{name}_schema", node=schema)


def _schema(group: str, node: Any) -> type:
    """The schema a group's node was composed with (its option's), else the one its name says."""
    typed = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return typed if dataclasses.is_dataclass(typed) else schema_of(group, node)


def not_a_key(group: str, node: Any, key: str) -> NotAKeyError:
    """The error for `group.key` when the group's chosen option (or the group) lacks it."""
    schema = _schema(group, node)
    named = any(f.metadata.get("role") == "option" for f in dataclasses.fields(schema))
    return NotAKeyError(group, node.get("name") if named else None, key, keys_of(schema))


def _known_keys(node: DictConfig, prefix: str, known: set[str]) -> None:
    """Hydra lets `+key=value` add any key: refuse keys the schema does not have."""
    group = prefix.rstrip(".")
    for key in node:
        if key not in known:
            if group in GROUPS:
                raise not_a_key(group, node, str(key))
            raise ConfigError(f"{prefix}{key}", node[key],
                              f"no such key; {group or 'the config'} has "
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
    for group in GROUPS:
        node = cfg[group]
        schema = _schema(group, node)
        _known_keys(node, f"{group}.", {f.name for f in dataclasses.fields(schema)})
        _all_fields(node, f"{group}.", schema)
        try:
            OmegaConf.to_object(node)
        except ConfigError as err:
            raise err.prefixed(group) from None
    _one_of("optimized_metric", cfg.optimized_metric, OPTIMIZABLE)


def _option_of(schema: type) -> str | None:
    """The option a schema is (its `name` default), None for a group's only schema."""
    for f in dataclasses.fields(schema):
        if f.metadata.get("role") == "option":
            return f.default
    return None


def composition_error(err: BaseException, overrides: list[str]) -> ConfigError:
    """A Hydra/OmegaConf composition error as one line: a key that the chosen option of a
    group lacks (given on the command line or by a preset) names the option and its keys."""
    cause: BaseException | None = err
    while cause is not None:
        schema = getattr(cause, "object_type", None)
        full_key = str(getattr(cause, "full_key", "") or "")
        group, _, key = full_key.partition(".")
        if group in GROUPS and key and "." not in key and schema is not None and \
                dataclasses.is_dataclass(schema) and key not in \
                {f.name for f in dataclasses.fields(schema)}:
            source = re.match(r"In '([^']+)'", str(err))
            where = source.group(1) if source and source.group(1) != "config" else None
            option = _option_of(schema)
            if group in GROUP_SCHEMAS and option is not None:  # options sharing one schema
                node = getattr(cause, "parent_node", None)
                option = node.get("name", option) if isinstance(node, DictConfig) else option
            return NotAKeyError(group, option, key, keys_of(schema), where)
        cause = cause.__cause__ or cause.__context__
    return ConfigError("overrides", " ".join(overrides), one_line(err))


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
    # Private API (hydra-core 1.3.8): no public parser of Hydra's command-line flags; this one
    # reads them exactly as Hydra does.
    from hydra._internal.utils import get_args_parser

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
                search_space_keys(configs[-1])
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err, overrides) from None
    return configs


def search_space_keys(cfg: DictConfig) -> None:
    """NotAKeyError for a key of a search space (hydra.sweeper.params) that an option the
    search may use lacks: every option a `choice` of the group lists, or the config's option
    when the group is not searched (`optimizer.momentum` beside `optimizer: choice(sgd, adam)`
    would fail every trial that draws adam)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if not isinstance(space, DictConfig):
        return
    parser = OverridesParser.create()
    for group, options in OPTION_SCHEMAS.items():
        keys = [str(k).partition(".")[2] for k in space if str(k).startswith(f"{group}.")]
        if not keys:
            continue
        drawn = parser.parse_override(f"{group}={space[group]}").value() if group in space \
            else None
        names = [str(v) for v in getattr(drawn, "list", None) or [cfg[group].name]]
        for name in names:
            if name in options:  # an unknown option is Hydra's to refuse, in the trial
                for key in keys:
                    if key not in keys_of(options[name]):
                        raise NotAKeyError(group, name, key, keys_of(options[name]),
                                           "the search space hydra.sweeper.params")


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
        raise composition_error(err, overrides) from None
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
