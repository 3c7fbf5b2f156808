"""The project's own demo assets: what builds the embedded pretrained defaults, not what users train on.

* ``fractal``: FractalDB-style formula-driven images (the tiny ViT's pretraining data, dataset ``fractaldb``).
* ``captioned_mix``: captioned 32 px images (the tiny text-to-image pipeline's data, dataset ``captioned_mix``).
* ``tiny_sd_parts`` / ``pretrain_sd`` / ``tiny_sd_card``: the tiny text-to-image pipeline built from scratch
  (task ``pretrain_text_to_image``), its export and model card.
* ``clip_mix`` / ``pretrain_clip`` / ``tiny_clip_card``: the tiny CLIP's data (dataset ``clip_mix``: class names,
  held-out subjects and colour pairs), its pretraining from scratch (task ``pretrain_clip``), export and model card.
* ``judge``: the tiny pipeline's judge (a timm classifier rebuilt from its safetensors metadata, KID).

Importing the package registers its datasets (``visionpeft.registry.DATASETS`` imports it on first lookup).
"""

from __future__ import annotations

from . import captioned_mix, clip_mix, fractal  # noqa: F401  (registration)
