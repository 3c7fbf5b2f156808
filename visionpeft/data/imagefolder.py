"""Any ImageFolder tree: ``root/<split>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets

from ..errors import DataError
from ..registry import DATASETS
from .images import load_rgb, screen_images


@DATASETS.register("imagefolder")
def imagefolder(split: str, root: str | None = None, transform=None, skip_bad_images: bool = False, **_):
    """``root/<split>/<class>/*.jpg`` (classes sorted by folder name). Every file is checked when the dataset is
    built: an unreadable one is a :class:`DataError`, or, with ``skip_bad_images``, left out."""
    if root is None:
        raise DataError("imagefolder needs data.root (a folder with one sub-folder per split)")
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        raise DataError(f"image folder split {folder} does not exist")
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"{folder}: {str(err).splitlines()[0]}") from None
    keep = screen_images([path for path, _ in dataset.samples], str(folder), bool(skip_bad_images))
    if len(keep) < len(dataset.samples):
        dataset.samples = [dataset.samples[i] for i in keep]
        dataset.imgs = dataset.samples
        dataset.targets = [label for _, label in dataset.samples]
    return dataset
