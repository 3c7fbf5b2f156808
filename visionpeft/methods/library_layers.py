"""A model seen as its library built it, for the library's own copying code.

diffusers' ``ControlNetModel.from_unet`` copies the U-Net's encoder with ``load_state_dict(unet.down_blocks
.state_dict())``, and the Flux / SD3 ``from_transformer`` copy the transformer's blocks the same way (with
``strict=False``). A U-Net that carries a LoRA loaded by diffusers (PEFT's ``lora.Linear``: ``to_q.base_layer.weight``,
``to_q.lora_A.default_0.weight``), a visionpeft wrapper (``to_q.base.weight``) or a module a visionpeft method added
has other keys: ``from_unet`` fails, ``from_transformer`` silently leaves the wrapped layers at their random
initialisation. :func:`library_layers` puts the library's own layers back in place for the duration of a ``with``
block, so the copy holds the base weights, the ones a ControlNet built before the LoRA was attached would hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def _peft_tuner_layer() -> type | None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no PEFT installed: no PEFT layers either
        return None
    return BaseTunerLayer


def library_layer(module: nn.Module, peft_layer: type | None) -> nn.Module:
    """The library's layer under ``module``, looking through visionpeft wrappers (``.base``) and PEFT tuner layers
    (``.base_layer``), nested in any order."""
    while True:
        if getattr(module, "_vp_wrapper", False):
            module = module.base
        elif peft_layer is not None and isinstance(module, peft_layer):
            module = module.base_layer
        else:
            return module


@contextlib.contextmanager
def library_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every wrapper in ``model`` is replaced by the layer it wraps and every module a visionpeft
    method added is taken out; the model is put back as it was afterwards (the same modules, in the same order)."""
    peft_layer = _peft_tuner_layer()
    saved: list[tuple[nn.Module, dict[str, nn.Module | None]]] = []
    try:
        for parent in list(model.modules()):
            children = parent._modules
            plain = {
                name: library_layer(child, peft_layer) if child is not None else None
                for name, child in children.items()
                if child is None or not getattr(child, "_vp_owned", False)
            }
            if plain != children:
                saved.append((parent, dict(children)))
                children.clear()
                children.update(plain)
        yield model
    finally:
        for parent, children in reversed(saved):
            parent._modules.clear()
            parent._modules.update(children)
