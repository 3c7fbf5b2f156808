"""File reading and writing shared by checkpoints, exports, configs, grids and the training loop: atomic writes, the
one strict YAML reader, what is wrong with a path, paths as committed files show them."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Calls ``write(tmp_path)`` and renames the result over ``path``, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result should be an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shown_path(path: str | Path) -> str:
    """A path as reports and cards show it: relative to the working directory when it lies inside it (no machine's
    home folder in a committed file), as given otherwise."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def kind_problem(path: Path, expected: str) -> str | None:
    """What is wrong with ``path`` where a ``"file"`` or a ``"folder"`` is expected ("does not exist", "is a folder,
    not a file", ...), or None when it is one."""
    if expected == "folder" and path.is_dir() or expected == "file" and path.is_file():
        return None
    if not path.exists():
        return "does not exist"
    if path.is_dir() or path.is_file():
        return f"is a {'folder' if path.is_dir() else 'file'}, not a {expected}"
    return f"is not a {expected} (a device, pipe or socket)"


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping sets one key twice (``lr:`` twice, or ``optim.lr:`` beside ``optim: {lr: ...}``)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1: ``1e-3`` is a string, as in ``yaml.safe_load``)."""


class _ExponentFloatLoader(_StrictLoader):
    """... with ``1e-3`` read as a float, as in YAML 1.2 and OmegaConf."""


_ExponentFloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)
_MERGE = "tag:yaml.org,2002:merge"


def _refuse_duplicates(node: yaml.Node, prefix: str, seen: dict[str, int], atomic: Iterable[str]) -> None:
    """Raises :class:`DuplicateKeyError` for a key set twice: in one mapping, or once dotted and once nested
    (``a.b`` and ``a: {b: ...}`` name the same key; a mapping under an ``atomic`` key is one value)."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, "", {}, atomic)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    own: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
            continue  # a `<<` merge may be overridden by design; non-scalar keys are PyYAML's to refuse
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in own:
            raise DuplicateKeyError(f"key '{prefix}{key}' is written twice (lines {own[key]} and {line})")
        own[key] = line
        path = f"{prefix}{key}"
        if isinstance(value_node, yaml.MappingNode) and path not in atomic:
            _refuse_duplicates(value_node, f"{path}.", seen, atomic)
            continue
        if path in seen:
            raise DuplicateKeyError(
                f"key '{path}' is written twice (lines {seen[path]} and {line}; a dotted key and the same key "
                "nested are one key)"
            )
        seen[path] = line
        _refuse_duplicates(value_node, "", {}, atomic)


def load_yaml(path: str | Path, exponent_floats: bool = False, atomic: Iterable[str] = ()) -> Any:
    """Reads a YAML file safely and strictly: a key written twice in a mapping is an error here, not "the last one
    wins" (YAML requires unique keys; PyYAML silently keeps the last), and so is a key written once dotted and once
    nested (``optim.lr: 0.1`` beside ``optim: {lr: 0.2}``).

    Args:
        path: The file.
        exponent_floats: Read ``1e-3`` as a float (YAML 1.2, OmegaConf) instead of a string (YAML 1.1).
        atomic: Dotted keys whose mapping is one value (``method``): keys under them may be set again dotted.

    Raises:
        yaml.YAMLError: Invalid YAML, or :class:`DuplicateKeyError` (a one-line message naming the key and lines).
        OSError: The file cannot be read.
    """
    loader = (_ExponentFloatLoader if exponent_floats else _StrictLoader)(Path(path).read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, "", {}, tuple(atomic))
        return loader.construct_document(node)
    finally:
        loader.dispose()
