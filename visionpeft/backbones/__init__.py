"""Backbone adapters: recognise a model and describe it as towers of blocks."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedBackboneError
from .base import Backbone, Block, Branch, Projection, TaskModel, TokenLayout, Tower
from .diffusers_models import DiffusersDiT, DiffusersPipeline, DiffusersUNet, pipeline_modules
from .generic import GenericBackbone
from .open_clip import OpenCLIP
from .timm_eva import TimmEva
from .timm_vit import TimmViT

BACKBONES: list[type[Backbone]] = [TimmViT, TimmEva, OpenCLIP, DiffusersUNet, DiffusersDiT, DiffusersPipeline]


def _library_backbone(model: nn.Module) -> Backbone:
    for cls in BACKBONES:
        if cls.matches(model):
            try:
                return cls(model)
            except TypeError as err:
                raise UnsupportedBackboneError(f"{type(model).__name__}: {err}") from None
    if GenericBackbone.matches(model):  # any other torch model: adapted by module path
        return GenericBackbone(model)
    raise UnsupportedBackboneError(
        f"visionpeft cannot adapt a {type(model).__module__}.{type(model).__name__}; it adapts torch modules "
        "(timm, open_clip, transformers, diffusers models or pipelines, any nn.Module by module path)"
    )


def get_backbone(model: nn.Module) -> Backbone:
    """Returns the adapter describing ``model``: a library model, or a task model (:class:`TaskModel`) whose
    library model is described with names relative to the task model and whose heads are the task's.

    Raises:
        UnsupportedBackboneError: For any object that is not a supported model.
    """
    if isinstance(model, nn.Module) and isinstance(model, TaskModel):
        inner = model.inner_model()
        path = next((name for name, m in model.named_modules() if m is inner and name), None)
        if path is None:
            raise UnsupportedBackboneError(
                f"{type(model).__name__}.inner_model() must return one of its submodules, got {type(inner).__name__}"
            )
        backbone = _library_backbone(inner)
        backbone.bind_task(model, path + ".", model.task_heads())
        return backbone
    return _library_backbone(model)


__all__ = [
    "BACKBONES",
    "GenericBackbone",
    "pipeline_modules",
    "Backbone",
    "Block",
    "Branch",
    "Projection",
    "TaskModel",
    "TokenLayout",
    "Tower",
    "get_backbone",
]
