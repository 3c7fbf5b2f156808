"""Selecting library modules by path, as PEFT's ``target_modules`` / ``modules_to_save`` do, on any model."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from ..errors import ConfigError, did_you_mean

#: What a ``target_modules`` / ``modules_to_save`` value may be: a list of module-path suffixes or one regex.
TargetSpec = str | Sequence[str]


def library_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Yields ``(path, parent, attr, module)`` of every module of ``model`` as named before visionpeft touched it:
    wrappers are looked through (a LoRA-wrapped ``qkv`` is ``qkv``) and modules methods added are skipped. The model
    itself (path ``""``) is not yielded."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
        for attr, child in module._modules.items():
            if child is None or getattr(child, "_vp_owned", False):
                continue
            path = prefix + attr
            library = child
            while getattr(library, "_vp_wrapper", False):
                library = library.base
            yield path, module, attr, library
            yield from walk(library, path + ".")

    yield from walk(model, "")


def matches_target(path: str, spec: TargetSpec) -> bool:
    """PEFT's ``target_modules`` rule (``peft.tuners.tuners_utils.check_target_module_exists``): one string is a
    regex the whole path must match; a list holds names the path equals or ends with after a dot. Written here
    because PEFT's function takes a PEFT config and a model (and adds its layer filters); this is the rule alone."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def pattern_key(patterns: Sequence[str], path: str) -> str | None:
    """The first of ``patterns`` (PEFT's ``rank_pattern`` / ``alpha_pattern`` keys) that selects the module at
    ``path``, or None: PEFT's ``get_pattern_key`` (``peft/utils/other.py``) matches ``(.*\\.)?(KEY)$`` from the
    path's start, so a key is a regex for the path or a dotted suffix of it."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", path)), None)


def find_modules(
    candidates: list[tuple[str, nn.Module, str, nn.Module]],
    spec: TargetSpec,
    what: str,
    kinds: tuple[type[nn.Module], ...] | None = None,
) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """The candidates (``library_modules`` entries) whose path ``spec`` selects.

    Args:
        candidates: Modules that may be selected. spec: Suffix list or regex. what: The option, for messages.
        kinds: Module types the caller can adapt; a selected module of another type is an error.

    Raises:
        ConfigError: Nothing is selected (the message names the closest path and a few existing ones), or a
            selected module is of a type not in ``kinds``.
    """
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            raise ConfigError(f"{what} {spec!r} is not a valid regular expression: {err}") from None
    elif not spec:
        raise ConfigError(f"{what} is empty; give module-path suffixes or one regex")
    found = [entry for entry in candidates if matches_target(entry[0], spec)]
    if not found:
        paths = [entry[0] for entry in candidates if kinds is None or isinstance(entry[3], kinds)]
        names = sorted({p.rpartition(".")[2] for p in paths} | set(paths))
        first = spec if isinstance(spec, str) else spec[0]
        shown = ", ".join(paths[:4]) + (f" (+{len(paths) - 4} more)" if len(paths) > 4 else "")
        raise ConfigError(
            f"{what} {spec!r} selects no module{did_you_mean(first, names)}; module paths here: {shown or 'none'}"
        )
    if kinds is not None:
        for path, _, _, module in found:
            if not isinstance(module, kinds):
                allowed = " / ".join(k.__name__ for k in kinds)
                raise ConfigError(f"{what} selects {path}, a {type(module).__name__}; it can adapt {allowed} only")
    return found
