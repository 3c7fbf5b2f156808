"""Hyper-parameter grids: YAML mappings whose keys are config override paths and whose lists are axes.

The convention of OSU-MLB/PETL_Vision's tuning files, so their grids paste in::

    optim.lr: [0.001, 0.01]              # a list is an axis
    optim.weight_decay: [1.0e-4, 1.0e-3]
    model.drop_path_rate: 0.1            # a scalar is fixed
    method: {name: vpt, deep: true}      # the method is replaced whole (like a ``method=...`` override)
    method.num_tokens: [5, 10, 50, 100]  # ... and its options are then set on top
    data:                                # nested keys are the same as dotted ones: data.batch_size
      batch_size: 64
    method.targets: [[q, k, v]]          # a list that is a value: a one-point axis holding it
    method:                              # an axis of mappings moves several keys together (here alpha = r)
      - {name: lora, r: 1, alpha: 1}
      - {name: lora, r: 8, alpha: 8}

The grid is the product of its axes, in file order (the last axis changes fastest). Inside an axis value nothing is
an axis again. A whole ``method`` (fixed or an axis) is applied before the keys under it, wherever it is written.
``1e-3`` reads as a number (plain YAML 1.1 would read a string).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ATOMIC_KEYS
from ..errors import ConfigError
from ..io import load_yaml
from ..schema import flow_yaml


@dataclass(frozen=True)
class Point:
    """One grid point.

    Attributes:
        overrides: ``key=value`` strings for :func:`visionpeft.config.load_config`: the fixed entries, then one
            choice of every axis.
        choices: ``(key, value text)`` of the axes with more than one value: what the point chose (in reports).
    """

    overrides: tuple[str, ...]
    choices: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.choices) or "(no axis)"


def read_grid(path: str | Path) -> dict[str, Any]:
    """A grid file as a mapping (a :class:`ConfigError` for a missing file, bad YAML or a non-mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        data = load_yaml(path, exponent_floats=True, atomic=ATOMIC_KEYS)  # a key set twice is an error
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path} must hold a mapping of config keys to values or lists")
    return data


def _entries(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of a possibly nested mapping; a mapping under an atomic key (``method``) is one value."""
    out = []
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"grid key {key!r} must be a config key such as optim.lr")
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in ATOMIC_KEYS:
            out += _entries(value, f"{path}.")
        else:
            out.append((path, value))
    return out


def override(key: str, value: Any) -> str:
    """The ``key=value`` override setting ``key`` to ``value`` (the value in YAML flow style)."""
    return f"{key}={flow_yaml(value)}"


def _choice(key: str, value: Any) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """The ``(key, override)`` pairs of one axis value and how the point shows it: a mapping under a non-atomic key
    sets each of its keys."""
    if isinstance(value, dict) and key not in ATOMIC_KEYS:
        return [(k, override(k, v)) for k, v in _entries(value, f"{key}.")], (key, flow_yaml(value))
    return [(key, override(key, value))], (key, flow_yaml(value))


def expand(grid: dict[str, Any], name: str = "grid") -> list[Point]:
    """The grid's points: the product of its axes, each with the fixed entries first.

    Args:
        grid: The grid mapping (see the module docstring).
        name: What to call the grid in errors (its file or label).
    """
    fixed, axes = [], []
    for key, value in _entries(grid):
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{name}: axis '{key}' is empty; give it at least one value")
            axes.append([_choice(key, v) for v in value])
        else:
            fixed.append((key, override(key, value)))
    points = []
    for combo in itertools.product(*axes):
        pairs = [*fixed, *(pair for pairs, _ in combo for pair in pairs)]
        # a whole method goes first, so that options set on top of it (method.r) are not replaced by it
        pairs.sort(key=lambda pair: pair[0] not in ATOMIC_KEYS)
        choices = tuple(choice for (_, choice), axis in zip(combo, axes) if len(axis) > 1)  # one value: fixed
        points.append(Point(tuple(text for _, text in pairs), choices))
    return points
