"""Few-shot subsets and the base-to-new class split of the CoOp / CoCoOp protocol, for any labelled dataset."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from torch.utils.data import Dataset

from ..errors import DataError


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item, read without decoding images where the dataset exposes them."""
    for attr in ("targets", "labels", "_labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return [int(y) for y in labels]
    if hasattr(dataset, "samples"):
        return [int(y) for _, y in dataset.samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


class Subset(Dataset):
    """Items ``indices`` of ``dataset`` with labels remapped by ``label_map`` (keeps ``classes`` in step)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], classes: list[str], label_map: dict[int, int]):
        self.dataset, self.indices, self.classes, self.label_map = dataset, list(indices), classes, label_map
        labels = dataset_labels(dataset)
        self.targets = [label_map[labels[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return image, self.label_map[int(label)]


def few_shot(dataset: Dataset, shots: int, seed: int = 1) -> Subset:
    """``shots`` random items per class (CoOp: 1/2/4/8/16 shots, seeds 1-3).

    Raises:
        DataError: A class has fewer than ``shots`` items.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(dataset_labels(dataset)):
        by_class[label].append(index)
    rng = random.Random(seed)
    chosen = []
    classes = list(dataset.classes)
    for label in sorted(by_class):
        items = by_class[label]
        if len(items) < shots:
            raise DataError(f"class '{classes[label]}' has {len(items)} items, fewer than the {shots} shots asked for")
        chosen += rng.sample(items, shots)
    return Subset(dataset, sorted(chosen), classes, {i: i for i in range(len(classes))})


def base_new_split(dataset: Dataset, part: str) -> Subset:
    """The ``base`` (first half of the classes, rounded up) or ``new`` (the rest) subset, labels renumbered from 0,
    as in CoCoOp's base-to-new generalisation protocol."""
    classes = list(dataset.classes)
    if len(classes) < 2:
        raise DataError(f"the base-to-new class split needs at least 2 classes; the dataset has {len(classes)}")
    half = (len(classes) + 1) // 2
    if part == "base":
        kept = list(range(half))
    elif part == "new":
        kept = list(range(half, len(classes)))
    else:
        raise DataError(f"unknown class split '{part}'; choose base or new")
    label_map = {old: new for new, old in enumerate(kept)}
    indices = [i for i, y in enumerate(dataset_labels(dataset)) if y in label_map]
    return Subset(dataset, indices, [classes[i] for i in kept], label_map)
