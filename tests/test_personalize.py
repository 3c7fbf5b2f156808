"""tools/train.py (task personalization) on a tiny Stable Diffusion pipeline: each method trains, the saved files
load through diffusers' own loaders and reproduce the toolkit's output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _run_args import train_args
from PIL import Image
from tiny_models import sample_images, tiny_sd_pipeline

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.cli.common import run  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("personalize")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(3):  # a red "subject" on noise
        array = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
        array[6:18, 6:18, 0] = 230
        Image.fromarray(array).save(tmp / "images" / f"{i}.png")
    return tmp


_sample = sample_images


def fixed_loss(pipe, images_dir, prompt, size=16, draws=8) -> float:
    """The denoising loss on the training images over fixed (noise, timestep) draws: comparable across models."""
    from visionpeft.data.few_images import FewImages
    from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss

    data = FewImages(images_dir, "", size, "fixed", prompt, center_crop=True, flip=0.0)
    pixels = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    parts = DiffusionParts.from_pipeline(pipe)
    with torch.no_grad():
        return float(
            np.mean(
                [
                    diffusion_loss(
                        parts, pixels, [prompt] * len(pixels), generator=torch.Generator().manual_seed(d)
                    ).item()
                    for d in range(draws)
                ]
            )
        )


def _before_after(tmp, run_dir, prompt, *attach):
    """(loss with the method freshly attached, loss with the trained adapter), on the same draws."""
    fresh = vp.attach(load_pipeline(str(tmp / "pipe")), *attach)
    trained = vp.load_adapter(load_pipeline(str(tmp / "pipe")), run_dir / "adapter")
    return fixed_loss(fresh, tmp / "images", prompt), fixed_loss(trained, tmp / "images", prompt)


def _train(tmp, config_name, *overrides):
    args = train_args(
        f"personalize/{config_name}",
        tmp / "runs",
        config_name,
        f"model.name={tmp / 'pipe'}",
        f"data.images={tmp / 'images'}",
        "data.repeats=4",
        "optim.steps=24",
        "train.eval_every=12",
        "train.validation_steps=2",
        "train.validation_images=1",
        *overrides,
    )
    assert run(tool.main, args) == 0
    run_dir = tmp / "runs" / config_name
    losses = [
        json.loads(x)["train/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x
    ]
    return run_dir, losses


@pytest.mark.slow
def test_textual_inversion_run(setup):
    run_dir, losses = _train(
        setup,
        "textual_inversion_sd15",
        "token=<red-box>",
        "method.initializer=red",
        "optim.lr=0.02",
        "train.validation_prompts=[a photo of <red-box>]",
    )
    assert len(losses) == 24
    before, after = _before_after(
        setup, run_dir, "a photo of <red-box>", [("textual_inversion", {"token": "<red-box>", "initializer": "red"})]
    )
    assert after < before
    assert len(list((run_dir / "validation").rglob("*.png"))) == 2  # after 12 and 24 steps
    ours = vp.load_adapter(load_pipeline(str(setup / "pipe")), run_dir / "adapter")
    theirs = load_pipeline(str(setup / "pipe"))
    theirs.load_textual_inversion(str(run_dir / "diffusers" / "learned_embeds.safetensors"))
    assert abs(_sample(ours, "a photo of <red-box>") - _sample(theirs, "a photo of <red-box>")).max() < 1e-5


@pytest.mark.slow
def test_dreambooth_lora_with_prior_preservation(setup):
    run_dir, losses = _train(
        setup,
        "dreambooth_lora_sd15",
        "token=sks box",
        "prior.enabled=true",
        "prior.num_images=2",
        "prior.sample_steps=2",
        "prior.class_prompt=a photo of a box",
        "optim.lr=0.01",
        "train.validation_prompts=[]",
    )
    cache = setup / "runs" / "class_image_cache"  # generated once, keyed by model + settings (+ hidden lock files)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(list(entry.glob("*.png"))) == 2
    before, after = _before_after(
        setup, run_dir, "a photo of sks box", [("lora", {"r": 4, "alpha": 4, "targets": ["q", "k", "v", "o"]})]
    )
    assert after < before
    ours = vp.load_adapter(load_pipeline(str(setup / "pipe")), run_dir / "adapter")
    theirs = load_pipeline(str(setup / "pipe"))
    theirs.load_lora_weights(str(run_dir / "diffusers"))
    assert abs(_sample(ours, "a photo of sks box") - _sample(theirs, "a photo of sks box")).max() < 1e-4


@pytest.mark.slow
def test_difffit_run_with_ema_writes_plain_merged_unet(setup):
    from diffusers import UNet2DConditionModel

    run_dir, losses = _train(
        setup, "difffit_sd15", "token=sks box", "optim.lr=0.01", "train.validation_prompts=[]", "train.ema_decay=0.9"
    )
    before, after = _before_after(setup, run_dir, "a photo of sks box", "difffit")
    assert after < before
    ours = vp.load_adapter(load_pipeline(str(setup / "pipe")), run_dir / "adapter")
    merged = UNet2DConditionModel.from_pretrained(run_dir / "merged" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, 10, enc).sample, ours.unet(x, 10, enc).sample, rtol=1e-4, atol=1e-5)


def test_missing_and_corrupt_image_folders(setup, capsys):
    base = ["configs/personalize/textual_inversion_sd15.yaml", f"model.name={setup / 'pipe'}", "--cpu"]
    assert run(tool.main, [*base, f"data.images={setup / 'nowhere'}"]) == 2
    assert f"image folder {setup / 'nowhere'} does not exist" in capsys.readouterr().err
    bad = setup / "bad_images"
    bad.mkdir()
    (bad / "0.jpg").write_bytes(b"\x00not an image")
    assert run(tool.main, [*base, f"data.images={bad}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad / '0.jpg'} is not a readable image (UnidentifiedImageError)"


@pytest.mark.slow
def test_unreadable_images_can_be_left_out(setup, capsys):
    """data.skip_bad_images=true trains on the readable images and says how many files it left out."""
    mixed = setup / "mixed_images"
    shutil.copytree(setup / "images", mixed)
    (mixed / "9.jpg").write_bytes(b"\x00not an image")
    args = [
        "configs/personalize/textual_inversion_sd15.yaml",
        f"model.name={setup / 'pipe'}",
        f"data.images={mixed}",
        "data.skip_bad_images=true",
        "data.size=16",
        "data.repeats=1",
        "data.batch_size=1",
        "optim.grad_accum=1",
        "optim.steps=1",
        "train.validation_prompts=[]",
        f"train.output_dir={setup / 'runs'}",
        "train.run_name=skipped",
        "--cpu",
    ]
    assert run(tool.main, args) == 0
    assert "3 images, 3 training items" in capsys.readouterr().out
