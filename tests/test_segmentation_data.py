"""Segmentation datasets: the texture mosaic (determinism, disjoint sources, regions), the file layouts of
ADE20K / VOC / Cityscapes / imagefolder-seg, and one clear DataError naming the file for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpeft.data.images import ItemError, WorkerSafe
from visionpeft.data.mini import TEXTURES, texture_photo, to_uint8
from visionpeft.data.segmentation import SEGMENTATION_DATASETS, build_segmentation_dataset
from visionpeft.data.segmentation.classes import default_palette
from visionpeft.data.segmentation.files import reduce_zero_label_table
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
            photo = to_uint8(texture_photo(window.texture))
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


# --- file layouts ---------------------------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int] = (20, 16), seed: int = 0) -> Path:
    """A small random RGB image (``size`` = width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, labels: np.ndarray, mode: str = "L") -> Path:
    """A mask PNG of ``labels``: ``L`` (values), ``P`` (palette indices, VOC's colours) or ``RGB`` (colours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        mask = Image.fromarray(labels.astype(np.uint8), mode="P")
        mask.putpalette([c for colour in default_palette(256) for c in colour])
    else:
        mask = Image.fromarray(labels.astype(np.uint8), mode=mode)
    mask.save(path)
    return path


def labels_of(size: tuple[int, int], values: list[int]) -> np.ndarray:
    """(height, width) label map whose columns cycle through ``values``."""
    width, height = size
    return np.tile(np.array(values, np.uint8)[np.arange(width) % len(values)], (height, 1))


def ade_root(tmp_path: Path, values: list[int], count: int = 2, part: str = "training") -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for i in range(count):
        write_image(root / "images" / part / f"ADE_{i}.jpg", seed=i)
        write_mask(root / "annotations" / part / f"ADE_{i}.png", labels_of((20, 16), values))
    return root


def test_ade20k_reduce_zero_label(tmp_path):
    root = ade_root(tmp_path, [0, 1, 150, 5, 255])
    data = build_segmentation_dataset("ade20k", "train", root=str(root), num_classes=150)
    assert len(data) == 2 and len(data.classes) == 150 and data.classes[0] == "wall" and data.ignore_index == 255
    assert len(data.palette) == 150 and data.files[0][1].name == "ADE_0.png"
    image, mask = data[0]
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (20, 16)
    assert np.array_equal(np.asarray(mask)[0, :5], [255, 0, 149, 4, 255])
    assert reduce_zero_label_table()[[0, 1, 2, 150, 254, 255]].tolist() == [255, 0, 1, 149, 253, 255]


def test_ade20k_without_reduce_zero_label_keeps_values_and_checks_them_when_read(tmp_path):
    root = ade_root(tmp_path, [0, 1, 150])
    data = build_segmentation_dataset("ade20k", "train", root=str(root), reduce_zero_label=False)  # lazy: builds
    with pytest.raises(ItemError, match=r"ADE_0\.png holds label 150, but ade20k has 150 classes \(0\.\.149"):
        data[0]
    with pytest.raises(DataError, match=r"ADE_0\.png holds label 150"):
        build_segmentation_dataset("ade20k", "train", root=str(root), reduce_zero_label=False, check_labels=True)


def test_ade20k_val_split_and_unknown_split(tmp_path):
    root = ade_root(tmp_path, [1, 2], count=1, part="validation")
    assert len(build_segmentation_dataset("ade20k", "val", root=str(root))) == 1
    with pytest.raises(DataError, match="images/training does not exist"):
        build_segmentation_dataset("ade20k", "train", root=str(root))
    with pytest.raises(DataError, match="not 'test'"):
        build_segmentation_dataset("ade20k", "test", root=str(root))


def voc_root(tmp_path: Path, ids: list[str], values: list[int], masks: str = "SegmentationClass") -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for i, image_id in enumerate(ids):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", seed=i)
        write_mask(root / masks / f"{image_id}.png", labels_of((20, 16), values), mode="P")
    return root


def write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{image_id}\n" for image_id in ids))


def test_voc_palette_pngs_are_read_as_indices_with_255_kept(tmp_path):
    root = voc_root(tmp_path, ["2007_000032", "2007_000039"], [0, 15, 255, 20])
    write_list(root / "ImageSets" / "Segmentation" / "train.txt", ["2007_000032", "2007_000039"])
    data = build_segmentation_dataset("voc2012", "train", root=str(root), num_classes=21)
    assert data.classes[15] == "person" and data.palette[15] == (192, 128, 128)
    assert Image.open(data.files[0][1]).mode == "P"
    assert np.array_equal(np.asarray(data[1][1])[3, :4], [0, 15, 255, 20])


def test_voc_augmented_training_set(tmp_path):
    root = voc_root(tmp_path, ["a", "b", "c"], [0, 3], masks="SegmentationClassAug")
    lists = root / "ImageSets" / "Segmentation"
    write_list(
        lists / "train_aug.txt", [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in "abc"]
    )  # DeepLab
    write_list(lists / "train.txt", ["a"])
    with pytest.raises(DataError, match=r"SegmentationClass/a\.png does not exist"):
        build_segmentation_dataset("voc2012", "train", root=str(root))  # plain VOC masks are missing
    data = build_segmentation_dataset("voc2012", "train", root=str(root), aug=True)
    assert len(data) == 3 and data.files[2][1].parent.name == "SegmentationClassAug"
    (lists / "train_aug.txt").unlink()
    with pytest.raises(DataError, match="train_aug.txt or aug.txt"):
        build_segmentation_dataset("voc2012", "train", root=str(root), aug=True)


def test_voc_listed_image_missing(tmp_path):
    root = voc_root(tmp_path, ["a"], [0])
    write_list(root / "ImageSets" / "Segmentation" / "val.txt", ["a", "zz"])
    with pytest.raises(DataError, match=r"JPEGImages/zz\.jpg \(listed in .*val\.txt\) does not exist"):
        build_segmentation_dataset("voc2012", "val", root=str(root))


def cityscapes_root(tmp_path: Path, masks: bool = True) -> Path:
    root = tmp_path / "cityscapes"
    for i, city in enumerate(["aachen", "bochum"]):
        stem = f"{city}_000000_000019"
        write_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", seed=i)
        write_mask(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", labels_of((20, 16), [7, 8]))
        if masks:
            write_mask(
                root / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png",
                labels_of((20, 16), [0, 1, 18, 255]),
            )
    return root


def test_cityscapes_reads_train_ids(tmp_path):
    data = build_segmentation_dataset("cityscapes", "train", root=str(cityscapes_root(tmp_path)), num_classes=19)
    assert [pair[0].parent.name for pair in data.files] == ["aachen", "bochum"]
    assert data.classes[18] == "bicycle" and data.palette[0] == (128, 64, 128)
    assert np.array_equal(np.asarray(data[0][1])[0, :4], [0, 1, 18, 255])


def test_cityscapes_without_train_id_files_says_how_to_make_them(tmp_path):
    root = cityscapes_root(tmp_path, masks=False)
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("cityscapes", "train", root=str(root))
    message = str(caught.value)
    assert "aachen_000000_000019_leftImg8bit.png has no mask" in message and "csCreateTrainIdLabelImgs" in message
    assert "\n" not in message


def folder_root(tmp_path: Path, classes, mode: str = "L", values=(0, 1, 2, 255)) -> Path:
    root = tmp_path / "seg"
    root.mkdir()
    (root / "classes.json").write_text(json.dumps(classes))
    for i in range(2):
        write_image(root / "train" / "images" / f"img{i}.png", seed=i)
        labels = labels_of((20, 16), list(values))
        if mode == "RGB":
            palette = classes["palette"] + [classes.get("ignore_color", [0, 0, 0])]
            labels = np.array(palette, np.uint8)[np.minimum(labels, len(palette) - 1)]
        write_mask(root / "train" / "masks" / f"img{i}.png", labels, mode=mode)
    return root


def test_imagefolder_seg_index_masks(tmp_path):
    root = folder_root(tmp_path, ["sky", "tree", "road"])
    data = build_segmentation_dataset("imagefolder-seg", "train", root=str(root), num_classes=3)
    assert data.classes == ["sky", "tree", "road"] and data.palette == default_palette(3)
    assert np.array_equal(np.asarray(data[0][1])[0, :4], [0, 1, 2, 255])


def test_imagefolder_seg_colour_masks_through_the_palette(tmp_path):
    spec = {
        "classes": ["sky", "tree", "road"],
        "palette": [[0, 0, 255], [0, 255, 0], [128, 64, 128]],
        "ignore_color": [255, 255, 255],
    }
    root = folder_root(tmp_path, spec, mode="RGB", values=(2, 0, 3, 1))  # 3: the ignore colour
    data = build_segmentation_dataset("imagefolder-seg", "train", root=str(root))
    assert data.palette == [(0, 0, 255), (0, 255, 0), (128, 64, 128)]
    assert np.array_equal(np.asarray(data[1][1])[0, :4], [2, 0, 255, 1])
    with pytest.raises(DataError, match="is a colour mask but mask_format is 'index'"):
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root), mask_format="index")


def test_imagefolder_seg_unknown_colour_names_the_mask(tmp_path):
    spec = {"classes": ["sky", "tree"], "palette": [[0, 0, 255], [0, 255, 0]]}
    root = folder_root(tmp_path, spec, mode="RGB", values=(0, 1))
    pixels = np.asarray(Image.open(root / "train" / "masks" / "img1.png")).copy()
    pixels[5, 7] = (9, 9, 9)
    Image.fromarray(pixels).save(root / "train" / "masks" / "img1.png")
    with pytest.raises(DataError, match=r"img1\.png has colour \[9, 9, 9\] at x=7, y=5, which is not in the palette"):
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root))


def test_imagefolder_seg_colour_masks_need_a_palette(tmp_path):
    root = folder_root(tmp_path, {"classes": ["a", "b"], "palette": [[1, 1, 1], [2, 2, 2]]}, mode="RGB", values=(0,))
    (root / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match=r"img0\.png is a colour mask, but .*classes\.json has no 'palette'"):
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON"),
        ("[]", "non-empty list"),
        ('["a", "a"]', "repeat"),
        ('{"classes": ["a"], "palette": [[1, 2]]}', "three integers"),
        ('{"names": []}', "'classes'"),
    ],
)
def test_imagefolder_seg_bad_classes_file(tmp_path, content, message):
    root = folder_root(tmp_path, ["a", "b", "c"])
    (root / "classes.json").write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root))
    assert "classes.json" in str(caught.value)


# --- bad input: one line naming the file ------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo, *names: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


def test_mask_of_another_size_names_both_files(tmp_path):
    root = ade_root(tmp_path, [1, 2])
    write_mask(root / "annotations" / "training" / "ADE_1.png", labels_of((21, 16), [1]))
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("ade20k", "train", root=str(root))
    assert "is 21x16 pixels but its image" in one_line(caught, "ADE_1.png", "ADE_1.jpg")


def test_label_beyond_the_classes_names_the_mask(tmp_path):
    root = folder_root(tmp_path, ["a", "b"], values=(0, 1, 7, 255))
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root))
    assert "holds label 7" in one_line(caught, "img0.png", "classes.json")


def test_image_without_mask_names_the_image(tmp_path):
    root = ade_root(tmp_path, [1, 2], count=3)
    (root / "annotations" / "training" / "ADE_1.png").unlink()
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("ade20k", "train", root=str(root))
    one_line(caught, "ADE_1.jpg has no mask", "annotations/training/ADE_1.png does not exist")


def test_empty_split_names_the_folder(tmp_path):
    root = ade_root(tmp_path, [1], count=0)
    (root / "images" / "training").mkdir(parents=True)
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("ade20k", "train", root=str(root))
    one_line(caught, "no images in", "images/training")


def test_num_classes_disagreeing_names_the_classes_file(tmp_path):
    root = folder_root(tmp_path, ["a", "b", "c"])
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root), num_classes=4)
    one_line(caught, "num_classes is 4", "classes.json has 3 classes")


@pytest.mark.parametrize("which", ["image", "mask"])
def test_corrupt_file_is_named(tmp_path, which):
    root = folder_root(tmp_path, ["a", "b", "c"])
    bad = root / "train" / ("images" if which == "image" else "masks") / "img1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as caught:
        build_segmentation_dataset("imagefolder-seg", "train", root=str(root))
    one_line(caught, f"{bad} is not a readable image")
    data = build_segmentation_dataset("imagefolder-seg", "train", root=str(root), skip_bad_images=True)
    assert [image.name for image, _ in data.files] == ["img0.png"]


def test_a_bad_label_read_in_a_loader_worker_stays_one_line(tmp_path):
    from torch.utils.data import DataLoader

    root = ade_root(tmp_path, [0, 151])
    data = WorkerSafe(build_segmentation_dataset("ade20k", "train", root=str(root), reduce_zero_label=False))
    assert len(data.palette) == len(data.classes) == 150 and data.ignore_index == 255 and len(data.files) == 2
    loader = DataLoader(data, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert one_line(caught, "ADE_0.png holds label 151").startswith(str(root))
