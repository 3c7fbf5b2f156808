"""visionpeft: parameter-efficient fine-tuning for timm ViT, open_clip CLIP and diffusers U-Net / DiT backbones.

Example:
    >>> import timm, visionpeft as vp
    >>> model = timm.create_model("vit_base_patch16_224", num_classes=100)
    >>> model = vp.attach(model, "vpt", num_tokens=10, deep=True)
    >>> vp.count_parameters(model)["by_group"]
    {'vpt': 92160, 'head': 76900}

The public names load on first use (PEP 562), so ``import visionpeft`` (and the command-line tools' argument and
config checking) cost almost nothing; torch loads with the first adapter call, timm / open_clip / diffusers when a
model of theirs is built.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .version import __version__

#: public name -> the module defining it
_EXPORTS = {
    **dict.fromkeys(
        (
            "attach",
            "attached_methods",
            "can_export",
            "can_merge",
            "conditioning",
            "count_parameters",
            "detach",
            "features",
            "merge",
            "set_train_mode",
            "trainable_buffers",
            "trainable_parameters",
        ),
        "adapter",
    ),
    **dict.fromkeys(("load_adapter", "save_adapter", "import_lora", "export_merged"), "checkpoint"),
    **dict.fromkeys(
        ("combine_adapters", "resize_lora", "extract_lora", "hotswap_adapter", "describe_adapter"), "arithmetic"
    ),
    "VisionPEFTError": "errors",
    "METHODS": "registry",
}
#: public submodules (``vp.segmentation.build``), imported on first use
_SUBMODULES = ("segmentation",)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule: vp.checkpoint, vp.metrics
        raise AttributeError(f"module 'visionpeft' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


def list_methods() -> list[str]:
    """Names of the registered methods."""
    from .methods import METHODS

    return METHODS.names()


__all__ = ["__version__", "list_methods", *_EXPORTS, *_SUBMODULES]
