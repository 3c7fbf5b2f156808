"""Dataset builders, registered by name in ``visionpeft.registry.DATASETS``.

A builder is ``fn(split, root=None, transform=None, **options) -> Dataset`` whose items are
``(transformed image, label)`` and which has ``classes``.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import cifar, imagefolder, vtab  # noqa: F401  (registration)

# Further builders (the embedded demo's tasks, ...) register themselves when their module is imported.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("cifar", "imagefolder", "vtab", "transforms", "fewshot", "few_images", "clip_vocab"):
        importlib.import_module(f"{__name__}.{_module.name}")
