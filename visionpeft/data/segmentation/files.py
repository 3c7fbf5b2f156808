"""Segmentation datasets read from (image file, mask file) pairs, and the checks that make a bad file one clear line.

When a dataset is built (before any training step) its pairs are checked up front: an empty split, an image without
a mask, an unreadable image or mask (:func:`~visionpeft.data.images.screen_images`), and a mask whose size differs
from its image's (read from the file headers, no pixels decoded) each raise one :class:`DataError` naming the file.
Label values need the pixels, which is slow for ADE20K's 20k masks, so they are checked when an item is read: a
value that is neither a class index nor the ignore index raises an :class:`~visionpeft.data.images.ItemError` (the
one-line error ``WorkerSafe`` makes, which stays one line when a DataLoader worker re-raises it). ``check_labels``
reads every mask up front instead (the default of ``imagefolder-seg``, whose masks are the user's own).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ...errors import DataError
from ..images import ItemError, header_size, load_rgb, screen_images

Pair = tuple[Path, Path]
#: Turns a mask file's array into train ids (uint8, ``ignore_index`` on ignored pixels), or raises DataError.
MaskDecoder = Callable[[np.ndarray, Path], np.ndarray]


def lookup_decoder(table: np.ndarray) -> MaskDecoder:
    """A decoder for one-channel index masks (``L`` or palette ``P`` PNGs, whose values are the labels) that maps
    each stored value through ``table`` (256 entries)."""

    def decode(values: np.ndarray, path: Path) -> np.ndarray:
        if values.ndim != 2:
            raise DataError(f"{path} has {values.shape[-1]} channels; a label mask has one (class index per pixel)")
        if values.dtype != np.uint8:
            if values.size and (values.min() < 0 or values.max() > 255):
                raise DataError(f"{path} holds values outside 0..255 ({values.min()}..{values.max()})")
            values = values.astype(np.uint8)
        return table[values]

    return decode


def identity_table() -> np.ndarray:
    """Stored value = label (VOC, Cityscapes train ids, index masks)."""
    return np.arange(256, dtype=np.uint8)


def reduce_zero_label_table(ignore_index: int = 255) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (ADE20K's "other") becomes the ignore index, k becomes k - 1, and the
    ignore index stays itself."""
    table = (np.arange(256) - 1).astype(np.uint8)
    table[0] = table[ignore_index] = ignore_index
    return table


def read_mask_array(path: Path, rgb: bool = False) -> np.ndarray:
    """The stored values of a mask file: palette indices for ``P`` PNGs (not their colours), else the pixels;
    with ``rgb`` the colours (H, W, 3) whatever the mode."""
    try:
        with Image.open(path) as mask:
            if rgb:
                mask = mask.convert("RGB")
            elif mask.mode in ("RGBA", "LA"):
                mask = mask.convert(mask.mode[:-1])
            return np.asarray(mask)
    except Exception as err:  # whatever a broken file makes PIL raise
        raise DataError(f"{path} is not a readable mask ({type(err).__name__})") from None


class SegmentationFiles(Dataset):
    """(image, mask) items read from ``files``; see the module docstring for what is checked when.

    Args:
        files: (image path, mask path) pairs, already checked with :func:`check_pairs`.
        classes: Class names; train ids are their indices.
        palette: One RGB colour per class.
        decode: Turns a mask file's array into train ids.
        transform: A joint ``(image, mask)`` callable; None gives PIL items.
        name: The dataset's name, for messages.
        ignore_index: The train id of ignored pixels.
        rgb_masks: Hand ``decode`` the masks' colours (H, W, 3), palette PNGs included, instead of stored values.
        classes_file: The file the class names come from, when they come from one (named in messages).
    """

    classes_file: Path | None

    def __init__(
        self,
        files: Sequence[Pair],
        classes: Sequence[str],
        palette: Sequence[tuple[int, int, int]],
        decode: MaskDecoder,
        transform: Callable | None = None,
        name: str = "dataset",
        ignore_index: int = 255,
        rgb_masks: bool = False,
        classes_file: Path | None = None,
    ) -> None:
        self.files = list(files)
        self.classes, self.palette = list(classes), [tuple(colour) for colour in palette]
        self.decode, self.transform, self.name, self.ignore_index = decode, transform, name, ignore_index
        self.rgb_masks, self.classes_file = rgb_masks, classes_file

    def __len__(self) -> int:
        return len(self.files)

    def labels(self, index: int) -> np.ndarray:
        """Train ids of item ``index`` (H, W) uint8; a value that is neither a class nor ignored is a DataError."""
        path = self.files[index][1]
        labels = self.decode(read_mask_array(path, self.rgb_masks), path)
        bad = (labels >= len(self.classes)) & (labels != self.ignore_index)
        if bad.any():
            values = np.unique(labels[bad])
            shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise DataError(
                f"{path} holds label{'s' if len(values) > 1 else ''} {shown}, but {self.name} has "
                f"{len(self.classes)} classes (0..{len(self.classes) - 1}; {self.ignore_index} is ignored)"
            )
        return labels

    def __getitem__(self, index: int):
        image_path, mask_path = self.files[index]
        image = load_rgb(image_path)
        try:
            labels = self.labels(index)
        except DataError as err:
            raise ItemError(str(err)) from None
        if (labels.shape[1], labels.shape[0]) != image.size:
            raise ItemError(size_mismatch(mask_path, labels.shape[1], labels.shape[0], image_path, *image.size))
        mask = Image.fromarray(labels, mode="L")
        return self.transform(image, mask) if self.transform else (image, mask)

    def check_all_labels(self) -> None:
        """Reads every mask now; raises a DataError naming the first with a bad label value."""
        with ThreadPoolExecutor(max_workers=_workers()) as pool:
            errors = list(pool.map(self._label_problem, range(len(self))))
        for error in errors:
            if error is not None:
                raise DataError(error)

    def _label_problem(self, index: int) -> str | None:
        try:
            self.labels(index)
        except DataError as err:
            return str(err)
        return None


def _workers() -> int:
    return min(16, 4 * (os.cpu_count() or 1))


def size_mismatch(mask: Path, mask_w: int, mask_h: int, image: Path, image_w: int, image_h: int) -> str:
    return f"{mask} is {mask_w}x{mask_h} pixels but its image {image} is {image_w}x{image_h}"


def pair_up(images: Sequence[Path], mask_of: Callable[[Path], Path], where: str, hint: str = "") -> list[Pair]:
    """(image, mask) pairs of ``images``; an empty list or an image whose mask file is missing is a DataError.

    Args:
        images: The split's image files.
        mask_of: The mask path an image should have.
        where: The folder or list file the images come from, for messages.
        hint: Added to the message of a missing mask (how to make the masks).
    """
    if not images:
        raise DataError(f"no images in {where}")
    pairs = [(image, mask_of(image)) for image in images]
    missing = [pair for pair in pairs if not pair[1].is_file()]
    if missing:
        image, mask = missing[0]
        count = f"; {len(missing)} of {len(pairs)} images in {where} have none" if len(missing) > 1 else ""
        raise DataError(f"{image} has no mask ({mask} does not exist){count}{hint}")
    return pairs


def check_pairs(pairs: Sequence[Pair], where: str, skip_bad_images: bool = False) -> list[Pair]:
    """The readable pairs, after checking every image and mask file is readable and each mask has its image's size.

    Args:
        pairs: (image, mask) pairs from :func:`pair_up`.
        where: What holds them, for messages.
        skip_bad_images: Leave pairs with an unreadable image or mask out (logged) instead of failing.

    Raises:
        DataError: The first unreadable file (unless skipped), or the first mask whose size differs from its image.
    """
    keep = screen_images([image for image, _ in pairs], where, skip_bad_images)
    pairs = [pairs[i] for i in keep]
    keep = screen_images([mask for _, mask in pairs], str(pairs[0][1].parent) if pairs else where, skip_bad_images)
    pairs = [pairs[i] for i in keep]
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        sizes = list(pool.map(lambda pair: (header_size(pair[0]), header_size(pair[1])), pairs))
    for (image, mask), (image_size, mask_size) in zip(pairs, sizes):
        if image_size != mask_size:
            raise DataError(size_mismatch(mask, *mask_size, image, *image_size))
    return pairs


def files_with_suffix(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """The files directly in ``folder`` whose names end with one of ``suffixes`` (case-insensitive), sorted."""
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist (or is not a folder)")
    lowered = tuple(suffix.lower() for suffix in suffixes)
    return sorted(path for path in folder.iterdir() if path.is_file() and path.name.lower().endswith(lowered))
