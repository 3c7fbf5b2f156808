"""Backbone adapters: recognise a model and describe it as towers of blocks; the model-library table.

Names resolve lazily (PEP 562), so ``visionpeft.backbones.libraries`` (the table, torch-free) can be read by the
config layer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKBONES": "detect",
    "get_backbone": "detect",
    "GenericBackbone": "generic",
    "pipeline_modules": "diffusers_models",
    "Backbone": "base",
    "Block": "base",
    "Branch": "base",
    "Projection": "base",
    "TaskModel": "base",
    "TokenLayout": "base",
    "Tower": "base",
    "LIBRARIES": "libraries",
    "library": "libraries",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
