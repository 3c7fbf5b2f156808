"""Models of the library table (``libraries.py``): built from a config's ``model`` section, and asked what a
model's library says about it (how it reads images, which input size it takes).

Downloads go through the libraries' own loaders (timm / open_clip pretrained tags and transformers ids on the
Hugging Face hub). When they fail (no network, unknown tag) the error is one line saying how to point at a local
file instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from .libraries import LIBRARIES, DataConfig, Library, library
from .open_clip import create as create_open_clip
from .timm_models import create as create_timm

__all__ = [
    "create_library_model",
    "create_model",
    "create_open_clip",
    "create_timm",
    "data_config",
    "fixed_input_size",
    "library_of",
    "model_source",
    "recipe_head",
]


def model_source(cfg: Any) -> str:
    """What the weights of the model ``cfg`` names are, as adapter checkpoints and model cards record it: the local
    file, ``<name> (random init)``, or the library's hub id of the name (``timm/<name>``, ``<arch>/<tag>``)."""
    if cfg.checkpoint:
        return str(Path(cfg.checkpoint).expanduser().resolve())
    if not cfg.pretrained:
        return f"{cfg.name} (random init)"
    return library(cfg.library).hub_source.format(name=cfg.name, tag=getattr(cfg, "pretrained_tag", None))


def create_library_model(cfg: Any, num_classes: int = 0) -> nn.Module:
    """The model of ``cfg`` (a ``model`` section: ``library``, ``name``, weights) as its library builds it, with a
    ``num_classes`` classifier where the library has one (0: features only)."""
    return library(cfg.library).adapter_file().create(cfg, num_classes)


def create_model(cfg: Any, num_classes: int = 0) -> nn.Module:
    """:func:`create_library_model`, recording :func:`model_source` on the model (adapter checkpoints name it as
    the base weights)."""
    model = create_library_model(cfg, num_classes)
    model.__dict__["_visionpeft_source"] = model_source(cfg)
    return model


def _library_model(model: nn.Module) -> nn.Module:
    """The library model of a task model (``inner_model()``), or ``model`` itself."""
    inner = getattr(model, "inner_model", None)
    return inner() if callable(inner) else model


def library_of(model: Any) -> Library:
    """The table's entry of the library ``model`` (or the library model of a task model) comes from: the first
    whose package defines its class or one of whose model families matches it; ``generic`` for any other module."""
    model = _library_model(model)
    module = type(model).__module__
    for entry in LIBRARIES.values():
        package = entry.package
        if package and (module == package or module.startswith(package + ".")):
            return entry
        if isinstance(model, nn.Module) and any(cls.matches(model) for cls in entry.backbone_classes()):
            return entry
    return LIBRARIES["generic"]


def data_config(model: nn.Module) -> DataConfig:
    """How ``model`` (a library model or a task model holding one) reads images, as its library says."""
    inner = _library_model(model)
    return library_of(inner).adapter_file().data_config(inner)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) ``model`` (a library model or a task model holding one) requires, or None when it takes
    any size (a timm model built with ``dynamic_img_size``)."""
    inner = _library_model(model)
    return library_of(inner).adapter_file().fixed_input_size(inner)


def recipe_head(model: nn.Module, norm: str, init_std: float | None) -> None:
    """The classifier as a recipe asks: ``trunc_normal(init_std)`` weights and zero bias (MoCo v3 / AdaptFormer's
    ``main_image.py``), a ``BatchNorm1d(affine=False, eps=1e-6)`` in front (``norm="batchnorm"``, the same file)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        if norm != "none" or init_std is not None:
            raise ConfigError(
                f"model.head_norm / model.head_init_std need a linear classifier 'head'; "
                f"{type(model).__name__} has {type(head).__name__}"
            )
        return
    if init_std is not None:
        from timm.layers import trunc_normal_

        trunc_normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
    if norm == "batchnorm":
        model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
