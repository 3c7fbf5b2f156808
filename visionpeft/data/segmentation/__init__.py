"""Semantic segmentation data: dataset builders registered in ``visionpeft.registry.SEGMENTATION_DATASETS``, and
the joint image / mask transforms of the mmsegmentation recipes.

A builder is ``fn(split, root=None, transform=None, **options) -> Dataset``. Items are ``(image, mask)``: with no
transform an RGB PIL image and an ``"L"`` PIL mask of the same size whose values are train ids, with
``ignore_index`` (255) on ignored pixels; with a transform, ``transform(image, mask)`` (see
:class:`SegmentationTransform`). Datasets have ``classes``, ``ignore_index`` and ``palette`` (one RGB colour per
class); file-based ones also ``files`` (image path, mask path) pairs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from ...errors import DataError
from ...registry import SEGMENTATION_DATASETS
from . import benchmarks, folder, mosaic  # noqa: F401  (registration)
from .transforms import SegmentationTransform, collate_eval

__all__ = ["SEGMENTATION_DATASETS", "SegmentationTransform", "build_segmentation_dataset", "collate_eval"]


def build_segmentation_dataset(
    name: str, split: str, root: str | None = None, transform: Callable | None = None, **options
) -> Dataset:
    """Builds split ``split`` of the segmentation dataset registered as ``name``.

    Args:
        name: A name in ``SEGMENTATION_DATASETS`` (``ade20k``, ``voc2012``, ``cityscapes``, ``imagefolder-seg``,
            ``texture-mosaic``).
        split: The split (``train``, ``val``, ``test`` where the dataset has it).
        root: The dataset's folder (not used by ``texture-mosaic``).
        transform: A joint ``(image, mask)`` callable, e.g. :class:`SegmentationTransform`; None gives PIL items.
        options: The builder's options. ``num_classes``, when given, must equal the dataset's class count.

    Raises:
        ConfigError: Unknown ``name`` (with the closest known one).
        DataError: The data is missing, malformed, or has another class count than ``num_classes``.
    """
    builder = SEGMENTATION_DATASETS.get(name)
    num_classes = options.pop("num_classes", None)
    dataset = builder(split, root=root, transform=transform, **options)
    if num_classes is not None and int(num_classes) != len(dataset.classes):
        where = getattr(dataset, "classes_file", None) or (f"{name} at {root}" if root else name)
        raise DataError(
            f"num_classes is {num_classes} but {where} has {len(dataset.classes)} classes "
            f"({', '.join(dataset.classes[:5])}{', ...' if len(dataset.classes) > 5 else ''})"
        )
    return dataset
