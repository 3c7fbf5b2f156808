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

The sweep folder keeps the resolved spec (grids inline, the config's content digest), so a sweep is resumed or
reported from its folder alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import read_config_file
from ..errors import ConfigError, did_you_mean
from .grid import Point, expand, read_grid
from .runs import config_digest

SPEC_FILE = "sweep.yaml"
SELECT = ("final", "best")


@dataclass
class SweepSpec:
    """The resolved spec.

    Attributes:
        config: The base config (absolute path). digest: Its content digest when the sweep began.
        grids: Label -> grid mapping (a label is a row of the report: a method with its grid).
        tasks: Task names (see :mod:`.tasks`). seeds: The seeds of the final stage (the select stage uses the first).
        protocol: A name of :data:`.protocol.PROTOCOLS`. select: Stage-1 score: the ``final`` or ``best`` val top-1.
        overrides: ``key=value`` overrides of every run (before the grid point's: a grid key wins; the protocol's
            splits and the seed come last).
    """

    config: str
    digest: str
    grids: dict[str, dict[str, Any]]
    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    protocol: str = "none"
    select: str = "final"
    overrides: list[str] = field(default_factory=list)

    def points(self, label: str) -> list[Point]:
        return expand(self.grids[label], f"grid '{label}'")


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
) -> SweepSpec:
    """A checked spec: grid files read, sets of tasks expanded, names checked (:class:`ConfigError` otherwise)."""
    from .protocol import PROTOCOLS
    from .tasks import resolve_tasks

    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"unknown protocol '{protocol}'{did_you_mean(protocol, PROTOCOLS)}; choose one of {', '.join(PROTOCOLS)}"
        )
    if select not in SELECT:
        raise ConfigError(f"select must be one of {', '.join(SELECT)}, got '{select}'")
    if not grids:
        grids = {Path(config).stem: {}}  # no grid: the config's own point
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


SPEC_KEYS = ("config", "grids", "tasks", "seeds", "protocol", "select", "overrides")


def is_spec_file(path: Path) -> bool:
    """Whether a YAML file is a sweep spec (it has ``config`` and ``grids``) rather than a run config."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "grids" in data and "config" in data


def load_spec_file(path: Path, overrides: list[str] | None = None, **given: Any) -> SweepSpec:
    """A spec file; entries in ``given`` that are not None replace the file's, ``overrides`` follow the file's."""
    data = yaml.safe_load(path.read_text()) or {}
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"unknown sweep spec key '{unknown[0]}' in {path}{did_you_mean(unknown[0], SPEC_KEYS)}")
    data.update({k: v for k, v in given.items() if v is not None})
    data["overrides"] = [*(data.get("overrides") or []), *(overrides or [])]
    here = path.parent
    grids = {label: here / g if isinstance(g, str) else g for label, g in (data.get("grids") or {}).items()}
    return make_spec(
        here / data["config"],
        grids,
        data.get("tasks"),
        data.get("seeds", [0]),
        data.get("protocol", "none"),
        data.get("select", "final"),
        data["overrides"],
    )


def save_spec(spec: SweepSpec, folder: Path) -> None:
    from ..io import atomic_write

    text = yaml.safe_dump(asdict(spec), sort_keys=False, width=120)
    atomic_write(folder / SPEC_FILE, lambda tmp: Path(tmp).write_text(text))


def load_saved_spec(folder: Path) -> SweepSpec:
    """The spec a sweep folder keeps."""
    path = folder / SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not a sweep folder (it has no {SPEC_FILE})")
    return SweepSpec(**yaml.safe_load(path.read_text()))
