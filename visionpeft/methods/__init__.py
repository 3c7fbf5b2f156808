"""Methods: each module registers a Method subclass and its config dataclass in ``METHODS``."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..registry import METHODS
from . import adaptformer, baselines, convpass, coop, difffit, lora, textual_inversion, vpt  # noqa: F401  (registration)
from .base import Method, MethodConfig


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
        options: Option overrides (or an already-built config, returned as is).

    Raises:
        ConfigError: Unknown method, unknown option (with a suggestion) or a value of the wrong type.
    """
    cls = METHODS.get(name).config_class
    if isinstance(options, MethodConfig):
        if not isinstance(options, cls):
            raise ConfigError(f"method '{name}' expects a {cls.__name__}, got {type(options).__name__}")
        return options
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
    return cls(**values)


__all__ = ["METHODS", "Method", "MethodConfig", "make_config"]
