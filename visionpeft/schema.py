"""The schema is the documentation: config fields declared with their help, choices and ranges.

``setting(default, help, choices=..., min=..., max=..., below=..., above=..., nonempty=..., path=...)`` declares a
dataclass field whose metadata says what it means and which values it takes; :func:`check_fields` validates a
resolved run config or a method config against those declarations (a float is always a finite number; a path field
that names a file or a folder must not name the other kind) and :func:`describe` prints a config with each field's
help (``--print-config``). OmegaConf (run configs) or ``methods.make_config`` (method options) checks the types; this
module checks what a type cannot say.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Mapping, Sized
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean
from .io import kind_problem


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    below: float | None = None,
    above: float | None = None,
    nonempty: bool = False,
    path: bool | str = False,
) -> Any:
    """A dataclass field with its documentation and constraints.

    Args:
        default: The default value (lists and dicts are copied per instance).
        help: One line saying what the field means (shown by ``--print-config``).
        choices: The allowed values. min / max: Inclusive bounds. below / above: Exclusive upper / lower bounds.
        nonempty: The value (a string, list or tuple) must hold something.
        path: The value is a local path (``True``; ``"file"`` / ``"folder"`` when it must be that kind: one that
            exists as the other kind is refused) or a hub id or local path (``"or_id"``); saved run configs hold it
            as an absolute path (see :func:`absolute_paths`).
    """
    metadata = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "below": below,
        "above": above,
        "nonempty": nonempty,
        "path": path,
    }
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


def problem(meta: Mapping[str, Any], value: Any) -> str | None:
    """What is wrong with ``value`` under a field's declared choices and range (``"must be at least 1, got 0"``),
    or None when nothing is."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        return f"must be one of {shown}, got {value!r}{did_you_mean(value, [c for c in choices if c is not None])}"
    if meta.get("nonempty") and isinstance(value, Sized) and len(value) == 0:
        return f"must not be empty, got {value!r}"
    if meta.get("path") in ("file", "folder") and isinstance(value, str) and value:
        local = Path(value).expanduser()
        wrong = kind_problem(local, meta["path"]) if local.exists() else None  # a missing path is the reader's to say
        return None if wrong is None else f"names {value}, which {wrong} (expected: {meta.get('help')})"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    low, high, below, above = [meta.get(k) for k in ("min", "max", "below", "above")]
    if low is not None and value < low:
        return f"must be at least {low}, got {value!r}"
    if high is not None and value > high:
        return f"must be at most {high}, got {value!r}"
    if below is not None and value >= below:
        return f"must be below {below}, got {value!r}"
    if above is not None and value <= above:
        return f"must be above {above}, got {value!r}"
    return None


def check_fields(schema: type, node: Any, prefix: str = "", subject: str = "config key") -> None:
    """Raises :class:`ConfigError` for the first value outside its declared choices or range.

    Args:
        schema: The dataclass declaring the fields (nested sections are checked too).
        node: The values: a mapping (a resolved ``DictConfig``, a dict) or an instance of ``schema``.
        prefix: Prepended to the field names in the message (``optim.``).
        subject: What a field is called in the message: ``config key 'optim.lr' must be ...``,
            ``method 'lora' option 'r' must be ...``.
    """
    nested = _sections(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        value = getattr(node, f.name) if dataclasses.is_dataclass(node) else node[f.name]
        if f.name in nested:
            check_fields(nested[f.name], value, f"{key}.", subject)
            continue
        wrong = problem(f.metadata, value)
        if wrong is not None:
            raise ConfigError(f"{subject} '{key}' {wrong}")


def absolute_paths(schema: type, values: dict, base: Path | None = None) -> None:
    """Makes the path fields of ``values`` (plain containers) absolute, relative to ``base`` (the working
    directory), so that a saved run config works from any directory. A field that may also be a hub id
    (``path="or_id"``) changes only when such a local path exists."""
    base = base or Path.cwd()
    nested = _sections(schema)
    for f in dataclasses.fields(schema):
        value = values.get(f.name)
        if f.name in nested and isinstance(value, dict):
            absolute_paths(nested[f.name], value, base)
        elif f.metadata.get("path") and isinstance(value, str) and value and not Path(value).is_absolute():
            local = (base / value).expanduser()
            if f.metadata["path"] != "or_id" or local.exists():
                values[f.name] = str(local.resolve())


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML flow style (``{name: lora, r: 8}``, ``0.001``, ``null``)."""
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
            lines.append(
                f"{pad}{f.name}:"
                + (f"{' ' * max(1, column - len(pad) - len(f.name) - 1)}# {help_text}" if help_text else "")
            )
            lines += describe(nested[f.name], values[f.name], indent + 1, column)
            continue
        text = f"{pad}{f.name}: {flow_yaml(values[f.name])}"
        lines.append(f"{text}{' ' * max(1, column - len(text))}# {help_text}" if help_text else text)
    return lines
