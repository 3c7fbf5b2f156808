"""The schema is the documentation: config fields declared with their help, choices and ranges.

``setting(default, help, choices=..., min=..., max=..., below=...)`` declares a dataclass field whose metadata
says what it means and which values it takes; :func:`check_fields` validates a resolved config against those
declarations and :func:`describe` prints a config with each field's help (``--print-config``). OmegaConf
checks the types; this module checks what a type cannot say.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import MISSING, field
from typing import Any

from .errors import ConfigError


def setting(default: Any = MISSING, help: str = "", *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, below: float | None = None) -> Any:  # fmt: skip
    """A dataclass field with its documentation and constraints.

    Args:
        default: The default value (lists and dicts are copied per instance).
        help: One line saying what the field means (shown by ``--print-config``).
        choices: The allowed values. min / max: Inclusive bounds. below: Exclusive upper bound.
    """
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "below": below}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str = "") -> Any:
    """A nested section field (a dataclass), documented by ``help``."""
    return field(default_factory=cls, metadata={"help": help})


def _sections(schema: type) -> dict[str, type]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])}


def check_fields(schema: type, node: Any, prefix: str = "") -> None:
    """Raises :class:`ConfigError` for the first value outside its declared choices or range."""
    nested = _sections(schema)
    for f in dataclasses.fields(schema):
        key, value = f"{prefix}{f.name}", node[f.name]
        if f.name in nested:
            check_fields(nested[f.name], value, f"{key}.")
            continue
        meta = f.metadata
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"config key '{key}' must be one of {shown}, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"config key '{key}' must be at least {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"config key '{key}' must be at most {meta['max']}, got {value!r}")
        if meta.get("below") is not None and value >= meta["below"]:
            raise ConfigError(f"config key '{key}' must be below {meta['below']}, got {value!r}")


def _flow(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def describe(schema: type, values: dict, indent: int = 0, column: int = 52) -> list[str]:
    """YAML lines of ``values`` (a resolved config as plain containers) with each field's help as a comment."""
    lines = []
    nested = _sections(schema)
    pad = "  " * indent
    for f in dataclasses.fields(schema):
        help_text = f.metadata.get("help", "")
        if f.name in nested:
            lines.append(f"{pad}{f.name}:" + (f"{' ' * max(1, column - len(pad) - len(f.name) - 1)}# {help_text}"
                                              if help_text else ""))  # fmt: skip
            lines += describe(nested[f.name], values[f.name], indent + 1, column)
            continue
        text = f"{pad}{f.name}: {_flow(values[f.name])}"
        lines.append(f"{text}{' ' * max(1, column - len(text))}# {help_text}" if help_text else text)
    return lines
