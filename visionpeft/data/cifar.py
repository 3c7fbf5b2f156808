"""CIFAR-10 / CIFAR-100 through torchvision: an existing root, or a download when ``download=True``."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets

from ..errors import DataError
from ..registry import DATASETS

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _cifar(name: str, cls, split: str, root: str | None, transform, download: bool = False, **_):
    if split not in ("train", "test"):
        raise DataError(f"{name} has the splits train and test, not '{split}'")
    root_path = Path(root or "data").expanduser()
    present = (root_path / _FOLDERS[name]).is_dir()
    if not present and not download:
        raise DataError(
            f"{name} not found under {root_path} (expected {_FOLDERS[name]}/); point data.root at a folder holding "
            f"it, or set data.download=true"
        )
    try:
        dataset = cls(str(root_path), train=split == "train", transform=transform, download=download and not present)
    except (OSError, RuntimeError) as err:  # torchvision raises these for network failures and corrupt archives
        raise DataError(
            f"could not {'download' if download and not present else 'read'} {name} into {root_path} "
            f"({str(err).splitlines()[0][:120]}); copy the {_FOLDERS[name]}/ folder there and set data.root"
        ) from None
    return dataset


@DATASETS.register("cifar10")
def cifar10(split: str, root: str | None = None, transform=None, **options):
    """CIFAR-10 (torchvision layout ``cifar-10-batches-py/``)."""
    return _cifar("cifar10", datasets.CIFAR10, split, root, transform, **options)


@DATASETS.register("cifar100")
def cifar100(split: str, root: str | None = None, transform=None, **options):
    """CIFAR-100 (torchvision layout ``cifar-100-python/``)."""
    return _cifar("cifar100", datasets.CIFAR100, split, root, transform, **options)
