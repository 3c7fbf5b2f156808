"""Aspect-ratio buckets: images of different shapes trained at their own aspect, never cropped to a square.

The bucket set and each image's bucket follow kohya's sd-scripts (at 48d368f):

- :func:`bucket_resolutions` is ``library/model_util.py`` ``make_bucket_resolutions`` (lines 1316-1344): the square
  of area ``resolution^2`` rounded down to the step, then for every width from ``min_reso`` to ``max_reso`` in
  steps the largest height on the step grid with ``width * height <= resolution^2`` (capped at ``max_reso``, kept
  when at least ``min_reso``), and its transpose.
- :func:`bucket_placement` is ``BucketManager.select_bucket`` without ``--bucket_no_upscale``
  (``library/train_util.py`` lines 286-306, 343-346): an image whose exact size is a bucket keeps it, any other
  gets the bucket of the nearest aspect ratio, and is resized to cover it (the side whose aspect is the bucket's
  shorter one fits, the other overhangs; rounded half up).
- the crop (:func:`crop_offsets`) is ``trim_and_resize_if_required`` (lines 2965-2993): the overhang is cut at
  ``trim // 2`` (centre) or at ``randint(0, trim)`` (random crop).

Without buckets (loss masks on square crops) an image is placed as the square transform always did: the shorter side
resized to ``size`` (torchvision's ``Resize``) and a ``size`` square cropped (``CenterCrop`` / a random offset).

A bucket set cannot hold an image whose aspect ratio lies beyond its extreme buckets so far that the cover-resize
would cut more than one ``bucket_reso_steps`` off it (the set is too small - ``max_bucket_reso`` /
``min_bucket_reso`` too close to ``resolution`` - or the image too long and thin): sd-scripts crops such an image
silently; :func:`place_images` refuses it in one line naming the file. Inside the set's range the crop is whatever
the nearest bucket needs, as in sd-scripts.

SDXL's micro-conditioning is recorded per item under diffusers' names (``examples/dreambooth/
train_dreambooth_lora_sdxl.py`` lines 825-838 at 58eb52c, which flips before cropping, as :func:`place_item`
does): ``original_size`` (height, width) of the file, ``crop_top_left`` (top, left) of the crop in the resized and
flipped image, ``target_size`` (height, width) of the training image. (sd-scripts records a letterbox offset
instead, ``BucketManager.get_crop_ltrb``.)

:class:`BucketBatchSampler` makes the loader's batches: each holds items of one bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Sampler
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError

Size = tuple[int, int]  # (width, height)

#: The per-item SDXL micro-conditioning keys (diffusers' names), in the order SDXL's time ids hold them.
MICRO_CONDITIONS = ("original_size", "crop_top_left", "target_size")


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """The buckets (width, height), sorted, of area at most ``resolution^2`` (see the module docstring)."""
    area = resolution * resolution
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, int((area // width) // steps) * steps)
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its file size, the size it is resized to, and its bucket (all (width, height)); how a
    centre crop halves an odd overhang: ``floor`` (sd-scripts' ``trim // 2``) or ``round`` (torchvision's
    ``CenterCrop``, ``int(round(trim / 2))``, what the square crops always used)."""

    original: Size
    resized: Size
    bucket: Size
    centre: str = "floor"

    @property
    def trim(self) -> Size:
        """How many pixels the crop cuts off the resized image, (width, height)."""
        return self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]


def bucket_placement(buckets: Sequence[Size], width: int, height: int) -> Placement:
    """The bucket of a ``width`` x ``height`` image and the size it is resized to (sd-scripts' ``select_bucket``)."""
    aspect = width / height
    if (width, height) in buckets:
        bucket = (width, height)
    else:
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))  # the first of equally near ones, as argmin
    scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
    return Placement((width, height), (int(width * scale + 0.5), int(height * scale + 0.5)), bucket)


def square_placement(width: int, height: int, size: int) -> Placement:
    """Without buckets: the shorter side resized to ``size`` (torchvision's ``Resize(size)``), then a square crop."""
    short, long = sorted((width, height))
    longer = int(size * long / short)
    resized = (size, longer) if width <= height else (longer, size)
    return Placement((width, height), resized, (size, size), centre="round")


def place_images(
    sizes: Sequence[Size], files: Sequence[Path], resolution: int, min_reso: int, max_reso: int, steps: int
) -> list[Placement]:
    """Every image's placement in the bucket set.

    Raises:
        DataError: An image the set cannot hold (see the module docstring), naming the file.
    """
    buckets = bucket_resolutions(resolution, min_reso, max_reso, steps)
    aspects = [w / h for w, h in buckets]
    placements = []
    for (width, height), path in zip(sizes, files):
        placement = bucket_placement(buckets, width, height)
        beyond = not min(aspects) <= width / height <= max(aspects)
        if beyond and max(placement.trim) > steps:
            bucket = placement.bucket
            raise DataError(
                f"{path} ({width}x{height}, aspect {width / height:.2f}) does not fit the buckets (aspects "
                f"{min(aspects):.2f} to {max(aspects):.2f}): its nearest, {bucket[0]}x{bucket[1]}, would crop "
                f"{max(placement.trim)} pixels off it, more than data.bucket_reso_steps ({steps}); lower "
                "data.min_bucket_reso / raise data.max_bucket_reso, or crop the image"
            )
        placements.append(placement)
    return placements


def crop_offsets(placement: Placement, random_crop: bool) -> tuple[int, int]:
    """(top, left) of the crop: the overhang halved (as ``placement.centre`` says), or drawn in ``[0, trim]`` from
    torch's generator (height first)."""
    trim_w, trim_h = placement.trim
    if not random_crop and placement.centre == "round":
        return int(round(trim_h / 2.0)), int(round(trim_w / 2.0))
    if not random_crop:
        return trim_h // 2, trim_w // 2
    top = int(torch.randint(0, trim_h + 1, ())) if trim_h else 0
    left = int(torch.randint(0, trim_w + 1, ())) if trim_w else 0
    return top, left


TO_PIXELS = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5], [0.5])])
TO_MASK = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])


def place_item(
    image: Image.Image, placement: Placement, flip: float, random_crop: bool, mask: Image.Image | None = None
) -> dict:
    """One training item: resize to ``placement.resized`` (bilinear, antialiased), flip with probability ``flip``,
    crop to the bucket; the ``mask`` (an ``L`` image of the image's size) goes through the same resize, flip and
    crop. Returns ``pixel_values`` in [-1, 1], ``mask`` (1, H, W) in [0, 1] when given, and the SDXL
    micro-conditioning (see the module docstring) as (2,) long tensors."""
    flipped = flip > 0 and bool(torch.rand(()) < flip)
    top, left = crop_offsets(placement, random_crop)
    width, height = placement.bucket

    def transform(picture: Image.Image) -> Image.Image:
        resized = TF.resize(
            picture, [placement.resized[1], placement.resized[0]], T.InterpolationMode.BILINEAR, antialias=True
        )
        return TF.crop(TF.hflip(resized) if flipped else resized, top, left, height, width)

    item = {
        "pixel_values": TO_PIXELS(transform(image)),
        "original_size": torch.tensor([placement.original[1], placement.original[0]]),
        "crop_top_left": torch.tensor([top, left]),
        "target_size": torch.tensor([height, width]),
    }
    if mask is not None:
        item["mask"] = TO_MASK(transform(mask))
    return item


class EpochOrder(Sampler[int]):
    """A permutation of ``range(count)`` per epoch, seeded by ``seed`` and the epoch (accelerate calls ``set_epoch``
    on a batch sampler's ``sampler``, through its own wrappers too)."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed, self.epoch = count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.count, generator=self.generator()).tolist())

    def __len__(self) -> int:
        return self.count


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` items of one bucket each (the last batch of a bucket may be smaller), in a random
    order: the items are permuted, each bucket's items cut into batches in that order, and the batches shuffled
    (sd-scripts' ``BaseDataset.shuffle_buckets``, ``library/train_util.py`` lines 1086-1091, which seeds by seed +
    epoch too); the same for a given seed and epoch.

    Args:
        buckets: The bucket of each dataset item.
        batch_size: Items per batch (the per-process micro-batch).
        seed: Seed of the order (the epoch is added).
    """

    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int) -> None:
        self.buckets, self.batch_size = list(buckets), batch_size
        self.sampler = EpochOrder(len(self.buckets), seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.sampler.generator()
        grouped: dict[Size, list[int]] = {}
        for index in torch.randperm(len(self.buckets), generator=generator).tolist():
            grouped.setdefault(self.buckets[index], []).append(index)
        batches = [
            items[start : start + self.batch_size]
            for _, items in sorted(grouped.items())
            for start in range(0, len(items), self.batch_size)
        ]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])

    def __len__(self) -> int:
        counts: dict[Size, int] = {}
        for bucket in self.buckets:
            counts[bucket] = counts.get(bucket, 0) + 1
        return sum(math.ceil(n / self.batch_size) for n in counts.values())
