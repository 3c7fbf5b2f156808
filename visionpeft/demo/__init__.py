"""The project's own demo assets: what builds the embedded pretrained defaults, not what users train on.

* ``fractal``: FractalDB-style formula-driven images (the tiny ViT's pretraining data, dataset ``fractaldb``).
* ``captioned_mix``: captioned 32 px images (the tiny text-to-image pipeline's data, dataset ``captioned_mix``).
* ``pretrain_text_to_image``: the task ``pretrain_text_to_image``'s entry point (the pipeline of ``model.family``).
* ``tiny_sd_parts`` / ``pretrain_sd`` / ``tiny_sd_card``: the tiny text-to-image pipeline built from scratch, its
  export and model card.
* ``tiny_image_encoder``: the tiny CLIP's image tower as a transformers ``CLIPVisionModelWithProjection`` (the
  IP-Adapter demo's image encoder).
* ``tiny_flux_parts`` / ``pretrain_flux`` / ``tiny_flux_card``: the tiny Flux-layout pipeline (the same task with
  ``model.family: flux``: tiny_sd's VAE and CLIP, a new T5 and Flux transformer on the flow-matching loss; the
  offline T5 tokenizer and FLUX.1-dev's scheduler config), its export and model card.
* ``clip_mix`` / ``pretrain_clip`` / ``tiny_clip_card``: the tiny CLIP's data (dataset ``clip_mix``: class names,
  held-out subjects and colour pairs), its pretraining from scratch (task ``pretrain_clip``), export and model card.
* ``judge``: the tiny pipeline's judge (a timm classifier rebuilt from its safetensors metadata, KID).

Importing the package registers its datasets (``visionpeft.registry.DATASETS`` imports it on first lookup).
"""

from __future__ import annotations

from . import captioned_mix, clip_mix, fractal  # noqa: F401  (registration)
