"""A handful of subject or style images for text-to-image personalization (3-20 is typical).

Prompt templates are the ones diffusers' textual-inversion example uses (after Gal et al. 2023): short object
captions ("a photo of a {}") for subjects and style captions ("a painting in the style of {}") for styles.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from ..errors import DataError
from ..io import kind_problem
from .buckets import Placement, place_images, place_item, square_placement
from .captions import CaptionAugment, read_captions
from .images import ItemError, load_rgb, unreadable
from .masks import alpha_of, load_mask, mask_files

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted by name.

    Raises:
        DataError: The folder is missing or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} {kind_problem(folder, 'folder')}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths


def load_images(folder: str | Path, skip_bad_images: bool = False) -> list[Image.Image]:
    """All images of a folder as RGB, sorted by file name (see :func:`load_image_files`)."""
    return load_image_files(folder, skip_bad_images)[1]


def load_image_files(folder: str | Path, skip_bad_images: bool = False) -> tuple[list[Path], list[Image.Image]]:
    """The readable image files of a folder and their images as RGB, sorted by file name.

    Args:
        folder: The image folder.
        skip_bad_images: Leave files that cannot be decoded out (logging how many) instead of failing.

    Raises:
        DataError: The folder is missing or holds no readable image, or an image cannot be decoded (the message names
            the first such file and how many there are).
    """
    paths = image_files(folder)
    images, kept, bad = [], [], []
    for path in paths:
        try:
            images.append(load_rgb(path))
            kept.append(path)
        except ItemError as err:
            bad.append(str(err))
    if bad and (not images or not skip_bad_images):
        raise DataError(unreadable(bad[0], len(bad), len(paths), str(folder)))
    if bad:
        logger.warning(
            "skipped %d unreadable image%s of %d in %s (first: %s)",
            len(bad),
            "" if len(bad) == 1 else "s",
            len(paths),
            folder,
            bad[0],
        )
    return kept, images


@dataclass(frozen=True)
class ImageKnobs:
    """The per-image options of a few-image set (all off: the set reads, transforms and captions as it always did).

    Attributes:
        captions: Per-image captions from ``metadata.jsonl`` or ``.txt`` files (:mod:`.captions`); an image without
            one keeps the set's own prompt. ``{}`` in a caption stands for the placeholder.
        augment: Caption dropout and tag shuffle (:class:`~.captions.CaptionAugment`).
        buckets: ``(min_reso, max_reso, reso_steps)`` of aspect-ratio buckets (:mod:`.buckets`), or None: square
            crops.
        masks: Folder of loss masks with the images' stems (:mod:`.masks`).
        alpha_mask: The images' alpha channel is the loss mask.
        micro_conditioning: Every item carries SDXL's ``original_size`` / ``crop_top_left`` / ``target_size``
            (items placed by :func:`~.buckets.place_item`, which flips before it crops, as diffusers' SDXL scripts).
    """

    captions: bool = False
    augment: CaptionAugment = field(default_factory=CaptionAugment)
    buckets: tuple[int, int, int] | None = None
    masks: str | Path | None = None
    alpha_mask: bool = False
    micro_conditioning: bool = False

    @property
    def placed(self) -> bool:
        """Items are placed image by image (:func:`~.buckets.place_item`): buckets, masks or SDXL's
        micro-conditioning are on."""
        return self.buckets is not None or self.masks is not None or self.alpha_mask or self.micro_conditioning


class FewImages(Dataset):
    """Images of one subject or style with a caption template per item.

    Args:
        folder: The image folder.
        placeholder: What stands for the concept in captions (``<my-cat>`` or ``sks dog``).
        size: Training resolution (resize shorter side, then crop).
        kind: ``object`` or ``style`` captions, or ``fixed`` to use ``prompt`` for every item.
        prompt: The caption when ``kind="fixed"`` (``{}`` is replaced by ``placeholder``).
        repeats: How many times the folder is walked per epoch.
        center_crop: Center instead of random crops.
        flip: Probability of a horizontal flip.
        seed: Seed of the caption choice (the transforms use torch's global generator).
        skip_bad_images: Leave images that cannot be decoded out instead of failing.
        knobs: Per-image captions, caption augmentation, buckets and loss masks (:class:`ImageKnobs`). With buckets
            or masks, items are resized, flipped (before the crop) and cropped by :func:`~.buckets.place_item` and
            carry SDXL's micro-conditioning (``original_size``, ``crop_top_left``, ``target_size``) and ``mask``.
    """

    def __init__(
        self,
        folder: str | Path,
        placeholder: str,
        size: int = 512,
        kind: str = "object",
        prompt: str = "a photo of {}",
        repeats: int = 1,
        center_crop: bool = False,
        flip: float = 0.5,
        seed: int = 0,
        skip_bad_images: bool = False,
        knobs: ImageKnobs | None = None,
    ) -> None:
        if kind not in ("object", "style", "fixed"):
            raise DataError(f"unknown caption kind '{kind}'; choose object, style or fixed")
        self.files, self.images = load_image_files(folder, skip_bad_images)
        self.placeholder, self.kind, self.prompt, self.repeats = placeholder, kind, prompt, repeats
        self.knobs, self.flip, self.random_crop = knobs or ImageKnobs(), flip, not center_crop
        self.captions = read_captions(folder, image_files(folder)) if self.knobs.captions else {}
        self.placements = self._placements(size) if self.knobs.placed else None
        self.masks = self._masks()
        self.rng = random.Random(seed)
        crop = T.CenterCrop(size) if center_crop else T.RandomCrop(size)
        self.transform = T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                crop,
                T.RandomHorizontalFlip(flip),
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize([0.5], [0.5]),
            ]
        )

    def _placements(self, size: int) -> list[Placement]:
        sizes = [image.size for image in self.images]
        if self.knobs.buckets is None:
            return [square_placement(width, height, size) for width, height in sizes]
        return place_images(sizes, self.files, size, *self.knobs.buckets)

    def _masks(self) -> list[Image.Image] | None:
        if self.knobs.masks is not None:
            return [load_mask(path) for path in mask_files(self.knobs.masks, self.files, IMAGE_SUFFIXES)]
        if self.knobs.alpha_mask:
            return [alpha_of(path) for path in self.files]
        return None

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def item_buckets(self) -> list[tuple[int, int]]:
        """The bucket (width, height) of every item (what :class:`~.buckets.BucketBatchSampler` groups by)."""
        if self.placements is None:
            raise ValueError("the set has no buckets")
        return [self.placements[i % len(self.images)].bucket for i in range(len(self))]

    def summary(self) -> list[str]:
        """Lines on the knobs that are on: captions found, buckets in use, masks."""
        lines = []
        if self.knobs.captions:
            lines.append(f"captions: {len(self.captions)} of {len(self.images)} images (others: data.kind's prompt)")
        if self.knobs.buckets is not None and self.placements is not None:
            counts = Counter(p.bucket for p in self.placements)
            lines.append("buckets: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items())))
        if self.masks is not None:
            lines.append(f"loss masks: {'alpha channels' if self.knobs.alpha_mask else self.knobs.masks}")
        return lines

    def caption(self) -> str:
        if self.kind == "fixed":
            return self.prompt.format(self.placeholder)
        templates = OBJECT_TEMPLATES if self.kind == "object" else STYLE_TEMPLATES
        return self.rng.choice(templates).format(self.placeholder)

    def prompt_of(self, index: int) -> str:
        """The caption of image ``index`` before augmentation: its own caption, or the set's prompt."""
        own = self.captions.get(self.files[index].name)
        return self.caption() if own is None else own.replace("{}", self.placeholder)

    def __getitem__(self, index: int) -> dict:
        index %= len(self.images)
        if self.placements is None:
            item = {"pixel_values": self.transform(self.images[index])}
        else:
            mask = None if self.masks is None else self.masks[index]
            item = place_item(self.images[index], self.placements[index], self.flip, self.random_crop, mask)
        item["prompt"] = self.knobs.augment(self.prompt_of(index))
        return item
