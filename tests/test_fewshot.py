"""Few-shot sampling and the base-to-new split."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from visionpeft.data.fewshot import base_new_split, few_shot
from visionpeft.errors import DataError


class Toy(Dataset):
    classes = ["a", "b", "c", "d", "e"]

    def __init__(self, per_class=10):
        self.targets = [i % 5 for i in range(5 * per_class)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), self.targets[i]


def test_few_shot_takes_k_per_class_reproducibly():
    subset = few_shot(Toy(), shots=4, seed=1)
    assert sorted(subset.targets) == sorted([c for c in range(5) for _ in range(4)])
    assert subset.indices == few_shot(Toy(), shots=4, seed=1).indices
    assert subset.indices != few_shot(Toy(), shots=4, seed=2).indices
    with pytest.raises(DataError, match="fewer than the 11 shots"):
        few_shot(Toy(), shots=11)


def test_base_new_split_renumbers_labels():
    base, new = base_new_split(Toy(), "base"), base_new_split(Toy(), "new")
    assert base.classes == ["a", "b", "c"] and new.classes == ["d", "e"]
    assert set(base.targets) == {0, 1, 2} and set(new.targets) == {0, 1}
    _, label = new[0]
    assert label == 0 and Toy()[new.indices[0]][1] == 3
