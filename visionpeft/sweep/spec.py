"""A sweep's specification: base config, grids, tasks, seeds, protocol; kept in the sweep folder as ``sweep.yaml``.

A spec comes from the command line (``CONFIG --grid G ... --tasks ... --seeds ...``) or from a spec file, a YAML
mapping with the same entries (``grids`` maps a label to a grid file or an inline grid; paths are relative to the
spec file)::

    config: ../configs/_base_/demo.yaml
    grids: {lora: lora_demo.yaml, vpt: {method: {name: vpt, deep: true}, optim.lr: [0.01, 0.005]}}
    tasks: [digits, textures, faces]
    seeds: [0, 1, 2]
    protocol: holdout
    overrides: [optim.epochs=8]
    base_to_new: false   # true: CoCoOp's base-to-new (train on the base classes; report base, new, harmonic mean)

The sweep folder keeps the resolved spec (grids inline, the config's content digest), so a sweep is resumed or
reported from its folder alone. Both files are checked against :class:`SweepSpec`'s declared fields (their types,
choices and help) before anything else happens: a wrong entry is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import ATOMIC_KEYS, read_config_file
from ..errors import ConfigError, did_you_mean
from ..io import load_yaml
from ..schema import problem, setting
from .grid import Point, expand, read_grid
from .protocol import PROTOCOLS, SELECT
from .runs import config_digest

SPEC_FILE = "sweep.yaml"
#: the lock a sweep driver holds on its folder (``sweep.lock`` + ``sweep.lock.json``, see :mod:`visionpeft.locks`)
SWEEP_LOCK = "sweep"


@dataclass
class SweepSpec:
    """The resolved spec (what ``sweep.yaml`` in a sweep folder holds); each field declares its type and help."""

    config: str = setting(MISSING, "the base run config; in a spec file a path relative to the file")
    digest: str = setting(MISSING, "the base config's content digest when the sweep began")
    grids: dict[str, dict[str, Any]] = setting(
        MISSING, "grid label (a report row) -> grid mapping; in a spec file also a grid file", nonempty=True
    )
    tasks: list[str] = setting(MISSING, "task names or sets: vtab, vtab-natural, demo, ...", nonempty=True)
    seeds: list[int] = setting([0], "seeds of the final stage; the select stage uses the first", nonempty=True)
    protocol: str = setting("none", "the evaluation protocol", choices=tuple(PROTOCOLS))
    select: str = setting("final", "stage-1 score: the final or the best val top-1", choices=SELECT)
    overrides: list[str] = setting([], "key=value overrides of every run (before the grid point's)")
    base_to_new: bool = setting(
        False, "CoCoOp's base-to-new: train on the base half of each task's classes, test on base and new"
    )

    def points(self, label: str) -> list[Point]:
        return expand(self.grids[label], f"grid '{label}'")


FIELDS = {f.name: f for f in dataclasses.fields(SweepSpec)}
HINTS = typing.get_type_hints(SweepSpec)
#: a spec file's entries: no digest (it is computed), grids may name files, tasks may be left to the config
FILE_HINTS = {
    **{key: hint for key, hint in HINTS.items() if key != "digest"},
    "grids": dict[str, str | dict[str, Any] | None],
    "tasks": list[str] | None,
}
SPEC_KEYS = tuple(FILE_HINTS)
#: keys a saved ``sweep.yaml`` may lack (written before they existed): their defaults apply
LATER_KEYS = ("base_to_new",)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value has the declared type (``list[int]``, ``dict[str, str | dict]``, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


_WORDS = {
    str: ("a string", "strings"),
    int: ("an integer", "integers"),
    bool: ("true or false", "trues or falses"),
    type(None): ("null", "nulls"),
}
#: what a type says too clumsily in general words
_SAID = {
    dict[str, str | dict[str, Any] | None]: "a mapping of grid labels to grid files or inline grids",
    dict[str, dict[str, Any]]: "a mapping of grid labels to grids",
}


def _words(hint: Any, plural: bool = False) -> str:
    """A type in words: ``list[int]`` -> "a list of integers"."""
    if hint in _SAID:
        return _SAID[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_words(arg, plural) for arg in args)
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {_words(args[0], True)}"
    if origin is dict:
        return f"{'mappings' if plural else 'a mapping'} of names to {_words(args[1], True)}"
    if hint is Any:
        return "values" if plural else "a value"
    return _WORDS.get(hint, (hint.__name__, hint.__name__ + "s"))[plural]


def check_entries(data: Any, where: str, hints: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """``data`` (a YAML document) as a mapping of known keys with values of their declared types; a
    :class:`ConfigError` naming ``where`` and the key otherwise.

    Args:
        data: The document. where: What to call it in errors (``sweep spec grids/demo.yaml``).
        hints: Key -> declared type. required: The keys that must be there.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with the keys {', '.join(hints)}, got {data!r:.80}")
    for key in data:
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{key}'{did_you_mean(str(key), hints)}; keys: {', '.join(hints)}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{where} lacks '{key}' ({FIELDS[key].metadata['help']})")
    for key, value in data.items():
        if not _fits(value, hints[key]):
            raise ConfigError(
                f"{where}: '{key}' must be {_words(hints[key])} ({FIELDS[key].metadata['help']}), got {value!r:.80}"
            )
        wrong = problem(FIELDS[key].metadata, value)  # choices, nonempty
        if wrong is not None:
            raise ConfigError(f"{where}: '{key}' {wrong}")
    return data


def _check_labels(grids: dict[str, Any], where: str) -> None:
    """A grid label names a report row and a folder under ``runs/<task>/``: one folder name."""
    for label in grids:
        if label in ("", ".", "..") or "/" in label or "\\" in label:
            raise ConfigError(f"{where}: grid label {label!r} must be a folder name (no '/', no '..')")


def extends(new: SweepSpec, old: SweepSpec) -> bool:
    """Whether ``new`` is ``old`` with seeds appended (the select stage's seed, the first, stays) and / or tasks
    added: every run of ``old`` is then a run of ``new`` (run names hash the spec's config, point, seed and stage)."""
    same = asdict(replace(new, seeds=old.seeds, tasks=old.tasks)) == asdict(old)
    return same and new.seeds[: len(old.seeds)] == old.seeds and set(old.tasks) <= set(new.tasks)


def digest_of(config: str | Path) -> str:
    return config_digest(read_config_file(config))


def default_task(config: str | Path) -> str:
    """The dataset a config trains on (its ``data.name``; the classification default otherwise)."""
    data = read_config_file(config).get("data") or {}
    return str(data.get("name", "cifar100")).removeprefix("vtab-")


def make_spec(
    config: str | Path,
    grids: dict[str, Any],
    tasks: list[str] | None,
    seeds: list[int],
    protocol: str,
    select: str,
    overrides: list[str],
    base_to_new: bool = False,
) -> SweepSpec:
    """A checked spec: grid files read, sets of tasks expanded, names checked (:class:`ConfigError` otherwise)."""
    from .tasks import resolve_tasks

    for key, value in (("protocol", protocol), ("select", select)):
        wrong = problem(FIELDS[key].metadata, value)
        if wrong is not None:
            raise ConfigError(f"sweep spec key '{key}' {wrong}")
    if not grids:
        grids = {Path(config).stem: {}}  # no grid: the config's own point
    _check_labels(grids, "sweep spec")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {seeds}")
    loaded = {label: read_grid(g) if isinstance(g, (str, Path)) else dict(g or {}) for label, g in grids.items()}
    config = str(Path(config).resolve())
    spec = SweepSpec(
        config,
        digest_of(config),
        loaded,
        resolve_tasks(tasks or [default_task(config)]),
        [int(s) for s in seeds],
        protocol,
        select,
        list(overrides),
        base_to_new,
    )
    for label in spec.grids:
        spec.points(label)  # an empty axis is an error now, before any run
    return spec


def grids_from_files(paths: list[str | Path]) -> dict[str, str | Path]:
    """Label -> grid file; the label is the file's stem (``grids/lora.yaml`` -> ``lora``)."""
    grids: dict[str, str | Path] = {}
    for path in paths:
        label = Path(path).stem
        if label in grids:
            raise ConfigError(f"two grids are named '{label}' ({grids[label]}, {path}); rename one")
        grids[label] = path
    return grids


def _read(path: Path, where: str) -> Any:
    """A spec file's YAML (a key written twice is an error; a grid's ``method`` mapping is one value)."""
    try:
        first = yaml.safe_load(path.read_text())
        grids = first.get("grids") if isinstance(first, dict) else None
        labels = grids if isinstance(grids, dict) else {}
        return load_yaml(path, atomic=[f"grids.{label}.{key}" for label in labels for key in ATOMIC_KEYS])
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where} cannot be read: {reason}") from None


def is_spec_file(path: Path) -> bool:
    """Whether a YAML file is a sweep spec (it has ``config`` and ``grids``) rather than a run config."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "grids" in data and "config" in data


def load_spec_file(path: Path, overrides: list[str] | None = None, **given: Any) -> SweepSpec:
    """A spec file; entries in ``given`` that are not None replace the file's, ``overrides`` follow the file's."""
    where = f"sweep spec {path}"
    data = check_entries(_read(path, where) or {}, where, FILE_HINTS, ("config", "grids"))
    _check_labels(data["grids"], where)
    data.update({k: v for k, v in given.items() if v is not None})
    data["overrides"] = [*(data.get("overrides") or []), *(overrides or [])]
    here = path.parent
    grids = {label: here / g if isinstance(g, str) else g for label, g in data["grids"].items()}
    return make_spec(
        here / data["config"],
        grids,
        data.get("tasks"),
        data.get("seeds", [0]),
        data.get("protocol", "none"),
        data.get("select", "final"),
        data["overrides"],
        data.get("base_to_new", False),
    )


def save_spec(spec: SweepSpec, folder: Path) -> None:
    from ..io import atomic_write

    text = yaml.safe_dump(asdict(spec), sort_keys=False, width=120)
    atomic_write(folder / SPEC_FILE, lambda tmp: Path(tmp).write_text(text))


def load_saved_spec(folder: Path) -> SweepSpec:
    """The spec a sweep folder keeps (one line naming the file when it is damaged or was edited out of shape)."""
    path = folder / SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a sweep folder (it has no {SPEC_FILE})")
    where = f"{path} (written by visionpeft sweep; damaged or edited?)"
    required = tuple(key for key in HINTS if key not in LATER_KEYS)
    spec = SweepSpec(**check_entries(_read(path, where), where, HINTS, required))
    _check_labels(spec.grids, where)
    return spec
