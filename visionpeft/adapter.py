"""attach / detach / merge and the bookkeeping that makes them exact; what an adapted model can do (merge,
export), its trained buffers, patch-grid features and the conditioning channel.

The state of an adapted model (its backbone adapter, the attached methods, the ``requires_grad`` flags it had
before) lives in a plain attribute of the model, so it follows the model through ``copy.deepcopy``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, get_backbone, pipeline_modules
from .errors import CheckpointError, ConfigError, IncompatibleMethodError
from .methods import METHODS, Method, MethodConfig, make_config
from .methods.base import named_base_parameters, named_persistent_buffers, registered_method_of

_STATE = "_visionpeft_state"

MethodSpec = str | tuple[str, dict[str, Any] | MethodConfig] | MethodConfig


@dataclass
class AdapterState:
    """What visionpeft keeps on an adapted model."""

    backbone: Backbone
    methods: list[Method] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    head_original: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _state(model: nn.Module) -> AdapterState | None:
    return model.__dict__.get(_STATE)


def unwrap(model: Any) -> nn.Module:
    """Diffusers pipelines are adapted through their U-Net + text encoder (or DiT transformer)."""
    if isinstance(model, nn.Module):
        return model
    return pipeline_modules(model)


def _normalize(methods: MethodSpec | Sequence[MethodSpec], options: dict[str, Any]) -> list[tuple[str, MethodConfig]]:
    if isinstance(methods, (str, MethodConfig, tuple)):
        methods = [methods]
    elif options:
        raise ConfigError("keyword options apply to a single method; give a hybrid as [(name, options), ...]")
    specs = []
    for spec in methods:
        if isinstance(spec, str):
            name, opts = spec, options
        elif isinstance(spec, MethodConfig):
            name = registered_method_of(type(spec))
            if name is None:
                raise ConfigError(f"{type(spec).__name__} is not the config of a registered method")
            opts = spec
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
            name, opts = spec
        else:
            raise ConfigError(f"a method is a name, a (name, options) pair or a method config, got {spec!r}")
        specs.append((name, make_config(name, opts)))
    return specs


def attach(
    model: Any,
    methods: MethodSpec | Sequence[MethodSpec],
    modules_to_save: str | Sequence[str] | None = None,
    **options: Any,
) -> Any:
    """Attaches one method, or several in order (a hybrid), to a supported backbone.

    The backbone is frozen; the method's parameters and the task heads (if the model has any) are trainable.

    Args:
        model: A timm VisionTransformer, an open_clip CLIP, a diffusers UNet2DConditionModel /
            DiTTransformer2DModel, a diffusers pipeline (its U-Net / transformer is adapted), or a task model
            holding one of those (``backbones.TaskModel``: its library model is adapted, its heads train).
        methods: A method name, a ``(name, options)`` pair, a method config, or a list of those.
        modules_to_save: The task heads, trained in full with every method, as module paths (suffixes or one
            regex, PEFT's rule; ``[]``: none), instead of the library's convention (timm ``get_classifier()``,
            transformers ``classifier``, a task model's heads). Fixed by the first ``attach``.
        **options: Options of a single method given by name.

    Returns:
        The same model, adapted in place.

    Raises:
        UnsupportedBackboneError: The model is not a supported backbone.
        ConfigError: Unknown method or option, a bad value, or a method attached twice to one tower.
        IncompatibleMethodError: The method does not fit the backbone.
    """
    target = unwrap(model)
    specs = _normalize(methods, options)
    state = _state(target)
    fresh = state is None
    if fresh:
        state = AdapterState(get_backbone(target))
        if modules_to_save is not None:
            state.backbone.set_heads(modules_to_save)
        state.requires_grad = {name: getattr(o, a).requires_grad for name, o, a in named_base_parameters(target)}
        for name, head in state.backbone.heads().items():  # heads train with every method; detach restores them
            state.head_original[name] = {k: v.detach().clone() for k, v in head.state_dict().items()}
            head._vp_head = True
        state.backbone.install_hooks()
    elif modules_to_save is not None and _as_spec(modules_to_save) != state.backbone.modules_to_save:
        raise ConfigError("modules_to_save is fixed when the first method is attached; detach to change the heads")
    added: list[Method] = []
    try:
        for name, config in specs:
            method = METHODS.get(name)(config, state.backbone)
            taken = {other.key for other in state.methods + added if other.tower is method.tower}
            if name in taken and not method.several:
                raise ConfigError(f"{name} is already attached to the '{method.tower.name}' tower")
            method.key = _free_key(name, taken)
            try:
                method.attach()
            except BaseException:
                method.detach()
                raise
            added.append(method)
    except BaseException:
        for method in reversed(added):
            method.detach()
        if fresh:
            _release(state)
        raise
    state.methods.extend(added)
    if fresh:
        target.__dict__[_STATE] = state
    apply_requires_grad(target, state)
    return model


def _free_key(name: str, taken: set[str]) -> str:
    """``name``, or the first of ``name_1``, ``name_2``, ... that no method on the tower goes by."""
    key, number = name, 0
    while key in taken:
        number += 1
        key = f"{name}_{number}"
    return key


def _as_spec(spec: str | Sequence[str]) -> str | list[str]:
    return spec if isinstance(spec, str) else list(spec)


def _release(state: AdapterState) -> None:
    for head in state.backbone.heads().values():
        head.__dict__.pop("_vp_head", None)
    state.backbone.release()


def apply_requires_grad(model: nn.Module, state: AdapterState) -> None:
    model.requires_grad_(False)
    for head in state.backbone.heads().values():
        head.requires_grad_(True)
    for method in state.methods:
        for param in method.parameters():
            param.requires_grad_(True)


def _restore_requires_grad(model: nn.Module, state: AdapterState) -> None:
    for name, owner, attr in named_base_parameters(model):
        getattr(owner, attr).requires_grad_(state.requires_grad.get(name, True))


def require_state(model: nn.Module) -> AdapterState:
    state = _state(model)
    if state is None:
        raise ConfigError("no visionpeft method is attached to this model")
    return state


def detach(model: Any) -> Any:
    """Removes every attached method and restores the original weights, flags and outputs exactly."""
    target = unwrap(model)
    state = require_state(target)
    for method in reversed(state.methods):
        method.detach()
    for name, head in state.backbone.heads().items():
        if name in state.head_original:
            head.load_state_dict(state.head_original[name])
    _restore_requires_grad(target, state)
    _release(state)
    del target.__dict__[_STATE]
    return model


def merge(model: Any, methods: Sequence[str] | None = None) -> Any:
    """Folds methods into the backbone weights and unloads them ("merge and unload").

    Only exact merges are done: LoRA (``W += alpha/r B A``), DiffFit (gamma into the branch's output projection),
    and the in-place baselines (already in the weights). Prompt and adapter methods change the computation, not
    a weight, so merging them is an error.

    Args:
        model: An adapted model.
        methods: Names of the methods to merge; all attached methods by default.

    Raises:
        IncompatibleMethodError: A selected method cannot be merged exactly (nothing is changed then).
    """
    target = unwrap(model)
    state = require_state(target)
    chosen = [m for m in state.methods if methods is None or m.name in methods]
    blocked = [m.name for m in chosen if not m.merges_exactly]
    if blocked:
        raise IncompatibleMethodError(
            f"{', '.join(blocked)} cannot be merged into the weights exactly (they add tokens or non-linear "
            "modules); merge the others with merge(model, methods=[...])"
        )
    carried = _hooks_on_removed_wrappers(chosen, [m for m in state.methods if m not in chosen])
    if carried:
        raise IncompatibleMethodError(
            f"{carried[1]} hooks a layer that {carried[0]} wraps, so merging {carried[0]} alone would drop "
            f"{carried[1]}'s effect; merge them together: merge(model, methods=[{carried[0]!r}, {carried[1]!r}])"
        )
    for method in sorted(chosen, key=lambda m: m.merge_priority):
        method.merge()
        method.forget()
    state.methods = [m for m in state.methods if m not in chosen]
    if state.methods:
        apply_requires_grad(target, state)
    else:
        _restore_requires_grad(target, state)
        _release(state)
        del target.__dict__[_STATE]
    return model


def _hooks_on_removed_wrappers(merged: list, kept: list) -> tuple[str, str] | None:
    """``(merged method, kept method)`` when a kept method's hook sits on a wrapper a merged method removes (an SSF
    or IA3 scale attached after a LoRA hooks the LoRA layer): that hook would go with the wrapper."""
    for method in merged:
        for wrapper in method.placed_wrappers():
            for other in kept:
                if other.hooks_module(wrapper):
                    return method.name, other.name
    return None


def attached_methods(model: Any) -> list[tuple[str, MethodConfig]]:
    """The attached methods in attach order, as ``(name, config)``."""
    state = _state(unwrap(model))
    return [(m.name, m.config) for m in state.methods] if state else []


def trainable_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter: what the optimizer should receive."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def count_parameters(model: Any) -> dict[str, Any]:
    """Counts parameters.

    Returns:
        ``{"total": int, "trainable": int, "by_group": {method key: int, ..., "head": int}}`` (a group per task
        head; a method's key is its name, ``controlnet_1`` for a second ControlNet); a parameter claimed by
        several methods (BitFit and DiffFit both train biases) counts for the first.
    """
    target = unwrap(model)
    params = list(target.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    by_group: dict[str, int] = {}
    state = _state(target)
    if state is not None:
        seen: set[int] = set()
        for method in state.methods:
            count = 0
            for p in method.parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    count += p.numel()
            by_group[method.key] = by_group.get(method.key, 0) + count
        for name, head in state.backbone.heads().items():
            by_group[name] = sum(p.numel() for p in head.parameters() if id(p) not in seen and p.requires_grad)
    return {"total": total, "trainable": trainable, "by_group": by_group}


def set_train_mode(model: Any, mode: bool = True) -> Any:
    """Like ``model.train(mode)``, but keeps the frozen backbone in eval mode when a method's paper does (VPT).

    Method modules (prompts, adapters, LoRA dropout) and the head follow ``mode``.
    """
    target = unwrap(model)
    target.train(mode)
    state = _state(target)
    if not mode or state is None or not any(m.frozen_eval for m in state.methods):
        return model
    keep: set[int] = set()
    roots = list(state.backbone.heads().values())
    for module in target.modules():
        if getattr(module, "_vp_owned", False):
            roots.append(module)
        elif getattr(module, "_vp_wrapper", False):
            roots.extend(child for name, child in module.named_children() if name != "base")
    for root in roots:
        keep.update(id(m) for m in root.modules())
    for module in target.modules():
        if id(module) not in keep:
            module.training = False
    return model


def can_merge(model: Any) -> bool:
    """Whether :func:`merge` can fold every attached method into the weights (each one merges exactly)."""
    methods = methods_of(model)
    return bool(methods) and all(m.merges_exactly for m in methods)


def can_export(model: Any, format: str) -> bool:
    """Whether ``save_adapter(model, ..., format=format)`` can write the attached methods: every one lists the
    format and at least one contributes to it (a linear probe alone makes no diffusers file)."""
    methods = methods_of(model)
    if not methods:
        return False
    if format == "visionpeft":
        return True
    if any(format not in m.export_formats for m in methods):
        return False
    if format == "kohya" and getattr(backbone_of(model), "kohya_refusal", None) is not None:
        return False  # a family with no kohya file diffusers loads (SD3)
    try:
        return any(m.export_parts(format).contributes for m in methods)
    except CheckpointError:
        return False


def trainable_buffers(model: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, buffer)`` of the persistent buffers that train with the methods: those of modules and towers the
    methods added and of the task heads (a BatchNorm's running statistics), named relative to ``model``, which may
    be any module holding the adapted model."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for path, module in unwrap(model).named_modules():
        if getattr(module, "_vp_owned", False) or getattr(module, "_vp_head", False):
            for name, owner, attr in named_persistent_buffers(module):
                buffer = owner._buffers[attr]
                if id(buffer) not in seen:
                    seen.add(id(buffer))
                    found.append((f"{path}.{name}" if path else name, buffer))
    return found


def features(model: Any, x: torch.Tensor, indices: Sequence[int], tower: str | None = None) -> list[torch.Tensor]:
    """Patch-grid feature maps ``(batch, dim, h, w)`` of the chosen blocks on the grid of the actual input, class /
    register / prompt tokens removed; with or without methods attached (see :meth:`Backbone.features`)."""
    return backbone_of(model).features(x, indices, tower)


@contextlib.contextmanager
def conditioning(model: Any, **inputs: Any) -> Iterator[Any]:
    """Makes per-call inputs (a control image) available to the attached methods that read them, for the forward
    passes inside the ``with`` block; they are cleared afterwards.

    Example:
        >>> with vp.conditioning(model, control_image=edges):
        ...     out = model(noisy, t, text)

    Args:
        model: An adapted model, a pipeline or task model, or any module holding adapted models.
        **inputs: Name -> value; each name must be read by some attached method (its ``call_inputs``). A dict
            value gives each method its own, by its key (``control_image={"controlnet": edges, "t2i_adapter":
            depth}``; a second ControlNet is ``controlnet_1``: :attr:`Method.key`).

    Raises:
        ConfigError: No method is attached, or no attached method reads one of the inputs.
    """
    root = unwrap(model)
    states = {id(s): s for m in root.modules() if (s := _state(m)) is not None}
    if not states:
        raise ConfigError("no visionpeft method is attached to this model")
    declared = sorted({k for s in states.values() for m in s.methods for k in m.call_inputs})
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        reads = ", ".join(declared) or "none"
        raise ConfigError(f"no attached method reads a per-call {unknown[0]} (the per-call inputs they read: {reads})")
    for key, value in inputs.items():
        if isinstance(value, dict):  # one value per method name
            readers = sorted({m.key for s in states.values() for m in s.methods if key in m.call_inputs})
            stray = sorted(set(value) - set(readers))
            if stray:
                raise ConfigError(
                    f"vp.conditioning's {key} names {stray[0]}, which is not an attached method that "
                    f"reads it ({', '.join(readers)} do)"
                )
    saved = [(s.backbone.call_inputs, dict(s.backbone.call_inputs)) for s in states.values()]
    for channel, _ in saved:
        channel.update(inputs)
    try:
        yield model
    finally:
        for channel, previous in saved:
            channel.clear()
            channel.update(previous)


def backbone_of(model: Any) -> Backbone:
    """The backbone adapter of an adapted model (or a fresh one for a plain model)."""
    target = unwrap(model)
    state = _state(target)
    return state.backbone if state is not None else get_backbone(target)


def methods_of(model: Any) -> list[Method]:
    state = _state(unwrap(model))
    return list(state.methods) if state else []


__all__ = [
    "attach",
    "attached_methods",
    "backbone_of",
    "can_export",
    "can_merge",
    "conditioning",
    "count_parameters",
    "detach",
    "features",
    "merge",
    "methods_of",
    "set_train_mode",
    "trainable_buffers",
    "trainable_parameters",
    "IncompatibleMethodError",
]
