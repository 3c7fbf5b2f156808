"""Choosing the projections a weight method changes, shared by LoRA and the LyCORIS-family methods: ``targets``
(canonical projection names of the tower's blocks: ``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``, ...) or
``target_modules`` (library module paths, PEFT's rule, on any model)."""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

from torch import nn

from ..backbones.base import Projection, iter_block_projections
from ..backbones.module_paths import library_modules
from ..errors import ConfigError, did_you_mean
from .base import Method

#: Canonical name and projection of each part of one library layer a method changes.
LayerGroup = list[tuple[str, Projection]]


class ProjectionMethod(Method):
    """A method whose config has ``targets`` and ``target_modules`` and that changes the projections they choose.

    With ``target_modules`` each selected module is one group: a Linear or Conv2d whole (canonical name: its module
    path), an ``nn.MultiheadAttention`` as its four projections (``<path>.q`` ... ``<path>.o``). With ``targets``
    the chosen projections of every block are grouped by the library layer holding them, so Q and V of timm's fused
    ``qkv`` are two slices of one layer.
    """

    #: Library module types the method adapts when chosen by module path.
    target_kinds: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)

    def check_fits(self) -> None:
        super().check_fits()
        cfg = self.config
        if cfg.target_modules is not None:
            self.modules_by_path(cfg.target_modules, self.target_kinds)
            return
        if not self.blocks():
            linear = [p for p, _, _, m in library_modules(self.backbone.model) if isinstance(m, nn.Linear)]
            raise ConfigError(
                f"{self.name} on a {type(self.backbone.inner).__name__} (no described projections) needs "
                f"target_modules: module-path suffixes or one regex, e.g. Linear layers "
                f"{', '.join(linear[:3]) or 'none found'}"
            )
        available = {n for b in self.blocks() for n in b.projections}
        short = {n.rpartition(".")[2] for n in available}
        for t in cfg.targets:
            if t not in available and t not in short:
                raise ConfigError(
                    f"{self.name} target '{t}' does not exist in the {self.backbone.family} '{self.tower.name}' "
                    f"tower{did_you_mean(t, sorted(short | available))}; available: {', '.join(sorted(short))}"
                )

    def target_groups(self) -> list[LayerGroup]:
        """The projections to change, one group per library layer, in model order."""
        cfg = self.config
        if cfg.target_modules is not None:
            groups = []
            for path, parent, attr, module in self.modules_by_path(cfg.target_modules, self.target_kinds):
                if isinstance(module, nn.MultiheadAttention):
                    groups.append([(f"{path}.{s}", Projection("mha", parent, attr, slot=s)) for s in "qkvo"])
                else:
                    kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
                    groups.append([(path, Projection(kind, parent, attr))])
            return groups
        groups = []
        for block in self.blocks():
            by_layer: dict[tuple[int, str], LayerGroup] = defaultdict(list)
            for pname, proj in iter_block_projections(block, list(cfg.targets)):
                by_layer[(id(proj.parent), proj.attr)].append((f"{block.name}.{pname}", proj))
            groups.extend(by_layer.values())
        return groups
