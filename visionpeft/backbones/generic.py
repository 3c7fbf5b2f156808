"""Any other torch model (Hugging Face transformers ViT / DeiT / DINOv2 / SigLIP, timm Swin / ConvNeXt / ResNet,
a user's own network; timm EVA has its own token tower, ``timm_eva.py``): one tower ``model`` with no described
blocks, adapted by module path.

Methods that only need projections, biases or heads (LoRA / DoRA with ``target_modules``, BitFit, full, linear
probe) select library modules with PEFT's ``target_modules`` rule (:func:`matches_target`); methods that need a
token sequence (VPT, AdaptFormer, Convpass) find no ``tokens`` capability and say so in one line. Canonical checkpoint
names of what they add are module paths (``vit.encoder.layer.0.attention.attention.query.lora_A``), and heads are
found by the libraries' conventions (timm ``get_classifier()``, transformers ``classifier``) unless the user names
them (``vp.attach(..., modules_to_save=[...])``).

As the ``generic`` entry of the library table, a model is made by a callable named ``package.module:function``
(``model.name``), called with ``num_classes`` and ``model.kwargs``; it reads images with ImageNet's statistics.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import Backbone, Tower
from .libraries import DataConfig
from .weights_files import load_state, read_state_dict


def conventional_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier heads of a library model by its library's convention, module path -> module: timm's
    ``get_classifier()`` (Swin / ConvNeXt ``head.fc``, ResNet ``fc``, EVA ``head``), transformers' ``classifier``
    (``ViTForImageClassification`` and the other ``*ForImageClassification`` models)."""
    found: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except (AttributeError, TypeError, NotImplementedError):
            head = None
        found = list(head) if isinstance(head, tuple) else [head]
    elif isinstance(getattr(model, "classifier", None), nn.Module):
        found = [model.classifier]
    paths = {id(module): path for path, module in model.named_modules() if path}
    return {paths[id(m)]: m for m in found if isinstance(m, nn.Module) and id(m) in paths}


class GenericBackbone(Backbone):
    """Adapter of any ``nn.Module`` no specific family recognises: one tower ``model`` owning every parameter but
    the heads', no blocks, no token layout."""

    family = "generic"
    default_tower = "model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.towers["model"] = Tower("model", "", [], lambda name: True)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def library_heads(self) -> dict[str, nn.Module | None]:
        return dict(conventional_heads(self.inner))

    def describe(self) -> dict:
        info = super().describe()
        info["module"] = type(self.inner).__module__
        return info


# -- the library table's functions -------------------------------------------------------------------------------
def create(cfg: Any, num_classes: int) -> nn.Module:
    """The module the callable ``cfg.name`` (``package.module:function``) returns for ``num_classes`` (left out
    when 0) and ``model.kwargs``, with the weights of ``model.checkpoint`` if set (a head of another size keeps its
    init)."""
    module_name, _, function = cfg.name.partition(":")
    if not module_name or not function:
        raise ConfigError(f"model.name '{cfg.name}' must name a callable as package.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"model.name '{cfg.name}' cannot be imported: {str(err).splitlines()[0][:160]}") from None
    kwargs = {**cfg.kwargs, **({"num_classes": num_classes} if num_classes else {})}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name '{cfg.name}' returned a {type(model).__name__}, not a torch module")
    if cfg.checkpoint:
        head = next(iter(conventional_heads(model)), None)
        load_state(model, read_state_dict(cfg.checkpoint), cfg.checkpoint, head=f"{head}." if head else None)
    return model


def data_config(model: nn.Module) -> DataConfig:
    """ImageNet's statistics, crop 0.875, bilinear (nothing says otherwise)."""
    return DataConfig()


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """None: nothing says the model takes only one size."""
    return None
