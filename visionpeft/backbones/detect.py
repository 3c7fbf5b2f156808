"""Which backbone adapter describes a model: the model families of the library table's entries, in order."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedBackboneError
from .base import Backbone, TaskModel
from .libraries import LIBRARIES

#: Every family's adapter, in the table's order (``GenericBackbone``, which takes any module, last).
BACKBONES: list[type[Backbone]] = [cls for entry in LIBRARIES.values() for cls in entry.backbone_classes()]


def _library_backbone(model: nn.Module) -> Backbone:
    for cls in BACKBONES:
        if cls.matches(model):
            try:
                return cls(model)
            except TypeError as err:
                raise UnsupportedBackboneError(f"{type(model).__name__}: {err}") from None
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
