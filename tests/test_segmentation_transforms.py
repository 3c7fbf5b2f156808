"""The joint segmentation transforms: image and mask stay aligned through resize / crop / flip, the crop honours
cat_max_ratio, padding gives the mask the ignore index, evaluation keeps the mask's own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import tv_tensors

from visionpeft.data.segmentation import SegmentationTransform, collate_eval
from visionpeft.data.segmentation.transforms import CatMaxRatioCrop, KeepRatioResize, keep_ratio_size

COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)], np.uint8)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(autouse=True)
def one_thread():
    """Intra-op threads only slow these small tensors down on a shared machine (DataLoader workers use one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blocks(height: int, width: int, block: int, seed: int) -> np.ndarray:
    """A label map of random ``block`` x ``block`` squares of 5 classes, with a band of ignored pixels."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(COLOURS), (height // block + 1, width // block + 1))
    labels = np.kron(grid, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
    labels[: block // 2] = 255
    return labels


def coloured(labels: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """An image whose colour says each pixel's label (ignored pixels black), and the mask."""
    pixels = np.zeros((*labels.shape, 3), np.uint8)
    known = labels != 255
    pixels[known] = COLOURS[labels[known]]
    return Image.fromarray(pixels), Image.fromarray(labels, mode="L")


def decode(image: torch.Tensor) -> torch.Tensor:
    """The label each pixel's colour stands for (nearest colour), from a normalised image."""
    rgb = (image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]) * 255
    distances = ((rgb[None] - torch.tensor(COLOURS, dtype=torch.float32)[:, :, None, None]) ** 2).sum(1)
    return distances.argmin(0)


def interior(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose (2 radius + 1)-square neighbourhood lies inside the mask and holds one label (not the ignore
    index): bilinear image resizing blends colours near label edges, also edges just outside a crop."""
    values = nnf.pad(mask[None, None].float(), [radius] * 4, value=-1.0)
    size = 2 * radius + 1
    high = nnf.max_pool2d(values, size, stride=1)[0, 0]
    low = -nnf.max_pool2d(-values, size, stride=1)[0, 0]
    return (high == low) & (mask != 255)


def test_train_transform_keeps_image_and_mask_aligned():
    labels = blocks(90, 130, 24, seed=1)
    image, mask = coloured(labels)
    transform = SegmentationTransform(True, crop_size=(64, 64), scale=(160, 80), photometric=False, mean=MEAN, std=STD)
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, y = transform(image, mask)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert y.shape == (64, 64) and y.dtype == torch.long
        inside = interior(y, radius=2)
        assert inside.sum() > 100
        assert torch.equal(decode(x)[inside], y[inside]), f"seed {seed}: image and mask disagree"
        checked += int(inside.sum())
        torch.manual_seed(seed)
        again = transform(image, mask)
        assert torch.equal(again[0], x) and torch.equal(again[1], y)  # the seed decides everything
    assert checked > 10_000


def test_photometric_distortion_changes_only_the_image():
    labels = blocks(64, 64, 16, seed=2)
    image, mask = coloured(labels)
    plain = SegmentationTransform(
        True,
        crop_size=(64, 64),
        scale=(64, 64),
        ratio_range=(1, 1),
        cat_max_ratio=1,
        flip_prob=0,
        photometric=False,
        mean=MEAN,
        std=STD,
    )
    distorted = SegmentationTransform(
        True,
        crop_size=(64, 64),
        scale=(64, 64),
        ratio_range=(1, 1),
        cat_max_ratio=1,
        flip_prob=0,
        photometric=True,
        mean=MEAN,
        std=STD,
    )
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        x0, y0 = plain(image, mask)
        torch.manual_seed(seed)
        x1, y1 = distorted(image, mask)
        assert torch.equal(y0, y1) and torch.equal(y0, torch.from_numpy(labels).long())
        changed += int(not torch.allclose(x0, x1))
    assert changed >= 5


def test_cat_max_ratio_redraws_crops_one_class_dominates():
    labels = torch.zeros(1, 100, 100, dtype=torch.uint8)
    labels[..., 70:] = 1  # a 40 px crop is balanced (< 75 % one class) only when its left edge is 41 .. 59
    mask, image = tv_tensors.Mask(labels), tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))

    def balanced_share(ratio: float) -> float:
        crop = CatMaxRatioCrop((40, 40), cat_max_ratio=ratio)
        judge = CatMaxRatioCrop((40, 40), cat_max_ratio=0.75)
        torch.manual_seed(0)
        outcomes = [judge.balanced(crop(image, mask)[1]) for _ in range(300)]
        return sum(outcomes) / len(outcomes)

    assert balanced_share(1.0) < 0.45  # about 19 / 61 of plain random crops
    assert balanced_share(0.75) > 0.9  # 11 draws: about 98 %


def test_cat_max_ratio_leaves_ignored_pixels_out():
    crop = CatMaxRatioCrop((10, 10), cat_max_ratio=0.75)
    labels = torch.full((100,), 255, dtype=torch.uint8)
    labels[:10], labels[10:20] = 0, 1  # 80 % ignored, the labelled ones split evenly
    assert crop.balanced(labels)
    assert not crop.balanced(torch.where(labels == 255, 2, labels))  # the same share as a class dominates
    assert not crop.balanced(torch.full((100,), 255, dtype=torch.uint8))
    assert not crop.balanced(torch.where(labels == 1, 0, labels))  # one class only


def test_small_images_are_padded_with_zero_and_the_ignore_index():
    labels = blocks(30, 40, 8, seed=3)
    image, mask = coloured(labels)
    transform = SegmentationTransform(
        True, crop_size=(64, 64), scale=(40, 30), ratio_range=(1, 1), flip_prob=0, photometric=False, mean=MEAN, std=STD
    )
    x, y = transform(image, mask)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert torch.equal(y[:30, :40], torch.from_numpy(labels).long())
    assert (y[30:] == 255).all() and (y[:, 40:] == 255).all()
    assert (x[:, 30:] == 0).all() and (x[:, :, 40:] == 0).all()


def test_eval_resizes_the_image_and_keeps_the_mask():
    labels = blocks(100, 150, 10, seed=4)
    image, mask = coloured(labels)
    transform = SegmentationTransform(False, scale=(64, 32), mean=MEAN, std=STD)
    x, y = transform(image, mask)
    assert x.shape == (3, 32, 48)  # factor min(64 / 150, 32 / 100)
    assert torch.equal(y, torch.from_numpy(labels).long())
    images, masks = collate_eval([(x, y), transform(*coloured(blocks(50, 40, 10, seed=5)))])
    assert [tuple(m.shape) for m in masks] == [(100, 150), (50, 40)]
    assert [tuple(i.shape) for i in images] == [(3, 32, 48), (3, 40, 32)]


def test_keep_ratio_size_fits_the_box_whatever_the_orientation():
    assert keep_ratio_size(512, 683, 2048, 512) == (512, 683)
    assert keep_ratio_size(683, 512, 2048, 512) == (683, 512)
    assert keep_ratio_size(100, 1000, 2048, 512) == (205, 2048)  # the long edge caps it
    resize = KeepRatioResize((2048, 512), ratio_range=(0.5, 2.0))
    image = tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8))
    shorts = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = resize(image)
        assert abs(out.shape[2] / out.shape[1] - 1.5) < 0.05
        shorts.add(out.shape[1])
    assert min(shorts) >= 256 and max(shorts) <= 1024 and len(shorts) > 10
