"""The benchmark datasets in their official folder layouts: ADE20K (SceneParsing ``ADEChallengeData2016``), PASCAL
VOC 2012 (+ optional SBD augmentation) and Cityscapes (fine annotations, train ids). ``datasets/`` says where to
get each; nothing is downloaded here. Checks: see :mod:`.files`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...errors import DataError
from ...registry import SEGMENTATION_DATASETS
from .classes import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    default_palette,
)
from .files import (
    SegmentationFiles,
    check_pairs,
    files_with_suffix,
    identity_table,
    lookup_decoder,
    pair_up,
    reduce_zero_label_table,
)


def _root(name: str, root: str | None, layout: str) -> Path:
    if root is None:
        raise DataError(f"{name} needs data.root ({layout})")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"{name} root {folder} does not exist ({layout})")
    return folder


def _split(name: str, split: str, folders: dict[str, str]) -> str:
    """The dataset's own folder / list name of ``split``."""
    if split in folders:
        return folders[split]
    if split in folders.values():
        return split
    known = ", ".join(folders)
    raise DataError(f"{name} has the splits {known}, not '{split}'")


def _finish(dataset: SegmentationFiles, check_labels: bool) -> SegmentationFiles:
    if check_labels:
        dataset.check_all_labels()
    return dataset


@SEGMENTATION_DATASETS.register("ade20k")
def ade20k(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    reduce_zero_label: bool = True,
    skip_bad_images: bool = False,
    check_labels: bool = False,
    **_,
) -> SegmentationFiles:
    """ADE20K SceneParsing: ``root`` = ``ADEChallengeData2016`` with ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png`` (same stem). Splits ``train`` / ``val``. With ``reduce_zero_label``
    (the benchmark's protocol) stored 0 ("other") is ignored and k is class k - 1 of the 150; without it, stored
    values are the train ids (for masks already shifted)."""
    layout = "the ADEChallengeData2016 folder with images/ and annotations/"
    folder = _root("ade20k", root, layout)
    part = _split("ade20k", split, {"train": "training", "val": "validation"})
    images = files_with_suffix(folder / "images" / part, (".jpg", ".jpeg"))
    where = str(folder / "images" / part)
    pairs = check_pairs(
        pair_up(images, lambda image: folder / "annotations" / part / f"{image.stem}.png", where),
        where,
        skip_bad_images,
    )
    table = reduce_zero_label_table() if reduce_zero_label else identity_table()
    dataset = SegmentationFiles(
        pairs, ADE20K_CLASSES, default_palette(len(ADE20K_CLASSES)), lookup_decoder(table), transform, name="ade20k"
    )
    return _finish(dataset, check_labels)


def _voc_list(folder: Path, names: tuple[str, ...]) -> Path:
    lists = folder / "ImageSets" / "Segmentation"
    for name in names:
        if (lists / name).is_file():
            return lists / name
    raise DataError(f"{lists} has no {' or '.join(names)} (the split's list of image ids)")


@SEGMENTATION_DATASETS.register("voc2012")
def voc2012(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    aug: bool = False,
    skip_bad_images: bool = False,
    check_labels: bool = False,
    **_,
) -> SegmentationFiles:
    """PASCAL VOC 2012: ``root`` = ``VOCdevkit/VOC2012`` with ``JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png`` (palette PNGs whose indices are the labels; 255 = object borders, ignored) and
    ``ImageSets/Segmentation/{train,val,trainval}.txt``. ``aug=True`` trains on the SBD-augmented set: the list
    ``train_aug.txt`` (or mmseg's ``aug.txt``) and masks from ``SegmentationClassAug/``; ``val`` stays VOC's."""
    folder = _root("voc2012", root, "the VOCdevkit/VOC2012 folder with JPEGImages/ and SegmentationClass/")
    part = _split("voc2012", split, {"train": "train", "val": "val", "trainval": "trainval"})
    augmented = aug and part != "val"
    listing = _voc_list(folder, ("train_aug.txt", "aug.txt") if augmented else (f"{part}.txt",))
    masks = folder / ("SegmentationClassAug" if augmented else "SegmentationClass")
    if augmented and not masks.is_dir():
        raise DataError(f"aug=true needs the SBD masks in {masks} (see datasets/segmentation.md)")
    # an id per line (VOC, mmseg's aug.txt) or "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png" (DeepLab's)
    ids = [Path(line.split()[0]).stem for line in listing.read_text().splitlines() if line.strip()]
    images = [folder / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
    missing = [image for image in images if not image.is_file()]
    if missing:
        raise DataError(f"{missing[0]} (listed in {listing}) does not exist")
    pairs = check_pairs(
        pair_up(images, lambda image: masks / f"{image.stem}.png", str(listing)), str(listing), skip_bad_images
    )
    dataset = SegmentationFiles(
        pairs,
        VOC_CLASSES,
        default_palette(len(VOC_CLASSES)),
        lookup_decoder(identity_table()),
        transform,
        name="voc2012",
    )
    return _finish(dataset, check_labels)


CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_MASK_SUFFIX = "_gtFine_labelTrainIds.png"
CITYSCAPES_HINT = (
    "; make the *_labelTrainIds.png files with cityscapesscripts: "
    "CITYSCAPES_DATASET=<root> csCreateTrainIdLabelImgs (pip install cityscapesscripts)"
)


@SEGMENTATION_DATASETS.register("cityscapes")
def cityscapes(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    check_labels: bool = False,
    **_,
) -> SegmentationFiles:
    """Cityscapes, fine annotations: ``root`` holds ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
    ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 ignored), the files cityscapesscripts'
    ``createTrainIdLabelImgs`` writes from the polygons."""
    folder = _root("cityscapes", root, "the folder with leftImg8bit/ and gtFine/")
    part = _split("cityscapes", split, {"train": "train", "val": "val"})
    image_root = folder / "leftImg8bit" / part
    if not image_root.is_dir():
        raise DataError(f"{image_root} does not exist (the cityscapes root holds leftImg8bit/ and gtFine/)")
    images = sorted(image_root.glob(f"*/*{CITYSCAPES_IMAGE_SUFFIX}"))

    def mask_of(image: Path) -> Path:
        stem = image.name[: -len(CITYSCAPES_IMAGE_SUFFIX)]
        return folder / "gtFine" / part / image.parent.name / f"{stem}{CITYSCAPES_MASK_SUFFIX}"

    pairs = check_pairs(pair_up(images, mask_of, str(image_root), CITYSCAPES_HINT), str(image_root), skip_bad_images)
    dataset = SegmentationFiles(
        pairs, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, lookup_decoder(identity_table()), transform, name="cityscapes"
    )
    return _finish(dataset, check_labels)
