"""Score personalization results: CLIP-T (prompt alignment), CLIP-I and DINO (subject fidelity), as a table.

    python tools/eval_personalization.py --images runs/x/samples --references data/my-cat \\
        --prompts "a photo of a cat on the beach" [--clip-model ViT-B-32 --clip-pretrained openai] [--dino MODEL]

Images are matched to prompts in file-name order (one prompt for all, or one per image). ``--dino`` takes a timm
model name with DINO weights (e.g. ``vit_small_patch16_224.dino``) or ``timm-name=/local/weights.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of generated images")
    parser.add_argument("--references", type=Path, required=True, help="folder of the subject's real images")
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip tag or a local weights file")
    parser.add_argument("--dino", default=None)
    args = parser.parse_intermixed_args(argv)

    import open_clip
    from omegaconf import OmegaConf

    from visionpeft.backbones.factory import create_open_clip, create_timm
    from visionpeft.config.classification import ModelConfig
    from visionpeft.data.few_images import load_images
    from visionpeft.errors import ConfigError
    from visionpeft.metrics.clip_scores import ClipScorer, dino_similarity

    images, references = load_images(args.images), load_images(args.references)
    prompts = args.prompts * len(images) if len(args.prompts) == 1 else args.prompts
    if len(prompts) != len(images):
        raise ConfigError(f"{len(images)} images but {len(args.prompts)} prompts; give one prompt or one per image")
    is_file = Path(args.clip_pretrained).expanduser().exists()
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        {
            "library": "open_clip",
            "name": args.clip_model,
            "pretrained_tag": None if is_file else args.clip_pretrained,
            "checkpoint": args.clip_pretrained if is_file else None,
        },
    )
    clip = create_open_clip(cfg)
    visual = clip.visual
    preprocess = open_clip.image_transform(
        visual.image_size,
        is_train=False,
        mean=getattr(visual, "image_mean", None),
        std=getattr(visual, "image_std", None),
    )
    scorer = ClipScorer(clip, preprocess, open_clip.get_tokenizer(args.clip_model))
    rows = [("CLIP-T", scorer.clip_t(images, prompts)), ("CLIP-I", scorer.clip_i(images, references))]
    if args.dino:
        from timm.data import create_transform, resolve_data_config

        name, _, weights = args.dino.partition("=")
        dcfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": name, "checkpoint": weights or None})
        dino = create_timm(dcfg, num_classes=0)
        rows.append(
            ("DINO", dino_similarity(dino, create_transform(**resolve_data_config({}, model=dino)), images, references))
        )
    print(f"| metric ({len(images)} images, {len(references)} references) | score |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.4f} |")
    return 0
