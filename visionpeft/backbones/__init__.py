"""Backbone adapters: recognise a model and describe it as towers of blocks."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedBackboneError
from .base import Backbone, Block, Branch, Projection, TokenLayout, Tower
from .diffusers_models import DiffusersDiT, DiffusersPipeline, DiffusersUNet, pipeline_modules
from .open_clip import OpenCLIP
from .timm_vit import TimmViT

BACKBONES: list[type[Backbone]] = [TimmViT, OpenCLIP, DiffusersUNet, DiffusersDiT, DiffusersPipeline]


def get_backbone(model: nn.Module) -> Backbone:
    """Returns the adapter describing ``model``.

    Raises:
        UnsupportedBackboneError: For any object that is not a supported model.
    """
    for cls in BACKBONES:
        if cls.matches(model):
            try:
                return cls(model)
            except TypeError as err:
                raise UnsupportedBackboneError(f"{type(model).__name__}: {err}") from None
    raise UnsupportedBackboneError(
        f"visionpeft cannot adapt a {type(model).__module__}.{type(model).__name__}; supported: timm "
        "VisionTransformer, open_clip CLIP, diffusers UNet2DConditionModel / DiTTransformer2DModel (or a pipeline)"
    )


__all__ = [
    "BACKBONES",
    "pipeline_modules",
    "Backbone",
    "Block",
    "Branch",
    "Projection",
    "TokenLayout",
    "Tower",
    "get_backbone",
]
