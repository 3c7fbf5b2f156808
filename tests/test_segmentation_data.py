"""Segmentation datasets: the texture mosaic (determinism, disjoint sources, regions), the file layouts of
ADE20K / VOC / Cityscapes / imagefolder-seg, and one clear DataError naming the file for each bad input."""

from __future__ import annotations

import numpy as np
import pytest

from visionpeft.data.mini import TEXTURES, _to_uint8, texture_photo
from visionpeft.data.segmentation import SEGMENTATION_DATASETS, build_segmentation_dataset
from visionpeft.errors import ConfigError, DataError


def mosaic(split: str, **options):
    return build_segmentation_dataset("texture-mosaic", split, **options)


def test_mosaic_items_are_rgb_images_with_l_masks_of_the_same_size():
    data = mosaic("train", n=5, size=48)
    assert len(data) == 5 and data.classes == list(TEXTURES) and data.ignore_index == 255
    assert len(data.palette) == 6 and len(set(data.palette)) == 6
    image, mask = data[0]
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (48, 48)


def test_mosaic_is_deterministic_for_a_seed():
    first, again, other = mosaic("train", n=20), mosaic("train", n=20), mosaic("train", n=20, seed=1)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)
    assert first.provenance == again.provenance
    assert not np.array_equal(first.images, other.images)
    assert not np.array_equal(first.images[:20], mosaic("val", n=20).images)  # val: another stream


def test_mosaic_defaults_and_speed():
    import time

    start = time.perf_counter()
    sizes = {split: len(mosaic(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 600, "val": 100, "test": 200}
    assert time.perf_counter() - start < 10  # a couple of seconds on a loaded CPU


def test_mosaic_train_and_test_copy_from_disjoint_halves_of_each_photograph():
    for split in ("train", "val", "test"):
        data = mosaic(split, n=60)
        for windows in data.provenance:
            for window in windows:
                half = texture_photo(window.texture).shape[1] // 2
                if split == "test":
                    assert window.left >= half
                else:
                    assert window.left + window.size <= half


def test_mosaic_pixels_are_the_recorded_windows_of_the_labelled_texture():
    data = mosaic("test", n=10, size=40)
    names = list(TEXTURES)
    for image, mask, windows in zip(data.images, data.masks, data.provenance):
        assert sorted(np.unique(mask)) == sorted(names.index(w.texture) for w in windows)
        for window in windows:
            inside = mask == names.index(window.texture)
            photo = _to_uint8(texture_photo(window.texture))
            source = photo[window.top : window.top + 40, window.left : window.left + 40]
            assert np.array_equal(image[inside], source[inside])


def test_mosaic_has_between_min_and_max_regions():
    counts = [len(np.unique(mask)) for mask in mosaic("train", n=200).masks]
    assert min(counts) == 2 and max(counts) == 5
    assert {len(np.unique(mask)) for mask in mosaic("val", n=30, min_regions=3, max_regions=3).masks} == {3}


@pytest.mark.parametrize(
    "options",
    [{"max_regions": 7}, {"min_regions": 4, "max_regions": 3}, {"size": 300}, {"size": 4}, {"n": 0}],
)
def test_mosaic_refuses_options_it_cannot_satisfy(options):
    with pytest.raises(DataError, match="texture-mosaic"):
        mosaic("train", **options)


def test_mosaic_unknown_split():
    with pytest.raises(DataError, match="'training'"):
        mosaic("training")


def test_unknown_dataset_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'texture-mosaic'"):
        build_segmentation_dataset("texture_mosaic", "train")
    assert "texture-mosaic" in SEGMENTATION_DATASETS


def test_num_classes_must_agree_with_the_dataset():
    assert len(mosaic("val", n=2, num_classes=6).classes) == 6
    with pytest.raises(DataError, match="num_classes is 5 but texture-mosaic has 6 classes"):
        mosaic("val", n=2, num_classes=5)


def test_mosaic_with_a_transform_gives_tensors():
    from visionpeft.data.segmentation import SegmentationTransform

    data = mosaic("val", n=3, transform=SegmentationTransform(False, scale=(64, 64)))
    image, mask = data[0]
    assert tuple(image.shape) == (3, 64, 64) and tuple(mask.shape) == (64, 64)
    assert int(mask.max()) < 6
