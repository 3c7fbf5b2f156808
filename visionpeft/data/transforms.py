"""Image transforms of the recipes: VTAB (resize to the input size, no augmentation) and crop + flip training.

The model's data config decides normalisation, test-time crop and interpolation; the library table says what it is
(``visionpeft.backbones``: timm's ``resolve_data_config`` for timm models - an in21k ViT gets mean = std = 0.5, its
``crop_pct`` and bicubic resizing -, open_clip's ``preprocess_cfg`` for CLIP - CLIP's statistics, a center crop of
the resized image -, a transformers model's image processor, ImageNet's defaults for any other model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2 as T

from ..backbones.libraries import IMAGENET_MEAN, IMAGENET_STD, DataConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataConfig", "build_transform", "data_config_of", "normalization_of"]


def data_config_of(model: torch.nn.Module) -> DataConfig:
    """The :class:`DataConfig` of a library model or of a task model holding one (a CLIP classifier, a
    segmenter), as the model's library says."""
    from ..backbones.factory import data_config

    return data_config(model)


def normalization_of(model: torch.nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) the model was pretrained with."""
    config = data_config_of(model)
    return config.mean, config.std


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
