"""The image encoder of the tiny IP-Adapter demo: a small ``CLIPVisionModelWithProjection`` with random weights.

The embedded pipeline (``checkpoints/tiny_sd``, 32 px) has no CLIP image tower trained with it, and the IP-Adapter
trainer needs one in transformers' layout (what ``pipe.load_ip_adapter`` loads). This encoder is built from a config
with seeded random weights: a fixed random feature map of the image, enough to carry which image it was (layout,
colours), not what it shows in CLIP's sense. ``python -m visionpeft.demo.tiny_image_encoder FOLDER`` writes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

#: 32 px images in 4 x 4 patches of 8 px, 2 layers of width 32, 32-wide image embeddings
CONFIG = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
}

CARD = """# tiny_sd_image_encoder

A `CLIPVisionModelWithProjection` (transformers) with **random weights** (seed {seed}), built from this config:
{config}. It is the image encoder of the tiny IP-Adapter demo on `checkpoints/tiny_sd`
(`configs/control/ip_adapter_tiny_sd.yaml`): a fixed random feature map of a 32 px image, not a trained CLIP tower,
so an IP-Adapter learns from it which image it was (layout, colours), not CLIP's semantics.

Written by `python -m visionpeft.demo.tiny_image_encoder checkpoints/tiny_sd_image_encoder`.
"""


def tiny_image_encoder(seed: int = 0, **overrides):
    """The encoder, its weights drawn from ``seed`` (``overrides`` change the config: tests use 16 px)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**CONFIG, **overrides})).eval()


def write_tiny_image_encoder(folder: str | Path, seed: int = 0) -> Path:
    """Saves the encoder (``save_pretrained``, safetensors) and its card into ``folder``."""
    folder = Path(folder)
    tiny_image_encoder(seed).save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(CARD.format(seed=seed, config=CONFIG))
    return folder


if __name__ == "__main__":
    print(write_tiny_image_encoder(sys.argv[1]))
