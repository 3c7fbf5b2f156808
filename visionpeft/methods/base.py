"""The method interface: a config dataclass plus a :class:`Method` that attaches to a backbone.

A method owns everything it adds (modules, forward hooks, wrappers) and records the tensors it trains under
canonical names (``blocks.3.attn.q.lora_A``), so checkpoints say what they change and not where a library keeps
it. Parameters of the backbone itself that a method trains in place (BitFit's biases, DiffFit's norms) are named
``base.<module path>`` and their original values are kept so that ``detach`` can restore the model exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..backbones.base import Backbone, Block, Tower
from ..errors import IncompatibleMethodError


@dataclass
class MethodConfig:
    """Options shared by every method.

    Attributes:
        tower: Which tower to adapt (``vision``/``text`` on CLIP); None means the backbone's main tower.
    """

    tower: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def named_base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yields ``(name, owner, attr)`` for the model's own parameters, as named before visionpeft touched it.

    Modules added by methods are skipped and wrappers are looked through (``qkv.base.weight`` is ``qkv.weight``).
    """
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str]]:
        for attr, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield prefix + attr, module, attr
        wrapper = getattr(module, "_vp_wrapper", False)
        for child_name, child in module._modules.items():
            if child is None or getattr(child, "_vp_owned", False) or (wrapper and child_name != "base"):
                continue
            yield from walk(child, prefix if wrapper else f"{prefix}{child_name}.")

    yield from walk(model, "")


def branch_tensor(output: Any) -> torch.Tensor:
    """The tensor of a branch output (``nn.MultiheadAttention`` returns ``(output, weights)``)."""
    return output[0] if isinstance(output, tuple) else output


def replace_branch_tensor(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class Method:
    """Base class of methods. Subclasses set the class attributes and implement :meth:`build`.

    Args:
        config: The method's config dataclass.
        backbone: The backbone adapter of the model.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: The paper keeps the frozen backbone in eval mode during training (VPT).
    frozen_eval: ClassVar[bool] = False
    #: Merge order among mergeable methods: additive weight updates (0) fold in before output scales (1).
    merge_priority: ClassVar[int | None] = None
    #: Needs a ViT-style token sequence (prefix tokens + patch grid).
    needs_tokens: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, backbone: Backbone) -> None:
        self.config = config
        self.backbone = backbone
        try:
            self.tower: Tower = backbone.tower(config.tower)
        except IncompatibleMethodError as err:
            raise IncompatibleMethodError(f"{self.name} cannot attach to this model: {err}") from None
        self.tensors: dict[str, tuple[nn.Module, str]] = {}
        self._hooks: list[RemovableHandle] = []
        self._added: list[tuple[nn.Module, str]] = []
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._originals: dict[str, torch.Tensor] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------
    def check_fits(self) -> None:
        """Raises :class:`IncompatibleMethodError` if the method cannot adapt this tower."""
        if self.needs_tokens and self.tower.tokens is None:
            raise IncompatibleMethodError(
                f"{self.name} needs a ViT-style token sequence with a patch grid; the {self.backbone.family} "
                f"'{self.tower.name}' tower has none"
            )

    def build(self) -> None:
        """Adds the method's modules and hooks. Called once by :meth:`attach`."""
        raise NotImplementedError

    def attach(self) -> None:
        self.check_fits()
        self.build()

    def detach(self) -> None:
        """Removes everything the method added and restores the backbone tensors it trained in place."""
        for handle in reversed(self._hooks):
            handle.remove()
        for parent, attr, original in reversed(self._wrapped):
            setattr(parent, attr, original)
        for parent, attr in reversed(self._added):
            delattr(parent, attr)
        with torch.no_grad():
            for name, original in self._originals.items():
                module, attr = self.tensors[name]
                getattr(module, attr).copy_(original)
        self._hooks, self._wrapped, self._added, self._originals = [], [], [], {}
        self.tensors = {}

    def merge(self) -> None:
        """Folds the method into the backbone weights; afterwards :meth:`forget` drops it."""
        raise IncompatibleMethodError(f"{self.name} cannot be merged into the backbone weights exactly")

    def forget(self) -> None:
        """Drops the method's bookkeeping without undoing its effect on the weights (after a merge)."""
        for handle in self._hooks:
            handle.remove()
        for parent, attr, _ in self._wrapped:
            wrapper = getattr(parent, attr)
            setattr(parent, attr, wrapper.base)
        for parent, attr in self._added:
            delattr(parent, attr)
        self._hooks, self._wrapped, self._added, self._originals, self.tensors = [], [], [], {}, {}

    # -- tensors ---------------------------------------------------------------------------------------------
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, (module, attr) in self.tensors.items():
            yield name, getattr(module, attr)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, tensor in self.named_tensors():
            yield tensor

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    # -- helpers for subclasses ------------------------------------------------------------------------------
    def add_module(self, parent: nn.Module, canonical: str, module: nn.Module) -> nn.Module:
        """Registers a new trainable module under ``parent`` and its parameters under ``canonical``."""
        attr = f"vp_{self.name}_{len(self._added)}"
        module._vp_owned = True
        ref = next((p for p in parent.parameters()), None)
        if ref is not None:
            module.to(device=ref.device, dtype=ref.dtype)
        module.train(parent.training)
        parent.add_module(attr, module)
        self._added.append((parent, attr))
        self._register_module_tensors(canonical, module)
        return module

    def _register_module_tensors(self, canonical: str, module: nn.Module) -> None:
        for pname, _ in module.named_parameters():
            owner_path, _, attr = pname.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            self.tensors[f"{canonical}.{pname}"] = (owner, attr)

    def wrap(self, parent: nn.Module, attr: str, wrapper: nn.Module, canonical_of: Callable[[str], str]) -> None:
        """Replaces ``parent.attr`` by ``wrapper`` (which keeps the original as ``wrapper.base``)."""
        original = getattr(parent, attr)
        wrapper.train(original.training)
        setattr(parent, attr, wrapper)
        self._wrapped.append((parent, attr, original))
        for pname, _ in wrapper.named_parameters():
            if pname.startswith("base."):
                continue
            owner_path, _, pattr = pname.rpartition(".")
            self.tensors[canonical_of(pname)] = (wrapper.get_submodule(owner_path), pattr)

    def train_in_place(self, name: str, owner: nn.Module, attr: str) -> None:
        """Marks a backbone parameter as trained by this method, keeping its original value for detach."""
        canonical = f"base.{name}"
        if canonical in self.tensors:
            return
        self.tensors[canonical] = (owner, attr)
        self._originals[canonical] = getattr(owner, attr).detach().clone()

    def tower_parameters(self) -> Iterator[tuple[str, nn.Module, str]]:
        """The tower's own parameters, excluding the head's."""
        head = self.backbone.head()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        for name, owner, attr in named_base_parameters(self.backbone.model):
            if self.tower.owns(name) and id(getattr(owner, attr)) not in head_ids:
                yield name, owner, attr

    def hook_output(self, module: nn.Module, fn: Callable, *args: Any) -> None:
        """Registers ``fn(*args, module, inputs, output)`` as a forward hook (kept picklable and copyable)."""
        self._hooks.append(module.register_forward_hook(partial(fn, *args)))

    def hook_input(self, module: nn.Module, fn: Callable, *args: Any) -> None:
        self._hooks.append(module.register_forward_pre_hook(partial(fn, *args)))

    def blocks(self) -> list[Block]:
        return self.tower.blocks
