"""Adapter arithmetic on saved or loaded LoRA adapters.

* ``combine``: :func:`combine_adapters`, weighted combinations of adapters of one base (PEFT's
  ``add_weighted_adapter``: ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune`` and the ``*_svd`` variants).
* ``resize``: :func:`resize_lora`, a LoRA truncated by SVD to a rank or a kept fraction of energy (sd-scripts).
* ``extract``: :func:`extract_lora`, a LoRA of a fine-tuned model's difference to its base (sd-scripts).
* ``hotswap``: :func:`hotswap_adapter`, another adapter's weights copied into a loaded one in place.
* ``describe``: :func:`describe_adapter`, what a saved folder holds (``visionpeft adapters inspect``).
* ``records``: adapters as folders or loaded models read them, and the results (:class:`AdapterResult`);
  ``lowrank``: the truncated SVD they share.
"""

from __future__ import annotations

from .combine import COMBINATIONS, combine_adapters
from .describe import describe_adapter
from .extract import extract_lora
from .hotswap import hotswap_adapter
from .records import AdapterResult, LayerFit
from .resize import resize_lora

__all__ = [
    "COMBINATIONS",
    "AdapterResult",
    "LayerFit",
    "combine_adapters",
    "describe_adapter",
    "extract_lora",
    "hotswap_adapter",
    "resize_lora",
]
