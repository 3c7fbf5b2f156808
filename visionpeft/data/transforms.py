"""Image transforms of the recipes: VTAB (resize to the input size, no augmentation) and crop + flip training.

Normalisation comes from the model's pretrained config (timm's ``pretrained_cfg`` / open_clip's preprocess), so
an in21k ViT gets mean = std = 0.5 and a CLIP model CLIP's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_of(model: torch.nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the model was pretrained with."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    clip = getattr(model, "clip", model)
    visual = getattr(clip, "visual", None)
    if visual is not None and hasattr(visual, "image_mean"):
        return tuple(visual.image_mean or IMAGENET_MEAN), tuple(visual.image_std or IMAGENET_STD)
    if visual is not None:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return IMAGENET_MEAN, IMAGENET_STD


def build_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], train: bool, augment: str = "none"
) -> Callable:
    """The recipe's transform for PIL images.

    Args:
        augment: ``none`` resizes to ``img_size`` x ``img_size`` (VTAB-1k protocol of VPT / NOAH, train and test);
            ``crop_flip`` trains on random resized crops with horizontal flips and tests on resize + center crop.
    """
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    rgb = T.RGB()
    if augment == "none":
        return T.Compose([rgb, T.Resize((img_size, img_size), antialias=True), *to_tensor])
    if train:
        return T.Compose([rgb, T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip(), *to_tensor])
    return T.Compose([rgb, T.Resize(int(img_size / 0.875), antialias=True), T.CenterCrop(img_size), *to_tensor])
