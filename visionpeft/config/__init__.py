"""Run configs: schema defaults <- YAML files (with ``_base_`` inheritance) <- ``key=value`` overrides.

The ``task:`` key picks the schema (a tree of dataclasses declared with :func:`~.fields.setting`, which says
each field's meaning, choices and range) and the trainer. OmegaConf merges and type-checks; every mistake becomes
a one-line :class:`ConfigError` naming the key: an unknown key (with the closest known one), a wrong type, a value
out of its choices or range, an unknown task or schedule, a method that needs an input the task does not give.
Nothing here imports torch except the method-option check, which runs after every other check.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import ConfigError, did_you_mean
from ..io import load_yaml
from ..schema import absolute_paths, check_fields, describe
from .diffusion_objective import check_objective_config
from .personalization import check_block_lr, check_data_config, check_export_config
from .sections import check_extra_packages, check_optimizer_config
from .tasks import TaskSpec, task_spec

if TYPE_CHECKING:
    from ..methods import MethodConfig

DEFAULT_TASK = "classification"
ATOMIC_KEYS = ("method",)  # replaced whole by a later file or override: options of one method never leak into another


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Reads a YAML file, merging its ``_base_`` files (paths relative to it) underneath."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path} includes itself through _base_")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = load_yaml(path) or {}  # a key written twice is an error, not "the last one wins"
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, (*seen, path)))
    return _deep_merge(merged, data)


def read_config_file(path: str | Path) -> dict:
    """A config file's own content with its ``_base_`` files merged in (no schema, no overrides): what a sweep
    hashes to name its runs."""
    return _read_yaml(Path(path))


def _deep_merge(base: dict, top: dict, atomic: tuple[str, ...] = ATOMIC_KEYS) -> dict:
    out = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and key not in atomic
        out[key] = _deep_merge(out[key], value, ()) if nested else value
    return out


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            keys.append(f"{prefix}{key}")
            keys += _schema_keys(node._get_node(key), f"{prefix}{key}.")
    return keys


def _translate(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        known = _schema_keys(schema)
        if key in known:  # a dotted key written in a YAML file: OmegaConf reads it as one key named "optim.lr"
            parent, _, leaf = key.rpartition(".")
            return ConfigError(
                f"config key '{key}' in {source} must be nested in a YAML file: {parent}: {{{leaf}: ...}}"
            )
        return ConfigError(f"unknown config key '{key}' in {source}{did_you_mean(key, known)}")
    if isinstance(err, ValidationError):
        value = getattr(err, "msg", str(err)).splitlines()[0]
        return ConfigError(f"config key '{key}' in {source} has the wrong type: {value}")
    return ConfigError(f"invalid config ({source}): {str(err).splitlines()[0]}")


def normalize_methods(method: Any) -> list[tuple[str, dict[str, Any]]]:
    """``"vpt"``, ``{name: vpt, num_tokens: 10}`` or a list of those -> ``[(name, options)]`` (the entries' shape
    checked; the options are checked once, by :func:`check_methods`)."""
    entries = method if isinstance(method, (list, tuple)) else [method]
    out = []
    for entry in entries:
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            options = {k: v for k, v in entry.items() if k != "name"}
            name = entry["name"]
        else:
            raise ConfigError(f"config key 'method' must be a method name or {{name: ..., options}}, got {entry!r}")
        out.append((name, options))
    if not out:
        raise ConfigError("config key 'method' is empty")
    return out


def _task_of(raw: dict, overrides: list[str]) -> TaskSpec:
    name = raw.get("task", DEFAULT_TASK)
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "task":
            name = value.strip()
    if not isinstance(name, str):
        raise ConfigError(f"config key 'task' must be a task name, got {name!r}")
    return task_spec(name)


def _check_run_name(name: str | None) -> None:
    """A run folder lives inside ``train.output_dir``: its name is one folder name."""
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
        raise ConfigError(
            f"train.run_name {name!r} must be a folder name inside train.output_dir (no '/', no '..'); "
            "set train.output_dir to choose where runs go"
        )


def _check_run_length(config: DictConfig) -> None:
    """One run length and one warmup, in whichever unit the recipe counts; a schedule that can warm up."""
    optim = config.optim
    if (optim.epochs is None) == (optim.steps is None):
        if optim.epochs is None:
            raise ConfigError("set the run length: optim.epochs or optim.steps")
        raise ConfigError(
            f"optim.epochs ({optim.epochs}) and optim.steps ({optim.steps}) are both set; set one of them to null"
        )
    if optim.warmup_epochs is not None and optim.warmup_steps is not None:
        raise ConfigError(
            f"optim.warmup_epochs ({optim.warmup_epochs}) and optim.warmup_steps ({optim.warmup_steps}) are both "
            "set; set one of them to null"
        )
    for unit in ("epochs", "steps"):
        length, warmup = optim[unit], optim[f"warmup_{unit}"]
        if length is not None and warmup is not None and warmup > length:
            raise ConfigError(
                f"optim.warmup_{unit} ({warmup}) exceeds optim.{unit} ({length}), so the learning rate would never "
                f"reach its peak; lower optim.warmup_{unit} too"
            )
    if optim.schedule == "constant" and (optim.warmup_epochs or optim.warmup_steps):
        raise ConfigError("optim.schedule=constant has no warmup; use optim.schedule=constant_with_warmup")


def check_methods(config: DictConfig, spec: TaskSpec) -> list[tuple[str, MethodConfig]]:
    """The config's methods built (``make_config``: every option checked against its method's schema) and checked
    against what the task gives them; :func:`method_configs` hands these built configs on to the trainer."""
    from ..methods import check_call_inputs, check_trains, fill_task_inputs, make_config

    methods = methods_of_config(config)
    built = [(name, make_config(name, options)) for name, options in methods]
    fill_task_inputs(methods, dict.fromkeys(spec.task_inputs), spec.name)  # the values come when the run starts
    check_call_inputs(methods, set(spec.call_inputs), spec.name)
    check_trains(methods)
    _BUILT_METHODS[id(config)] = (methods, built)
    weakref.finalize(config, _BUILT_METHODS.pop, id(config), None)
    return built


#: id(config) -> (its method entries, those entries as built by check_methods); dropped with the config.
_BUILT_METHODS: dict[int, tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, MethodConfig]]]] = {}


def method_configs(config: DictConfig, provided: Mapping[str, Any] | None = None) -> list[tuple[str, MethodConfig]]:
    """The config's methods as the configs :func:`load_config` built and checked (built here only for a config made
    some other way), with the options the task fills in (``provided``: ``{"classnames": [...]}``) where the user
    gave none: what a trainer passes to ``vp.attach``.

    Raises:
        ConfigError: A method needs an input the task does not provide.
    """
    from ..methods import with_task_inputs

    methods = methods_of_config(config)
    remembered, built = _BUILT_METHODS.get(id(config), (None, None))
    if remembered != methods:  # a config load_config did not make (or whose methods changed since)
        built = check_methods(config, task_spec(config.task))
    return [
        (name, with_task_inputs(name, method, options, provided or {}, config.task))
        for (name, options), (_, method) in zip(methods, built)
    ]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> DictConfig:
    """Builds the resolved, validated config: schema defaults <- YAML (with ``_base_``) <- overrides.

    Args:
        path: The YAML file (None: the classification defaults and the overrides only).
        overrides: ``key=value`` strings (dotted keys); ``task=NAME`` picks another task.
    """
    overrides = list(overrides or [])
    raw = _read_yaml(Path(path)) if path is not None else {}
    spec = _task_of(raw, overrides)
    schema = OmegaConf.structured(spec.schema)
    config = schema
    try:
        config = OmegaConf.merge(config, OmegaConf.create(raw))
    except OmegaConfBaseException as err:
        raise _translate(err, schema, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key = item.split("=", 1)[0].strip()
        try:
            top = OmegaConf.from_dotlist([item])
            if key in ATOMIC_KEYS:
                config = OmegaConf.merge(config, {"method": None})
                if isinstance(top.method, str):  # method=lora: that method with its defaults; method.r=4 may follow
                    top = OmegaConf.create({"method": {"name": top.method}})
            elif key == "method.name":
                _check_method_switch(config.method, top.method.name, item)
            config = OmegaConf.merge(config, top)
        except OmegaConfBaseException as err:
            raise _translate(err, schema, f"override '{item}'") from None
    if config.train.run_name is None and path is not None:
        config.train.run_name = Path(path).stem
    if config.train.mixed_precision == "False":  # YAML reads a bare `no` as false; accelerate's spelling is "no"
        config.train.mixed_precision = "no"
    check_fields(spec.schema, config)
    _check_run_name(config.train.run_name)
    _check_run_length(config)
    check_optimizer_config(config)
    check_extra_packages(config)
    check_objective_config(spec.schema, config)
    check_data_config(spec.schema, config)
    check_block_lr(spec.schema, config)
    check_export_config(spec.schema, config)
    check_methods(config, spec)  # the only check that imports the methods (and torch)
    OmegaConf.set_readonly(config, True)
    return config


def _check_method_switch(current: Any, name: Any, item: str) -> None:
    """``method.name=OTHER`` keeps the options written for the current method: say so instead of letting them
    reach the other method."""
    if not isinstance(current, DictConfig) or "name" not in current or current.name == name:
        return
    foreign = sorted(k for k in current if k != "name")
    if foreign:
        raise ConfigError(
            f"override '{item}' switches the method from {current.name} to {name}, but the options "
            f"{', '.join(foreign)} were written for {current.name}; use method={name} (its defaults) and then "
            f"method.KEY=VALUE for its options"
        )


def schema_of(config: DictConfig) -> type:
    return task_spec(config.task).schema


def describe_config(config: DictConfig) -> str:
    """The resolved config as YAML with each field's help as a comment (``--print-config``)."""
    values = OmegaConf.to_container(config)
    return "\n".join(describe(schema_of(config), values)) + "\n"


#: The command line a run folder records (set by the command that starts the run; default: ``sys.argv``).
RUN_COMMAND: ContextVar[list[str] | None] = ContextVar("RUN_COMMAND", default=None)


def run_command() -> list[str]:
    """The command line that started this run (what run folders and model cards record)."""
    import sys

    return RUN_COMMAND.get() or [Path(sys.argv[0]).name, *sys.argv[1:]]


def save_config(config: DictConfig, path: Path) -> None:
    """Writes the resolved config (what the run really used) as YAML, with its path fields made absolute (the run
    folder is read from any directory: ``visionpeft eval RUN``) and, as comments, the command that made it and its
    working directory."""
    import os
    import shlex

    from ..io import atomic_write
    from ..version import __version__

    values = OmegaConf.to_container(config, resolve=True)
    absolute_paths(schema_of(config), values)
    header = (
        f"# made by visionpeft {__version__}: {shlex.join(run_command())}\n"
        f"# working directory: {os.getcwd()} (relative paths below are made absolute)\n"
    )
    text = header + OmegaConf.to_yaml(OmegaConf.create(values))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def methods_of_config(config: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    method = config.method
    return normalize_methods(OmegaConf.to_container(method) if isinstance(method, (DictConfig, ListConfig)) else method)


__all__ = [
    "ConfigError",
    "TaskSpec",
    "describe_config",
    "load_config",
    "method_configs",
    "methods_of_config",
    "read_config_file",
    "save_config",
    "task_spec",
]
