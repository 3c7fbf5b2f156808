"""The image encoder of the tiny IP-Adapter demo: the embedded tiny CLIP's image tower (``checkpoints/tiny_clip``,
open_clip) as a transformers ``CLIPVisionModelWithProjection``, the layout ``pipe.load_ip_adapter`` and the
IP-Adapter trainer read.

The two layouts are the same network (ViT with a class token, pre-norm blocks, exact GELU, the class token's
``ln_post`` output projected without bias); :func:`from_open_clip` only renames and splits tensors: open_clip's fused
``in_proj`` into ``q_proj`` / ``k_proj`` / ``v_proj``, ``proj`` (width x embed) into ``visual_projection.weight``
(embed x width). The tiny CLIP was trained contrastively on the captioned mix's subjects (digits among them), so its
image embeddings carry what an image shows, which the IP-Adapter demo needs.

``python -m visionpeft.demo.tiny_image_encoder FOLDER [--clip checkpoints/tiny_clip]`` writes the encoder.
:func:`tiny_image_encoder` builds a small encoder with seeded random weights (tests use it at 16 px).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

#: the random test encoder: 32 px images in 4 x 4 patches of 8 px, 2 layers of width 32, 32-wide image embeddings
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

The image tower of the embedded tiny CLIP (`{clip}`, open_clip) as a transformers `CLIPVisionModelWithProjection`:
{config}. It is the image encoder of the tiny IP-Adapter demo on `checkpoints/tiny_sd`
(`configs/control/ip_adapter_tiny_sd.yaml`). The tiny CLIP learned its image embeddings contrastively on the captioned
mix's subjects (digits, textures, faces, photo crops, coloured circles; digit 7 and the brick texture held out), so an
IP-Adapter learns from them what a reference image shows.

Same weights as the open_clip tower, renamed (fp32); `image_embeds` equal open_clip's `encode_image` (tested).
Written by `python -m visionpeft.demo.tiny_image_encoder checkpoints/tiny_sd_image_encoder --clip {clip}`.
"""


def tiny_image_encoder(seed: int = 0, **overrides):
    """A small encoder with random weights drawn from ``seed`` (``overrides`` change :data:`CONFIG`)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**CONFIG, **overrides})).eval()


def _vision_config(model_cfg: dict) -> dict:
    """transformers' ``CLIPVisionConfig`` keys of an open_clip ``model_cfg`` (plain ViT towers only)."""
    vision = model_cfg["vision_cfg"]
    unsupported = {"attentional_pool", "ls_init_value", "patch_dropout", "timm_model_name", "no_ln_pre"}
    if unsupported & {k for k, v in vision.items() if v}:
        raise ValueError(
            f"only a plain open_clip ViT tower converts; this one sets {sorted(unsupported & set(vision))}"
        )
    width, layers = vision["width"], vision["layers"]
    return {
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "hidden_size": width,
        "intermediate_size": int(width * vision.get("mlp_ratio", 4.0)),
        "num_hidden_layers": layers,
        "num_attention_heads": width // vision.get("head_width", 64),
        "projection_dim": model_cfg["embed_dim"],
        "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
    }


def _renamed(visual: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """open_clip ``visual.*`` tensors under transformers' names."""
    out = {
        "vision_model.embeddings.class_embedding": visual["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": visual["conv1.weight"],
        "vision_model.pre_layrnorm.weight": visual["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": visual["ln_pre.bias"],
        "vision_model.post_layernorm.weight": visual["ln_post.weight"],
        "vision_model.post_layernorm.bias": visual["ln_post.bias"],
        "visual_projection.weight": visual["proj"].t().contiguous(),
    }
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    pairs["attn.out_proj"] = "self_attn.out_proj"
    for i in range(layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for source, target in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{target}.{kind}"] = visual[f"{ours}{source}.{kind}"]
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", visual[f"{ours}attn.in_proj_{kind}"].chunk(3)):
                out[f"{theirs}self_attn.{name}_proj.{kind}"] = part.contiguous()
    return out


def from_open_clip(folder: str | Path):
    """The image tower of an open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) as a
    ``CLIPVisionModelWithProjection`` in fp32."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    config = _vision_config(model_cfg)
    weights = load_file(folder / "open_clip_model.safetensors")
    visual = {k.removeprefix("visual."): v.float() for k, v in weights.items() if k.startswith("visual.")}
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    encoder.load_state_dict(_renamed(visual, config["num_hidden_layers"]), strict=True)
    return encoder.eval()


def write_tiny_image_encoder(folder: str | Path, clip: str | Path = "checkpoints/tiny_clip") -> Path:
    """Saves the converted encoder (``save_pretrained``, safetensors) and its card into ``folder``."""
    folder = Path(folder)
    encoder = from_open_clip(clip)
    encoder.save_pretrained(folder, safe_serialization=True)
    config = {k: getattr(encoder.config, k) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")}
    (folder / "README.md").write_text(CARD.format(clip=clip, config=config))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--clip", default="checkpoints/tiny_clip", help="the open_clip folder whose tower to convert")
    args = parser.parse_args()
    print(write_tiny_image_encoder(args.folder, args.clip))
