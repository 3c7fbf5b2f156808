"""Any ImageFolder tree: ``root/<split>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision import datasets

from ..errors import DataError
from ..registry import DATASETS


def load_rgb(path: str) -> Image.Image:
    """Opens an image as RGB; a corrupt file is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path} is not a readable image ({err.__class__.__name__})") from None


@DATASETS.register("imagefolder")
def imagefolder(split: str, root: str | None = None, transform=None, **_):
    """``root/<split>/<class>/*.jpg`` (classes sorted by folder name)."""
    if root is None:
        raise DataError("imagefolder needs data.root (a folder with one sub-folder per split)")
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DataError(f"image folder split {folder} does not exist")
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"{folder}: {str(err).splitlines()[0]}") from None
