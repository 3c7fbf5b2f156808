"""CIFAR-10 / CIFAR-100 through torchvision: an existing root, or a download when ``download=True``."""

from __future__ import annotations

import pickle
from pathlib import Path

from torchvision import datasets

from ..errors import DataError
from ..registry import DATASETS

_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class _PresenceChecked:
    """torchvision's CIFAR classes verify each batch file's md5 on every load; here presence is enough (the
    downloaded archive's md5 is still verified by torchvision), so re-packed or subset copies load too."""

    def _check_integrity(self) -> bool:
        root = Path(self.root) / self.base_folder
        return all((root / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.is_file():
            raise RuntimeError(f"{path} is missing")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR10(_PresenceChecked, datasets.CIFAR10):
    pass


class CIFAR100(_PresenceChecked, datasets.CIFAR100):
    pass


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
    except (KeyError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"{name} files under {root_path / _FOLDERS[name]} are corrupt ({err!r})") from None
    except (OSError, RuntimeError) as err:  # torchvision raises these for network failures and corrupt archives
        raise DataError(
            f"could not {'download' if download and not present else 'read'} {name} into {root_path} "
            f"({str(err).splitlines()[0][:120]}); copy the {_FOLDERS[name]}/ folder there and set data.root"
        ) from None
    return dataset


@DATASETS.register("cifar10")
def cifar10(split: str, root: str | None = None, transform=None, **options):
    """CIFAR-10 (torchvision layout ``cifar-10-batches-py/``)."""
    return _cifar("cifar10", CIFAR10, split, root, transform, **options)


@DATASETS.register("cifar100")
def cifar100(split: str, root: str | None = None, transform=None, **options):
    """CIFAR-100 (torchvision layout ``cifar-100-python/``)."""
    return _cifar("cifar100", CIFAR100, split, root, transform, **options)
