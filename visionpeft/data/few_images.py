"""A handful of subject or style images for text-to-image personalization (3-20 is typical).

Prompt templates are the ones diffusers' textual-inversion example uses (after Gal et al. 2023): short object
captions ("a photo of a {}") for subjects and style captions ("a painting in the style of {}") for styles.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from ..errors import DataError
from ..io import kind_problem
from .images import ItemError, load_rgb, unreadable

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


def load_images(folder: str | Path, skip_bad_images: bool = False) -> list[Image.Image]:
    """All images of a folder as RGB, sorted by file name.

    Args:
        folder: The image folder.
        skip_bad_images: Leave files that cannot be decoded out (logging how many) instead of failing.

    Raises:
        DataError: The folder is missing or holds no readable image, or an image cannot be decoded (the message names
            the first such file and how many there are).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} {kind_problem(folder, 'folder')}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    images, bad = [], []
    for path in paths:
        try:
            images.append(load_rgb(path))
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
    return images


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
    ) -> None:
        if kind not in ("object", "style", "fixed"):
            raise DataError(f"unknown caption kind '{kind}'; choose object, style or fixed")
        self.images = load_images(folder, skip_bad_images)
        self.placeholder, self.kind, self.prompt, self.repeats = placeholder, kind, prompt, repeats
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

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def caption(self) -> str:
        if self.kind == "fixed":
            return self.prompt.format(self.placeholder)
        templates = OBJECT_TEMPLATES if self.kind == "object" else STYLE_TEMPLATES
        return self.rng.choice(templates).format(self.placeholder)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.transform(self.images[index % len(self.images)]), "prompt": self.caption()}
