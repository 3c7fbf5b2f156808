"""``imagefolder-seg``: a user's own segmentation data in plain folders.

Layout::

    root/classes.json                       the classes (below)
    root/<split>/images/<stem>.jpg|.jpeg|.png
    root/<split>/masks/<stem>.png           one mask per image, same stem, same size

``classes.json`` is either a list of class names, or an object ``{"classes": [...], "palette": [[r, g, b], ...],
"ignore_color": [r, g, b]}`` (``palette`` one colour per class, ``ignore_color`` optional).

Masks are read by their PNG mode (``mask_format="auto"``): a one-channel mask (``L``, or a palette ``P`` PNG read as
its indices, as VOC's are) holds class indices, 255 = ignored; an RGB(A) mask holds colours, mapped to classes through
``palette`` (``ignore_color`` pixels are ignored; any other colour is an error naming the file). ``mask_format``
``"index"`` insists on one channel; ``"color"`` reads every mask's colours (palette PNGs too). Every mask's values
are checked when the dataset is built (``check_labels``, on by default here).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...registry import SEGMENTATION_DATASETS
from .classes import default_palette
from .files import (
    MaskDecoder,
    SegmentationFiles,
    check_pairs,
    files_with_suffix,
    identity_table,
    lookup_decoder,
    pair_up,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_FORMATS = ("auto", "index", "color")


def _colour(value: object, where: str) -> tuple[int, int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(c, int) for c in value)):
        raise DataError(f"{where}: a colour is a list of three integers [r, g, b], got {value!r}")
    if not all(0 <= c <= 255 for c in value):
        raise DataError(f"{where}: colour values are 0..255, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


def read_classes(path: Path) -> tuple[list[str], list[tuple[int, int, int]] | None, tuple[int, int, int] | None]:
    """(class names, palette or None, ignore colour or None) from ``classes.json``."""
    if not path.is_file():
        raise DataError(f"{path} does not exist (imagefolder-seg needs a list of class names there)")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({str(err).splitlines()[0]})") from None
    spec = {"classes": spec} if isinstance(spec, list) else spec
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list):
        raise DataError(f"{path} must hold a list of class names or an object with 'classes'")
    classes = spec["classes"]
    if not classes or not all(isinstance(name, str) and name for name in classes):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise DataError(f"{path}: class names repeat")
    if len(classes) > 255:
        raise DataError(f"{path} lists {len(classes)} classes; masks hold at most 255 (255 is the ignore index)")
    palette = spec.get("palette")
    if palette is not None:
        if not isinstance(palette, list) or len(palette) != len(classes):
            raise DataError(f"{path}: 'palette' needs one [r, g, b] per class ({len(classes)})")
        palette = [_colour(colour, str(path)) for colour in palette]
        if len(set(palette)) != len(palette):
            raise DataError(f"{path}: two classes share a palette colour")
    ignore = spec.get("ignore_color")
    ignore = _colour(ignore, str(path)) if ignore is not None else None
    if ignore is not None and palette is not None and ignore in palette:
        raise DataError(f"{path}: ignore_color {list(ignore)} is also a class colour")
    return classes, palette, ignore


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def mask_decoder(
    mask_format: str,
    palette: Sequence[tuple[int, int, int]] | None,
    ignore: tuple[int, int, int] | None,
    classes_file: Path,
    ignore_index: int = 255,
) -> MaskDecoder:
    """Turns index or colour masks into train ids, as ``mask_format`` says (see the module docstring)."""
    from_indices = lookup_decoder(identity_table())
    colours = np.array([], np.int64) if palette is None else _pack(np.array(palette))
    order = np.argsort(colours)
    sorted_colours, sorted_labels = colours[order], order.astype(np.uint8)

    def from_colours(values: np.ndarray, path: Path) -> np.ndarray:
        if palette is None:
            raise DataError(f"{path} is a colour mask, but {classes_file} has no 'palette' to map colours to classes")
        packed = _pack(values[..., :3])
        slot = np.searchsorted(sorted_colours, packed).clip(0, len(sorted_colours) - 1)
        known = sorted_colours[slot] == packed
        labels = np.where(known, sorted_labels[slot], ignore_index).astype(np.uint8)
        unknown = ~known if ignore is None else ~known & (packed != _pack(np.array(ignore)))
        if unknown.any():
            row, col = np.argwhere(unknown)[0]
            colour = [int(c) for c in values[row, col, :3]]
            raise DataError(
                f"{path} has colour {colour} at x={col}, y={row}, which is not in the palette of {classes_file}"
            )
        return labels

    def decode(values: np.ndarray, path: Path) -> np.ndarray:
        colour = values.ndim == 3
        if mask_format == "index" and colour:
            raise DataError(f"{path} is a colour mask but mask_format is 'index' (one channel of class indices)")
        return from_colours(values, path) if colour else from_indices(values, path)

    return decode


@SEGMENTATION_DATASETS.register("imagefolder-seg")
def imagefolder_seg(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    mask_format: str = "auto",
    skip_bad_images: bool = False,
    check_labels: bool = True,
    **_,
) -> SegmentationFiles:
    """``root/<split>/images`` + ``root/<split>/masks`` with ``root/classes.json``; see the module docstring."""
    if root is None:
        raise DataError("imagefolder-seg needs data.root (a folder with classes.json and one sub-folder per split)")
    if mask_format not in MASK_FORMATS:
        raise DataError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, not '{mask_format}'")
    folder = Path(root).expanduser()
    classes_file = folder / "classes.json"
    classes, palette, ignore = read_classes(classes_file)
    image_folder = folder / split / "images"
    if not image_folder.is_dir():
        raise DataError(f"{image_folder} does not exist (imagefolder-seg reads root/<split>/images and masks)")
    images = files_with_suffix(image_folder, IMAGE_SUFFIXES)
    where = str(image_folder)
    pairs = pair_up(images, lambda image: folder / split / "masks" / f"{image.stem}.png", where)
    stems = [image.stem for image, _ in pairs]
    if len(set(stems)) != len(stems):
        twice = next(stem for stem in stems if stems.count(stem) > 1)
        raise DataError(f"{image_folder} has two images named {twice}.* for the one mask {twice}.png")
    pairs = check_pairs(pairs, where, skip_bad_images)
    dataset = SegmentationFiles(
        pairs,
        classes,
        palette or default_palette(len(classes)),
        mask_decoder(mask_format, palette, ignore, classes_file),
        transform,
        name=str(classes_file),
        rgb_masks=mask_format == "color",
        classes_file=classes_file,
    )
    if check_labels:
        dataset.check_all_labels()
    return dataset
