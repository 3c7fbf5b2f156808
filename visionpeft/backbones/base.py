"""The backbone-adapter layer: one description of where a method may hook into any supported model.

A :class:`Backbone` describes a model as towers (``vision``, ``text``, ``unet``, ``dit``) of residual blocks.
Each :class:`Block` names its residual branches (``attn``, ``mlp``; ``attn1``, ``attn2``, ``ff`` in diffusers) and
its projections (``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``, ``mlp.fc1``, ``mlp.fc2``, ...). A
:class:`Projection` says how a projection is stored (its own Linear, a row slice of a fused Linear, a slot of
``nn.MultiheadAttention``, a Conv2d), so methods never touch library module names. A tower also names its stage
modules (``embed``, ``norm``; a U-Net's ``conv_in``, ``time_embedding``, ``down.i``, ``mid``, ``up.i``, ``conv_out``)
and the capabilities it offers to methods (``tokens``: a ViT token sequence on a patch grid, ``text_prompts``,
``new_tokens``).

A task model (a classifier, a segmenter, a control holder) wraps a library model and owns heads; it says so through
the :class:`TaskModel` protocol, and the adapter of its library model is bound to it (:meth:`Backbone.bind_task`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError, IncompatibleMethodError, did_you_mean
from .module_paths import TargetSpec, find_modules, library_modules

ProjectionKind = Literal["linear", "fused", "mha", "conv"]


@runtime_checkable
class TaskModel(Protocol):
    """A module that wraps a library model and owns task heads (CLIP classifier, segmenter, control holder).

    ``attach`` adapts the library model returned by :meth:`inner_model` (which must be a submodule) and trains the
    modules returned by :meth:`task_heads` with every method; canonical checkpoint names of a head are
    ``<head name>.<parameter>``.
    """

    def inner_model(self) -> nn.Module: ...

    def task_heads(self) -> dict[str, nn.Module | None]: ...


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
        residual: The outermost module between ``module`` and the residual add (timm's drop path, open_clip's
            layer scale): a method adding to its output adds past the branch's layer scale and drop path, as the
            official Convpass / AdaptFormer blocks do (None: there is none; add to ``module``'s output).
    """

    module: nn.Module
    output: Projection | None = None
    norm: nn.Module | None = None
    exact_scale_merge: bool = True
    residual: nn.Module | None = None


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
        patch_hw: Patch (height, width) when not square; None means ``patch_size`` both ways.
        pad: Whether the patch embedding pads images to a multiple of the patch (timm ``dynamic_img_pad``).
        input_grid: The patch grid of the latest input, recorded while methods are attached.
    """

    dim: int
    num_prefix: int
    grid: tuple[int, int]
    patch_size: int
    in_chans: int = 3
    batch_first: bool = True
    extra_prefix: int = 0
    patch_hw: tuple[int, int] | None = None
    pad: bool = False
    input_grid: tuple[int, int] | None = None

    @property
    def total_prefix(self) -> int:
        return self.num_prefix + self.extra_prefix

    def image_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an image of ``height`` x ``width`` pixels."""
        ph, pw = self.patch_hw or (self.patch_size, self.patch_size)
        if self.pad:
            return math.ceil(height / ph), math.ceil(width / pw)
        return height // ph, width // pw

    def grid_for(self, num_patches: int) -> tuple[int, int]:
        """The patch grid of a sequence of ``num_patches`` patch tokens: the recorded grid of the current input,
        else the default grid, else a square one."""
        for grid in (self.input_grid, self.grid):
            if grid is not None and grid[0] * grid[1] == num_patches:
                return grid
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
        stages: Named stage modules methods may hook like blocks (``embed`` takes the image of a ViT tower,
            ``pre_norm`` the embedded tokens (position embedding added) before the first block, ``norm`` the final norm;
            a U-Net has ``conv_in``, ``time_embedding``, ``down.i``, ``mid``, ``up.i``, ``conv_out``).
        capabilities: What the tower offers to methods; ``tokens`` is added when ``tokens`` is set.
        forward: Runs the tower on an image (for :meth:`Backbone.features`), for ViT-style towers.
        position: ``(owner, attr)`` of the position-embedding parameter added to the embedded tokens, one row per
            token, the prefix tokens' first (open_clip's ``positional_embedding``): where a constant a method adds to
            the patch tokens folds in when the patch-embedding conv has no bias; None where not described.
    """

    name: str
    prefix: str
    blocks: list[Block]
    owns: Callable[[str], bool]
    tokens: TokenLayout | None = None
    condition: Callable[[str], bool] | None = None
    stages: dict[str, nn.Module] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    forward: Callable[[torch.Tensor], Any] | None = None
    position: tuple[nn.Module, str] | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None:
            self.capabilities = self.capabilities | {"tokens"}


class CallInputs(dict):
    """The per-call inputs of the conditioning channel (``vp.conditioning``). A deep copy of an adapted model
    starts without any: they belong to one call, not to the model."""

    def __deepcopy__(self, memo: dict) -> CallInputs:
        return type(self)()


class _StopForward(Exception):
    """Ends a forward pass once :meth:`Backbone.features` has every block output it asked for."""


def _within(prefix: str, predicate: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda name: name.startswith(prefix) and predicate(name[len(prefix) :])


def _has_parameters(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


class Backbone:
    """Base class of backbone adapters. Subclasses fill ``towers`` and may override :meth:`library_heads`.

    Args:
        model: The library model.

    Attributes:
        model: The module that is adapted and carries the adapter state: the library model itself, or the task
            model holding it (after :meth:`bind_task`). Parameter names and ``owns`` predicates are relative to it.
        inner: The library model.
        call_inputs: Per-call inputs of the conditioning channel.
    """

    family: str = ""
    default_tower: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model
        self.towers: dict[str, Tower] = {}
        self.call_inputs = CallInputs()
        self._task_heads: dict[str, nn.Module | None] | None = None
        self._handles: list[RemovableHandle] = []
        self.modules_to_save: TargetSpec | None = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def bind_task(self, root: nn.Module, prefix: str, heads: dict[str, nn.Module | None]) -> None:
        """Makes this adapter of a library model describe the task model ``root`` that holds it.

        Args:
            root: The task model. prefix: Path of the library model in ``root`` plus a dot (``clip.``).
            heads: The task model's heads, name -> module.
        """
        self.model = root
        self._task_heads = dict(heads)
        for tower in self.towers.values():
            tower.owns = _within(prefix, tower.owns)
            if tower.condition is not None:
                tower.condition = _within(prefix, tower.condition)

    def tower(self, name: str | None) -> Tower:
        name = name or self.default_tower
        if name not in self.towers:
            raise IncompatibleMethodError(
                f"{self.family} has no '{name}' tower{did_you_mean(name, self.towers)}; "
                f"it has: {', '.join(self.towers)}"
            )
        return self.towers[name]

    # -- heads -----------------------------------------------------------------------------------------------
    def library_heads(self) -> dict[str, nn.Module | None]:
        """Heads the library model itself has (a timm classifier), name -> module."""
        return {}

    def set_heads(self, modules_to_save: TargetSpec) -> None:
        """Makes the modules ``modules_to_save`` selects (module-path suffixes or one regex, PEFT's rule) the heads
        that train in full with every method, instead of the library's convention; their canonical names are
        their module paths. ``[]`` means no head."""
        self.modules_to_save = list(modules_to_save) if not isinstance(modules_to_save, str) else modules_to_save
        found = []
        if modules_to_save:
            found = find_modules(list(library_modules(self.model)), modules_to_save, "modules_to_save")
        selected = {id(module): path for path, _, _, module in found}
        # a selected module inside another selected one is already trained with it
        nested = {id(m) for path, _, _, module in found for n, m in module.named_modules() if n and id(m) in selected}
        self._task_heads = {path: module for path, _, _, module in found if id(module) not in nested}

    def heads(self) -> dict[str, nn.Module]:
        """The task heads trained with every method (those with parameters), name -> module."""
        heads = self._task_heads if self._task_heads is not None else self.library_heads()
        return {name: head for name, head in heads.items() if _has_parameters(head)}

    def head_paths(self) -> dict[str, str]:
        """Head name -> module path of the head in :attr:`model`."""
        ids = {id(head): name for name, head in self.heads().items()}
        return {ids[id(module)]: path for path, module in self.model.named_modules() if id(module) in ids}

    # -- hooks the adapter keeps while methods are attached -----------------------------------------------------
    def install_hooks(self) -> None:
        """Starts recording the patch grid of every input (called when the first method is attached)."""
        for tower in self.towers.values():
            embed = tower.stages.get("embed")
            if tower.tokens is not None and embed is not None:
                self._handles.append(embed.register_forward_pre_hook(partial(self._record_grid, tower.name)))

    def _record_grid(self, tower: str, module: nn.Module, args: tuple) -> None:
        layout = self.towers[tower].tokens
        layout.input_grid = layout.image_grid(*args[0].shape[-2:])

    def release(self) -> None:
        """Undoes what the adapter changed in the model (its hooks; structure in subclasses); called when the last
        method is detached or merged."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for tower in self.towers.values():
            if tower.tokens is not None:
                tower.tokens.input_grid = None

    # -- features ----------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, indices: Sequence[int], tower: str | None = None) -> list[torch.Tensor]:
        """Patch-grid feature maps of chosen blocks on the grid of the actual input.

        Class, register and prompt tokens are dropped (patch tokens are always the last ``h * w`` tokens); the
        forward pass stops after the deepest chosen block.

        Args:
            x: Images (batch, channels, height, width).
            indices: Block indices, 0-based; negative ones count from the end.
            tower: A ViT-style tower; the main tower by default.

        Returns:
            One ``(batch, dim, h, w)`` map per index, in the order given.
        """
        t = self.tower(tower)
        if t.tokens is None or t.forward is None:
            raise IncompatibleMethodError(f"the {self.family} '{t.name}' tower has no patch-grid features")
        n = len(t.blocks)
        chosen = []
        for i in indices:
            if not -n <= i < n:
                raise ConfigError(f"block index {i} is out of range for the {n} blocks of the '{t.name}' tower")
            chosen.append(i % n)
        if not chosen:
            return []
        h, w = t.tokens.image_grid(*x.shape[-2:])
        captured: dict[int, torch.Tensor] = {}
        last = max(chosen)
        handles = [
            t.blocks[i].module.register_forward_hook(partial(_capture, captured, i, i == last)) for i in set(chosen)
        ]
        try:
            t.forward(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        maps = []
        for i in chosen:
            tokens = captured[i] if t.tokens.batch_first else captured[i].transpose(0, 1)
            patches = tokens[:, tokens.shape[1] - h * w :]
            maps.append(patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w))
        return maps

    # -- identity and file layouts -----------------------------------------------------------------------------
    def diffusers_lora_group(self, path: str) -> tuple[str, str] | None:
        """The (component, module path inside it) of a model-relative module path in diffusers' LoRA files
        (``unet`` / ``text_encoder``), or None when the model is no part of a Stable Diffusion pipeline."""
        return None

    def export_problem(self, path: str, format: str) -> str | None:
        """Why an update of the module at ``path`` cannot be written in another library's ``format`` for this model
        (that library would load it somewhere the model never uses), or None."""
        return None

    def diffusers_component(self, component: str) -> tuple[str, str] | None:
        """The (tower, model-relative path prefix) holding a component of diffusers' LoRA files (``unet``,
        ``text_encoder``), or None when this model has no such component."""
        return None

    def describe(self) -> dict:
        """Identity written into adapter checkpoints."""
        info = {
            "family": self.family,
            "class": type(self.model).__name__,
            "towers": {name: len(t.blocks) for name, t in self.towers.items()},
        }
        if self.modules_to_save is not None:
            info["modules_to_save"] = self.modules_to_save
        return info


def _capture(store: dict, index: int, stop: bool, module: nn.Module, args: tuple, output: Any) -> None:
    store[index] = output[0] if isinstance(output, tuple) else output
    if stop:
        raise _StopForward


def iter_block_projections(block: Block, targets: list[str]) -> Iterator[tuple[str, Projection]]:
    """Yields the projections of ``block`` selected by ``targets``.

    A target selects a projection whose canonical name equals it or ends with ``.target``: ``q`` selects
    ``attn.q`` (and both ``attn1.q`` and ``attn2.q`` in a U-Net), ``attn2.q`` only the cross-attention query.
    """
    for name, proj in block.projections.items():
        if any(name == t or name.endswith("." + t) for t in targets):
            yield name, proj
