"""The backbone-adapter layer: one description of where a method may hook into any supported model.

A :class:`Backbone` describes a model as towers (``vision``, ``text``, ``unet``, ``dit``) of residual blocks.
Each :class:`Block` names its residual branches (``attn``, ``mlp``; ``attn1``, ``attn2``, ``ff`` in diffusers) and
its projections (``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``, ``mlp.fc1``, ``mlp.fc2``, ...). A
:class:`Projection` says how a projection is stored (its own Linear, a row slice of a fused Linear, a slot of
``nn.MultiheadAttention``, a Conv2d), so methods never touch library module names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ProjectionKind = Literal["linear", "fused", "mha", "conv"]


@dataclass
class Projection:
    """A linear map inside a block.

    Attributes:
        kind: ``linear`` (its own nn.Linear), ``fused`` (rows of a fused nn.Linear such as timm's ``qkv``),
            ``mha`` (a slot of ``nn.MultiheadAttention``), ``conv`` (an nn.Conv2d).
        parent: The module holding the layer as attribute ``attr``.
        attr: Attribute name of the layer on ``parent``.
        slot: For ``fused`` the slice name (``q``/``k``/``v``); for ``mha`` one of ``q``/``k``/``v``/``o``.
        rows: For ``fused``, the (start, stop) output rows of the slice.
    """

    kind: ProjectionKind
    parent: nn.Module
    attr: str
    slot: str | None = None
    rows: tuple[int, int] | None = None

    @property
    def layer(self) -> nn.Module:
        """The module currently stored at ``parent.attr`` (possibly a LoRA wrapper)."""
        return getattr(self.parent, self.attr)

    def base_layer(self) -> nn.Module:
        """The original library module, looking through visionpeft wrappers."""
        layer = self.layer
        while getattr(layer, "_vp_wrapper", False):
            layer = layer.base
        return layer

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of the base weight (and bias) this projection produces, as views."""
        layer = self.base_layer()
        if self.kind == "mha":
            d = layer.embed_dim
            if self.slot == "o":
                return layer.out_proj.weight, layer.out_proj.bias
            i = "qkv".index(self.slot)
            bias = layer.in_proj_bias[i * d : (i + 1) * d] if layer.in_proj_bias is not None else None
            return layer.in_proj_weight[i * d : (i + 1) * d], bias
        if self.kind == "fused":
            start, stop = self.rows
            return layer.weight[start:stop], layer.bias[start:stop] if layer.bias is not None else None
        return layer.weight, layer.bias


@dataclass
class Branch:
    """A residual branch ``x + f(x)`` of a block.

    Attributes:
        module: The module computing ``f``; a forward hook on it sees the branch input and output.
        output: The projection producing the branch output (a per-channel scale after it merges into it exactly).
        norm: The pre-norm feeding ``module``, whose input is the residual stream (None if there is none).
        exact_scale_merge: Whether ``module``'s output is exactly ``output``'s output (up to eval-mode dropout),
            so a per-channel scale on the branch folds into ``output`` exactly.
    """

    module: nn.Module
    output: Projection | None = None
    norm: nn.Module | None = None
    exact_scale_merge: bool = True


@dataclass
class Block:
    """One residual block of a tower.

    Attributes:
        name: Canonical name, e.g. ``blocks.3``, ``text.blocks.3`` or ``down.1.attn.0.block.0``.
        module: The block module (pre-hooks on it see the block input).
        branches: Branch name -> branch, e.g. ``attn`` and ``mlp``.
        projections: Canonical projection name -> projection, e.g. ``attn.q`` or ``mlp.fc2``.
    """

    name: str
    module: nn.Module
    branches: dict[str, Branch]
    projections: dict[str, Projection] = field(default_factory=dict)


@dataclass
class TokenLayout:
    """How a ViT-style tower lays out its token sequence.

    Attributes:
        dim: Token width.
        num_prefix: Prefix tokens of the backbone itself (class token, registers).
        grid: Patch grid (h, w) at the default input size.
        patch_size: Patch size in pixels (VPT's prompt initialisation depends on it).
        in_chans: Image channels.
        batch_first: Whether block inputs are (batch, tokens, dim) rather than (tokens, batch, dim).
        extra_prefix: Prompt tokens currently inserted after the prefix by attached methods.
    """

    dim: int
    num_prefix: int
    grid: tuple[int, int]
    patch_size: int
    in_chans: int = 3
    batch_first: bool = True
    extra_prefix: int = 0

    @property
    def total_prefix(self) -> int:
        return self.num_prefix + self.extra_prefix

    def grid_for(self, num_patches: int) -> tuple[int, int]:
        """The patch grid for a sequence of ``num_patches`` patch tokens (other input sizes are square)."""
        if num_patches == self.grid[0] * self.grid[1]:
            return self.grid
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"cannot infer a patch grid for {num_patches} tokens")
        return side, side


@dataclass
class Tower:
    """A stack of blocks plus the parameters that belong to it.

    Attributes:
        name: ``vision``, ``text``, ``unet`` or ``dit``.
        prefix: Prefix of canonical names (``""`` for the main tower, ``"text."`` for CLIP's text tower).
        blocks: The residual blocks in order.
        owns: Predicate on a model-relative parameter name: does the parameter belong to this tower?
        tokens: The token layout for ViT-style towers (VPT, Convpass need it), else None.
        condition: Predicate selecting the class-condition embedding's parameters (DiT), else None.
    """

    name: str
    prefix: str
    blocks: list[Block]
    owns: Callable[[str], bool]
    tokens: TokenLayout | None = None
    condition: Callable[[str], bool] | None = None


class Backbone:
    """Base class of backbone adapters. Subclasses fill ``towers`` and may override ``head``.

    Args:
        model: The library model.
    """

    family: str = ""
    default_tower: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.towers: dict[str, Tower] = {}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def tower(self, name: str | None) -> Tower:
        from ..errors import IncompatibleMethodError, did_you_mean

        name = name or self.default_tower
        if name not in self.towers:
            raise IncompatibleMethodError(
                f"{self.family} has no '{name}' tower{did_you_mean(name, self.towers)}; "
                f"it has: {', '.join(self.towers)}"
            )
        return self.towers[name]

    def head(self) -> nn.Module | None:
        """The task head trained with every method (a classifier), or None."""
        return None

    def release(self) -> None:
        """Undoes what the adapter changed in the model's structure on construction (nothing, by default);
        called when the last method is detached or merged."""

    def head_name(self) -> str:
        """Model-relative module path of the head."""
        for name, module in self.model.named_modules():
            if module is self.head():
                return name
        raise LookupError("head not found")

    def describe(self) -> dict:
        """Identity written into adapter checkpoints."""
        return {
            "family": self.family,
            "class": type(self.model).__name__,
            "towers": {name: len(t.blocks) for name, t in self.towers.items()},
        }


def iter_block_projections(block: Block, targets: list[str]) -> Iterator[tuple[str, Projection]]:
    """Yields the projections of ``block`` selected by ``targets``.

    A target selects a projection whose canonical name equals it or ends with ``.target``: ``q`` selects
    ``attn.q`` (and both ``attn1.q`` and ``attn2.q`` in a U-Net), ``attn2.q`` only the cross-attention query.
    """
    for name, proj in block.projections.items():
        if any(name == t or name.endswith("." + t) for t in targets):
            yield name, proj
