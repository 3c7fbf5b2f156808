"""Joint image / mask transforms of the mmsegmentation recipes, built from torchvision ``transforms.v2``.

Training follows mmseg's ADE20K pipeline: ``RandomResize(scale, ratio_range, keep_ratio=True)``,
``RandomCrop(crop_size, cat_max_ratio)``, ``RandomFlip``, ``PhotoMetricDistortion``, normalisation, and padding to
the crop size (bottom and right, 0 in the image after normalisation and the ignore index in the mask, as mmseg's
data preprocessor pads). The image and mask go through the same v2 transforms as ``tv_tensors.Image`` /
``tv_tensors.Mask``, so v2 applies one set of random parameters to both and resizes masks with nearest
interpolation. Evaluation resizes the image only (mmseg's test ``Resize``, keep ratio) and returns the mask at its
original resolution: the model resizes its logits back to the mask, as mmseg evaluates.

Randomness comes from torch's generator (v2 draws with ``torch.rand``), so ``torch.manual_seed`` and DataLoader
worker seeding make runs repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from ..transforms import IMAGENET_MEAN, IMAGENET_STD

#: mmseg's RandomCrop draws a new crop at most this many times looking for one that meets ``cat_max_ratio``.
CROP_ATTEMPTS = 10


def _image_of(flat_inputs: list[Any]) -> torch.Tensor:
    return next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))


def _mask_of(flat_inputs: list[Any]) -> torch.Tensor:
    return next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))


def keep_ratio_size(height: int, width: int, long_edge: float, short_edge: float) -> tuple[int, int]:
    """(height, width) of an image rescaled, keeping its aspect ratio, to the largest size whose long edge is at
    most ``long_edge`` and whose short edge is at most ``short_edge`` (mmcv's ``rescale_size``, rounding half up)."""
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class KeepRatioResize(v2.Transform):
    """Resizes to fit a (long edge, short edge) box times a ratio drawn from ``ratio_range`` (1 when None), keeping
    the aspect ratio: mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)`` and its test ``Resize``.

    Written here because v2 has no equal: ``RandomResize`` draws the shorter side from an integer range with no cap
    on the longer one, and ``ScaleJitter`` fits a box of fixed orientation (portrait and landscape images would be
    scaled differently from mmseg). Only the size is drawn here; v2's ``resize`` kernels do the resizing (bilinear
    with antialiasing for the image, nearest for the mask).
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] | None = None) -> None:
        super().__init__()
        self.long_edge, self.short_edge = max(scale), min(scale)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        ratio = 1.0
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = low + float(torch.rand(())) * (high - low)
        height, width = F.get_size(_image_of(flat_inputs))
        # mmseg scales the box to integers before fitting the image into it
        return {"size": list(keep_ratio_size(height, width, int(self.long_edge * ratio), int(self.short_edge * ratio)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], interpolation=InterpolationMode.BILINEAR, antialias=True)


class CatMaxRatioCrop(v2.Transform):
    """A random crop of ``size`` (the whole side where the input is smaller; padding comes later) that no single
    class dominates: mmseg's ``RandomCrop(crop_size, cat_max_ratio)``.

    Written here because v2's ``RandomCrop`` cannot look at the mask. When ``cat_max_ratio < 1`` a crop is redrawn,
    up to :data:`CROP_ATTEMPTS` times, while its labelled pixels (the ignore index left out) hold fewer than two
    classes or one class covers ``cat_max_ratio`` of them or more; after the last attempt the last draw is kept.
    """

    def __init__(self, size: Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def balanced(self, labels: torch.Tensor) -> bool:
        """Whether a crop's labels hold two classes or more, none covering ``cat_max_ratio`` of the labelled pixels."""
        counts = torch.bincount(labels.flatten().long())
        if 0 <= self.ignore_index < len(counts):
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        mask = _mask_of(flat_inputs)
        height, width = mask.shape[-2:]
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)

        def draw() -> tuple[int, int]:
            top = int(torch.randint(0, height - crop_h + 1, ()))
            left = int(torch.randint(0, width - crop_w + 1, ()))
            return top, left

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(CROP_ATTEMPTS):
                if self.balanced(mask[..., top : top + crop_h, left : left + crop_w]):
                    break
                top, left = draw()
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, params["top"], params["left"], params["height"], params["width"])


class PhotoMetricDistortion(v2.RandomPhotometricDistort):
    """mmseg's ``PhotoMetricDistortion`` through v2's ``RandomPhotometricDistort`` (both are SSD's distortion: each
    of brightness, contrast, saturation, hue applied with probability 0.5, contrast before or after the colour
    changes at random).

    Differences kept small on purpose: v2 scales brightness by a factor in (1 - 32/255, 1 + 32/255) where mmseg adds
    up to +-32 grey levels; mmseg's hue delta of 18 OpenCV units (of 180) is +-0.1 of the hue circle here. v2 also
    permutes the colour channels at random, which mmseg does not do: that draw is switched off.
    """

    def __init__(self) -> None:
        super().__init__(
            brightness=(1 - 32 / 255, 1 + 32 / 255), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.1, 0.1), p=0.5
        )

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        params["channel_permutation"] = None
        return params


class SegmentationTransform:
    """``(PIL image, PIL mask) -> (float image (3, H, W) normalised, long mask (H, W))``.

    Args:
        train: The training pipeline (random resize, crop, flip, photometric distortion, pad to ``crop_size``);
            otherwise the evaluation one (keep-ratio resize of the image to ``scale``, mask at its original size).
        crop_size: (height, width) of training crops; training items all have this size, so the default collate
            stacks them. Evaluation items differ in size: batch them with :func:`collate_eval`.
        scale: The (long edge, short edge) box images are fitted into (mmseg's ``scale=(2048, 512)``).
        ratio_range: Training multiplies ``scale`` by a ratio drawn uniformly from this range.
        cat_max_ratio: The largest share of a crop's labelled pixels one class may hold (1 turns the check off).
        flip_prob: Probability of a horizontal flip.
        photometric: Apply :class:`PhotoMetricDistortion` when training.
        mean: Per-channel mean of the normalisation, in 0..1 units (the backbone's pretraining statistics).
        std: Per-channel standard deviation of the normalisation.
        ignore_index: The mask value of ignored pixels; padding gets it.
    """

    def __init__(
        self,
        train: bool,
        crop_size: Sequence[int] = (512, 512),
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
    ) -> None:
        self.train = train
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.ignore_index = ignore_index
        to_float = [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(mean, std)]
        if train:
            steps: list[v2.Transform] = [
                KeepRatioResize(scale, ratio_range),
                CatMaxRatioCrop(self.crop_size, cat_max_ratio, ignore_index),
                v2.RandomHorizontalFlip(flip_prob),
            ]
            steps += [PhotoMetricDistortion()] if photometric else []
            self.pipeline = v2.Compose(steps + to_float)
        else:
            self.pipeline = v2.Compose([KeepRatioResize(scale)] + to_float)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
        labels = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))[None])
        if not self.train:
            return self.pipeline(pixels).as_subclass(torch.Tensor), labels[0].as_subclass(torch.Tensor).long()
        pixels, labels = self.pipeline(pixels, labels)
        height, width = labels.shape[-2:]
        padding = [0, 0, max(self.crop_size[1] - width, 0), max(self.crop_size[0] - height, 0)]  # left top right bottom
        pixels = F.pad(pixels, padding, fill=0.0)
        labels = F.pad(labels, padding, fill=self.ignore_index)
        return pixels.as_subclass(torch.Tensor), labels[0].as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train={self.train}, {self.pipeline})"


def collate_eval(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Batches evaluation items, whose images and masks differ in size, as two lists (images, masks)."""
    return [image for image, _ in batch], [mask for _, mask in batch]
