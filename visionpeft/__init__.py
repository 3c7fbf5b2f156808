"""visionpeft: parameter-efficient fine-tuning for timm ViT, open_clip CLIP and diffusers U-Net / DiT backbones.

Example:
    >>> import timm, visionpeft as vp
    >>> model = timm.create_model("vit_base_patch16_224", num_classes=100)
    >>> model = vp.attach(model, "vpt", num_tokens=10, deep=True)
    >>> vp.count_parameters(model)["by_group"]
    {'vpt': 92160, 'head': 76900}
"""

from .adapter import (
    attach,
    attached_methods,
    can_export,
    can_merge,
    conditioning,
    count_parameters,
    detach,
    features,
    merge,
    set_train_mode,
    trainable_buffers,
    trainable_parameters,
)
from .checkpoint import load_adapter, save_adapter
from .errors import VisionPEFTError
from .registry import METHODS
from .version import __version__


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


__all__ = [
    "VisionPEFTError",
    "__version__",
    "attach",
    "attached_methods",
    "can_export",
    "can_merge",
    "conditioning",
    "count_parameters",
    "detach",
    "features",
    "list_methods",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_train_mode",
    "trainable_buffers",
    "trainable_parameters",
]
