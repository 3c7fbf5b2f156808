"""Choosing the projections a weight method changes, shared by LoRA and the other methods that wrap projections:
``targets`` (canonical projection names of the tower's blocks: ``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``, ...) or
``target_modules`` (library module paths, PEFT's rule, on any model)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch import nn

from ..backbones.base import Block, Projection, iter_block_projections
from ..backbones.module_paths import library_modules
from ..errors import ConfigError, did_you_mean
from .base import Method

#: Canonical name and projection of each part of one library layer a method changes.
LayerGroup = list[tuple[str, Projection]]


def check_targets(method: Method, targets: Sequence[str]) -> None:
    """Checks that every name in ``targets`` is a projection of the method's tower.

    Raises:
        ConfigError: The tower describes no projections (a model of the generic family: the message names some of
            its Linear layers for ``target_modules``), or a target it does not have (with the closest name).
    """
    if not method.blocks():
        linear = [p for p, _, _, m in library_modules(method.backbone.model) if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"{method.name} on a {type(method.backbone.inner).__name__} (no described projections) needs "
            f"target_modules: module-path suffixes or one regex, e.g. Linear layers "
            f"{', '.join(linear[:3]) or 'none found'}"
        )
    available = {n for b in method.blocks() for n in b.projections}
    short = {n.rpartition(".")[2] for n in available}
    for t in targets:
        if t not in available and t not in short:
            raise ConfigError(
                f"{method.name} target '{t}' does not exist in the {method.backbone.family} '{method.tower.name}' "
                f"tower{did_you_mean(t, sorted(short | available))}; available: {', '.join(sorted(short))}"
            )


def module_projections(path: str, parent: nn.Module, attr: str, module: nn.Module) -> LayerGroup:
    """The projections of one module chosen by path (a ``Method.modules_by_path`` entry): a Linear or Conv2d whole
    (canonical name: its path), an ``nn.MultiheadAttention`` as its four projections (``<path>.q`` ... ``.o``)."""
    if isinstance(module, nn.MultiheadAttention):
        return [(f"{path}.{s}", Projection("mha", parent, attr, slot=s)) for s in "qkvo"]
    return [(path, Projection("conv" if isinstance(module, nn.Conv2d) else "linear", parent, attr))]


def projection_groups(blocks: Sequence[Block], targets: Sequence[str]) -> Iterator[LayerGroup]:
    """The projections ``targets`` choose in each block, one group per library layer holding them (Q and V of
    timm's fused ``qkv`` are two slices of one layer), in block order."""
    for block in blocks:
        groups: dict[tuple[int, str], LayerGroup] = defaultdict(list)
        for pname, proj in iter_block_projections(block, list(targets)):
            groups[(id(proj.parent), proj.attr)].append((f"{block.name}.{pname}", proj))
        yield from groups.values()
