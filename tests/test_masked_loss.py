"""Masked loss (visionpeft.data.masks + the denoising loss's ``mask``): against a test-side reference of sd-scripts'
``apply_masked_loss`` (library/custom_train_functions.py lines 487-503 at 48d368f) and its use in train_network.py
(lines 468-473: loss * mask, then the mean over every element), the gradient is zero where the mask is black, masks
follow the image's resize / flip / crop exactly, and bad mask folders are one line naming the file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _run_args import train_args
from PIL import Image
from tiny_models import tiny_sd_pipeline

from visionpeft.config.diffusion_objective import DiffusionObjective
from visionpeft.data.buckets import bucket_placement, bucket_resolutions, place_item
from visionpeft.data.few_images import FewImages, ImageKnobs
from visionpeft.data.masks import alpha_of, latent_mask, load_mask
from visionpeft.errors import DataError
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss
from visionpeft.trainers.diffusion_objective import per_sample_loss


def ref_masked_loss(loss, mask):
    """apply_masked_loss (alpha-mask branch: a (B, H, W) mask in [0, 1]) then ``loss.mean(dim=[1, 2, 3])``."""
    mask_image = mask.to(dtype=loss.dtype).unsqueeze(1)
    mask_image = F.interpolate(mask_image, size=loss.shape[2:], mode="area")
    return (loss * mask_image).mean(dim=list(range(1, loss.ndim)))


def test_latent_mask_is_the_area_average():
    mask = (torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    blocks = mask.reshape(2, 1, 8, 2, 12, 2).mean(dim=(3, 5))  # each latent cell: the mean of its 2x2 pixels
    torch.testing.assert_close(latent_mask(mask, (8, 12)), blocks, rtol=0, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["l2", "huber", "smooth_l1"])
def test_masked_per_sample_loss_equals_sd_scripts(loss_type):
    g = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    pixel_mask = torch.rand(3, 32, 32, generator=g)
    objective = DiffusionObjective(loss_type=loss_type, huber_schedule="constant", huber_c=0.3)
    elementwise = per_sample_loss_elements(prediction, target, objective)
    ours = per_sample_loss(
        prediction,
        target,
        objective,
        None,
        torch.zeros(3, dtype=torch.long),
        latent_mask(pixel_mask.unsqueeze(1), (8, 8)),
    )
    torch.testing.assert_close(ours, ref_masked_loss(elementwise, pixel_mask), rtol=1e-6, atol=1e-7)
    # not renormalised by the mask's area: a mask of halves weighs the loss by one half
    half = torch.full((3, 1, 8, 8), 0.5)
    torch.testing.assert_close(
        per_sample_loss(prediction, target, objective, None, torch.zeros(3, dtype=torch.long), half),
        0.5 * per_sample_loss(prediction, target, objective, None, torch.zeros(3, dtype=torch.long)),
    )


def per_sample_loss_elements(prediction, target, objective):
    """sd-scripts' conditional_loss with reduction="none" (train_util.py lines 6133-6165, constant threshold)."""
    if objective.loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    c = objective.huber_c
    smooth = 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    return c * smooth if objective.loss_type == "huber" else smooth


class RecordingUNet(torch.nn.Module):
    """The U-Net, keeping its last output so the test can read the loss's gradient there."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.dtype, self.output = unet, unet.dtype, None

    def forward(self, *args):
        self.output = self.unet(*args).sample
        if self.output.requires_grad:
            self.output.retain_grad()
        return SimpleNamespace(sample=self.output)


def test_the_gradient_is_zero_where_the_mask_is_black(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    parts = DiffusionParts.from_pipeline(pipe)
    parts.unet = RecordingUNet(pipe.unet.requires_grad_(True))
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.ones(2, 1, 16, 16)
    mask[:, :, :, :8] = 0  # the left half is black
    loss = diffusion_loss(parts, pixels, ["a", "b"], generator=torch.Generator().manual_seed(3), mask=mask)
    loss.backward()
    grad = parts.unet.output.grad  # (2, 4, 8, 8) latents: the left 4 columns come from black pixels
    assert grad[..., :4].abs().max() == 0
    assert (grad[..., 4:].abs() > 0).float().mean() > 0.99

    # an all-white mask is the plain loss, an all-black one is zero (same draws)
    def loss_with(m):
        with torch.no_grad():
            return diffusion_loss(parts, pixels, ["a", "b"], generator=torch.Generator().manual_seed(3), mask=m)

    assert loss_with(torch.ones(2, 1, 16, 16)) == loss_with(None)
    assert loss_with(torch.zeros(2, 1, 16, 16)) == 0
    torch.testing.assert_close(loss_with(mask), loss.detach())


def test_masks_follow_the_resize_flip_and_crop_exactly(tmp_path):
    """The mask is the image's red channel, so after any placement it must still be the red channel."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (23, 50, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    mask = image.getchannel("R")
    placement = bucket_placement(bucket_resolutions(16, 8, 32, 4), 50, 23)
    for seed in range(8):
        torch.manual_seed(seed)
        item = place_item(image, placement, 0.5, random_crop=True, mask=mask)
        assert item["mask"].shape == (1, *item["pixel_values"].shape[1:])
        torch.testing.assert_close(item["mask"][0], item["pixel_values"][0] * 0.5 + 0.5, rtol=0, atol=1e-6)


def _folder(tmp_path, sizes, mode="RGB"):
    images = tmp_path / "images"
    images.mkdir()
    for name, (w, h) in sizes.items():
        array = np.random.default_rng(0).integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(array, mode).save(images / f"{name}.png")
    return images


def test_mask_folder_with_the_images_stems(tmp_path):
    images = _folder(tmp_path, {"a": (20, 16), "b": (16, 16)})
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (20, 16), 255).save(masks / "a.png")
    white_left = np.zeros((16, 16, 3), np.uint8)
    white_left[:, :8, 0] = 255  # the red channel counts
    Image.fromarray(white_left).save(masks / "b.jpg")
    data = FewImages(images, "t", 16, center_crop=True, flip=0.0, knobs=ImageKnobs(masks=str(masks)))
    assert data[0]["mask"].min() == 1
    b = data[1]["mask"][0]
    assert (b[:, :7] > 0.95).all() and (b[:, 9:] < 0.05).all()
    assert data.summary() == [f"loss masks: {masks}"]


def test_alpha_channel_masks(tmp_path):
    images = _folder(tmp_path, {"a": (16, 16)}, mode="RGBA")
    Image.new("RGB", (16, 16)).save(images / "b.png")  # no alpha: the whole image counts, as sd-scripts
    alpha = np.asarray(Image.open(images / "a.png"))[..., 3]
    np.testing.assert_array_equal(np.asarray(alpha_of(images / "a.png")), alpha)
    data = FewImages(images, "t", 16, center_crop=True, flip=0.0, knobs=ImageKnobs(alpha_mask=True))
    torch.testing.assert_close(data[0]["mask"][0], torch.tensor(alpha / 255.0, dtype=torch.float32))
    assert data[1]["mask"].min() == 1
    assert data[0]["pixel_values"].shape == (3, 16, 16)


@pytest.mark.parametrize(
    "masks, expected",
    [
        ({"a": (20, 16)}, "image {i}/b.png has no mask named b.* in {m}"),
        ({"a": (20, 16), "b": (16, 16), "c": (16, 16)}, "mask {m}/c.png has no training image named c.* in {i}"),
        (
            {"a": (20, 16), "b": (16, 17)},
            "mask {m}/b.png is 16x17 pixels but its image {i}/b.png is 16x16; a mask must have its image's size",
        ),
    ],
)
def test_bad_mask_folders_are_one_line(tmp_path, masks, expected):
    images = _folder(tmp_path, {"a": (20, 16), "b": (16, 16)})
    folder = tmp_path / "masks"
    folder.mkdir()
    for name, size in masks.items():
        Image.new("L", size, 255).save(folder / f"{name}.png")
    with pytest.raises(DataError) as err:
        FewImages(images, "t", 16, knobs=ImageKnobs(masks=str(folder)))
    assert str(err.value) == expected.format(i=images, m=folder)


def test_a_missing_mask_folder_is_one_line(tmp_path):
    images = _folder(tmp_path, {"a": (16, 16)})
    with pytest.raises(DataError, match=f"mask folder {tmp_path / 'nowhere'} does not exist"):
        FewImages(images, "t", 16, knobs=ImageKnobs(masks=str(tmp_path / "nowhere")))


def test_load_mask_reads_the_red_channel(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, 50
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert np.asarray(load_mask(tmp_path / "m.png")).max() == 200


@pytest.mark.slow
def test_masked_bucketed_run_with_prior_preservation(tmp_path):
    """tools/train.py with masks on mixed shapes plus square class images: the instance batch is one bucket, the
    class batch square (two losses), both train; the run records its buckets and masks."""
    import train as tool

    from visionpeft.cli.common import run

    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    images = _folder(tmp_path, {"a": (16, 16), "b": (32, 8), "c": (34, 8), "d": (8, 32)})
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, size in {"a": (16, 16), "b": (32, 8), "c": (34, 8), "d": (8, 32)}.items():
        array = np.zeros((size[1], size[0]), np.uint8)
        array[:, : size[0] // 2] = 255
        Image.fromarray(array).save(masks / f"{name}.png")
    args = train_args(
        "personalize/dreambooth_lora_tiny_sd",
        tmp_path / "runs",
        "masked",
        f"model.name={tmp_path / 'pipe'}",
        f"data.images={images}",
        f"data.masks={masks}",
        "data.buckets=true",
        "data.bucket_reso_steps=4",
        "data.min_bucket_reso=8",
        "data.max_bucket_reso=32",
        "data.repeats=2",
        "prior.enabled=true",
        "prior.num_images=2",
        "prior.sample_steps=2",
        "prior.class_prompt=a photo",
        "optim.steps=6",
        "train.eval_every=6",
        "train.validation_prompts=[]",
    )
    assert run(tool.main, args) == 0
    run_dir = tmp_path / "runs" / "masked"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 6 and all(np.isfinite(losses))
    card = (run_dir / "README.md").read_text()
    assert "buckets: 8x32 (1), 16x16 (1), 32x8 (2)" in card and f"loss masks: {masks}" in card
