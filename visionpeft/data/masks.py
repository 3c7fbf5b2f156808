"""Loss masks of training images: the loss counts only where the mask is white.

A mask comes from a mask folder holding one image per training image with the same stem (any image suffix; its red
channel, as sd-scripts reads a conditioning image as the mask: ``library/custom_train_functions.py``
``apply_masked_loss`` line 490 at 48d368f), or from the training image's own alpha channel (sd-scripts' subset
option ``alpha_mask``: ``library/train_util.py`` lines 1663-1669; an image without alpha gets a mask of ones, as
there). A mask must have its image's size (sd-scripts asserts the same for a conditioning image, lines 2536-2539);
it then follows the image's resize, flip and crop exactly (:func:`~.buckets.place_item`).

In the loss (:func:`latent_mask`, applied by the denoising loss): the mask is resized to the latent size with area
interpolation and multiplies the element-wise loss before the per-sample mean over all elements
(``apply_masked_loss`` lines 500-503 and ``train_network.py`` lines 468-473): the mean is not renormalised by the
mask's area, so a half-masked image weighs about half.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from ..io import kind_problem
from .images import header_size, load_rgb


def mask_files(folder: str | Path, images: list[Path], suffixes: set[str]) -> list[Path]:
    """The mask of each image in ``folder`` (same stem), in the images' order.

    Raises:
        DataError: The folder is missing; an image has no mask, or a mask no image, or two masks share a stem; a mask
            of another size than its image (one line naming the files).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"mask folder {folder} {kind_problem(folder, 'folder')}")
    masks: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes):
        if path.stem in masks:
            raise DataError(f"masks {masks[path.stem]} and {path} share the stem {path.stem}; keep one")
        masks[path.stem] = path
    stems = {p.stem for p in images}
    orphan = next((path for stem, path in masks.items() if stem not in stems), None)
    if orphan is not None:
        raise DataError(f"mask {orphan} has no training image named {orphan.stem}.* in {images[0].parent}")
    files = []
    for image in images:
        if image.stem not in masks:
            raise DataError(f"image {image} has no mask named {image.stem}.* in {folder}")
        mask = masks[image.stem]
        mask_size, image_size = header_size(mask), header_size(image)
        if mask_size != image_size:
            raise DataError(
                f"mask {mask} is {mask_size[0]}x{mask_size[1]} pixels but its image {image} is "
                f"{image_size[0]}x{image_size[1]}; a mask must have its image's size"
            )
        files.append(mask)
    return files


def load_mask(path: str | Path) -> Image.Image:
    """A mask file as an ``L`` image: its red channel (a grey mask's grey)."""
    return load_rgb(path).getchannel("R")


def alpha_of(path: str | Path) -> Image.Image:
    """The alpha channel of an image file as an ``L`` image (all white when it has none)."""
    with Image.open(path) as image:
        if "A" in image.getbands() or "transparency" in image.info:
            return image.convert("RGBA").getchannel("A")
        return Image.new("L", image.size, 255)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A batch of masks (B, 1, H, W) in [0, 1] resized to the latent ``size`` (h, w) with area interpolation."""
    return F.interpolate(mask.float(), size=size, mode="area")
