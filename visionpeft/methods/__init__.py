"""Methods: each method module files its Method subclass in ``METHODS`` with ``@register_method`` (under the name
the class states, its declarations checked); ``folders`` reads a diffusers model folder back as the method that
exports one.

Every module of this package except ``base`` is imported here, so adding a method touches only its own file. A
method config is checked when it is built: :func:`make_config` turns option mappings into one, once per run.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..registry import METHODS
from .base import ExportParts, Method, MethodConfig

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(method: str, key: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it converted where the conversion is lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"method '{method}' option '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(method, key, value, arg)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(method, key, v, args[0]) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def make_config(name: str, options: dict[str, Any] | MethodConfig | None = None) -> MethodConfig:
    """Builds the validated config dataclass of method ``name``.

    Args:
        name: A registered method name.
        options: Option overrides, or an already-built config: returned as it is, since a config is checked when
            it is built (``MethodConfig.__post_init__``).

    Raises:
        ConfigError: Unknown method, unknown option (with a suggestion), a value of the wrong type, or a value
            outside the choices or range its field declares (``method 'lora' option 'r' must be at least 1, got 0``).
    """
    cls = METHODS.get(name).config_class
    if isinstance(options, MethodConfig):
        if not isinstance(options, cls):
            raise ConfigError(f"method '{name}' expects a {cls.__name__}, got {type(options).__name__}")
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"the options of method '{name}' must be a mapping of option -> value, got {options!r}")
    options = dict(options or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(
                f"unknown option '{key}' for method '{name}'{did_you_mean(key, fields)}; "
                f"options: {', '.join(sorted(fields))}"
            )
        values[key] = _coerce(name, key, value, hints[key])
    return cls(**values)  # checks the declared choices and ranges


def task_input_values(name: str, given: Collection[str], provided: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The options of method ``name`` that the task fills in: each of its ``task_inputs`` the user left out of
    ``given``, taken from ``provided``.

    Raises:
        ConfigError: The method needs an input the user did not give and the task does not provide.
    """
    values = {}
    for key in METHODS.get(name).task_inputs:
        if key in given:
            continue
        if key not in provided:
            raise ConfigError(f"method '{name}' needs {key}, which the {task} task does not provide")
        values[key] = provided[key]
    return values


def fill_task_inputs(specs: list[tuple[str, dict]], provided: dict[str, Any], task: str) -> list[tuple[str, dict]]:
    """Fills in the options each method takes from the task (``task_inputs``) where the user gave none.

    Args:
        specs: ``(method name, options)`` pairs, before any model is built.
        provided: What the task provides, e.g. ``{"classnames": [...]}``.
        task: The task's name, for the error message.

    Raises:
        ConfigError: A method needs an input the user did not give and the task does not provide.
    """
    return [(name, {**options, **task_input_values(name, options, provided, task)}) for name, options in specs]


def with_task_inputs(
    name: str, config: MethodConfig, given: Collection[str], provided: Mapping[str, Any], task: str
) -> MethodConfig:
    """``config`` (built from the user's options ``given``) with the options the task fills in, or ``config`` itself
    when the task fills none: a copy built with ``dataclasses.replace``, which checks the filled values.

    Raises:
        ConfigError: As :func:`task_input_values`, or a filled value of the wrong type.
    """
    values = task_input_values(name, given, provided, task)
    if not values:
        return config
    hints = typing.get_type_hints(type(config))
    return dataclasses.replace(config, **{key: _coerce(name, key, value, hints[key]) for key, value in values.items()})


def check_call_inputs(specs: list[tuple[str, dict]], available: set[str], task: str) -> None:
    """Checks that the task passes every per-call input the methods read (``call_inputs``).

    Raises:
        ConfigError: A method reads a per-call input the task does not provide.
    """
    for name, _ in specs:
        for key in METHODS.get(name).call_inputs:
            if key not in available:
                raise ConfigError(f"method '{name}' needs a per-call {key}, which the {task} task does not provide")


def check_trains(specs: list[tuple[str, dict]]) -> None:
    """Checks that every method of a training run has something to train: a method that is ``training_free`` says
    why not, and what to use instead, in one line.

    Raises:
        ConfigError: A training-free method.
    """
    for name, _ in specs:
        method = METHODS.get(name)
        if "training_free" in method.provides:
            raise ConfigError(method.training_free())


__all__ = [
    "METHODS",
    "ExportParts",
    "Method",
    "MethodConfig",
    "check_call_inputs",
    "check_trains",
    "fill_task_inputs",
    "make_config",
    "task_input_values",
    "with_task_inputs",
]
