"""Image transforms of the recipes: VTAB (resize to the input size, no augmentation) and crop + flip training.

The model's data config decides normalisation, test-time crop and interpolation: timm's ``resolve_data_config``
for timm models (an in21k ViT gets mean = std = 0.5, its ``crop_pct`` and bicubic resizing), open_clip's
``preprocess_cfg`` for CLIP (CLIP's statistics, a center crop of the resized image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """How a model's pretraining read images: normalisation, test-time crop fraction, resize interpolation."""

    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


def data_config_of(model: torch.nn.Module) -> DataConfig:
    """The :class:`DataConfig` of a timm model (``timm.data.resolve_data_config``), an open_clip CLIP or a
    classifier wrapping one (its ``preprocess_cfg``; crop 1.0 = resize the short side, center crop), else
    ImageNet's defaults."""
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return DataConfig(tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"], cfg["interpolation"])
    mean, std = normalization_of(model)
    visual = getattr(getattr(model, "clip", model), "visual", None)
    interpolation = (getattr(visual, "preprocess_cfg", None) or {}).get("interpolation", "bicubic")
    return DataConfig(mean, std, 1.0, interpolation) if visual is not None else DataConfig(mean, std)


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


def build_transform(img_size: int, data: DataConfig, train: bool, augment: str = "none") -> Callable:
    """The recipe's transform for PIL images.

    Args:
        data: The model's :class:`DataConfig` (:func:`data_config_of`).
        augment: ``none`` resizes to ``img_size`` x ``img_size`` (VTAB-1k protocol of VPT / NOAH, train and test);
            ``crop_flip`` trains on random resized crops with horizontal flips and tests on a resize to
            ``img_size / crop_pct`` + center crop, with the model's interpolation.
    """
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(data.mean, data.std)]
    rgb = T.RGB()
    if augment == "none":
        return T.Compose([rgb, T.Resize((img_size, img_size), antialias=True), *to_tensor])
    mode = T.InterpolationMode(data.interpolation)
    if train:
        crop = T.RandomResizedCrop(img_size, interpolation=mode, antialias=True)
        return T.Compose([rgb, crop, T.RandomHorizontalFlip(), *to_tensor])
    resize = T.Resize(int(img_size / data.crop_pct), interpolation=mode, antialias=True)
    return T.Compose([rgb, resize, T.CenterCrop(img_size), *to_tensor])
