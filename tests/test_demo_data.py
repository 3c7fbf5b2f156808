"""The demo's data: FractalDB-style categories and the mini tasks that ship with scikit-learn / scikit-image."""

from __future__ import annotations

import numpy as np
import pytest

from visionpeft.demo import fractal
from visionpeft.demo.fractal import FractalDB, category_system, filling_rate
from visionpeft.errors import DataError
from visionpeft.registry import DATASETS

MINI = ("digits", "textures", "faces")


@pytest.mark.parametrize("name", MINI)
def test_mini_task_splits_are_fixed_disjoint_and_cover_every_class(name):
    builder = DATASETS.get(name)
    splits = {s: builder(s) for s in ("train", "val", "test")}
    assert np.array_equal(splits["train"].images, builder("train").images)
    keys = {s: {d.images[i].tobytes() for i in range(len(d))} for s, d in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    for split in splits.values():
        assert set(split.targets) == set(range(len(split.classes)))
    image, label = splits["test"][0]
    assert image.mode == "RGB" and isinstance(label, int)


def test_mini_tasks_are_what_the_notes_say():
    assert [len(DATASETS.get("digits")(s)) for s in ("train", "val", "test")] == [1078, 359, 360]
    assert DATASETS.get("textures")("train").classes[:3] == ["brick", "grass", "gravel"]
    assert DATASETS.get("faces")("train").classes == ["face", "non_face"]  # the packaged LFW subset has no names
    with pytest.raises(DataError, match="splits"):
        DATASETS.get("digits")("validation")


def test_fractals_are_deterministic_and_categories_differ():
    a, b = FractalDB(categories=3, instances=2), FractalDB(categories=3, instances=2)
    assert np.array_equal(np.asarray(a[4][0]), np.asarray(b[4][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[2][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(FractalDB(3, 2, seed=1)[0][0]))


def test_fractal_val_instances_are_new_images_of_the_training_categories():
    builder = DATASETS.get("fractaldb")
    train = builder("train", categories=4, instances=6, val_instances=3)
    val = builder("val", categories=4, instances=6, val_instances=3)
    assert len(train) == 24 and len(val) == 12 and train.classes == val.classes
    seen = {np.asarray(train[i][0]).tobytes() for i in range(len(train))}
    assert not seen & {np.asarray(val[i][0]).tobytes() for i in range(len(val))}
    assert [val[i][1] for i in range(0, 12, 3)] == [0, 1, 2, 3]


def test_every_category_passes_the_filling_rate_test():
    for category in range(20):
        maps, probs = category_system(category)
        assert np.isclose(probs.sum(), 1.0) and maps.shape[1] == 6
        assert all(np.linalg.svd(m[:4].reshape(2, 2), compute_uv=False)[0] <= 0.95 + 1e-9 for m in maps)
        assert filling_rate(maps, probs, np.random.default_rng(category)) >= fractal.MIN_FILL / 2
    segment = np.array([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5, 0.0]])  # a line: degenerate
    assert filling_rate(segment, np.array([0.5, 0.5]), np.random.default_rng(0)) < fractal.MIN_FILL
