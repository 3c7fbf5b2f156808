"""Control learns on the embedded tiny pipeline: after a short run of each control method on 32 px fill50k pairs, the
denoising loss on held-out pairs is lower with each pair's own outline than with a blank condition (at
initialisation the two are equal: the zero convolutions add nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _classify_utils import ROOT
from PIL import Image

import visionpeft as vp
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.data.fill50k import make_fill50k
from visionpeft.demo.captioned_mix import CIRCLE_COLOURS

PIPELINE = ROOT / "checkpoints" / "tiny_sd"


def _held_out_loss(pipe, folder, condition: str) -> float:
    """Mean epsilon-prediction MSE over the pairs (fixed noise, timesteps 600-999), with each pair's outline or a
    blank."""
    from diffusers import DDPMScheduler

    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]

    def load(name):
        arrays = [np.asarray(Image.open(folder / r[name]).convert("RGB")) for r in records]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255

    images, outlines = load("image"), load("conditioning_image")
    scheduler = DDPMScheduler.from_pretrained(PIPELINE, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        # high noise levels: where the outline decides where the fill goes (at low noise the image itself shows it)
        steps = torch.randint(600, scheduler.config.num_train_timesteps, (len(records),), generator=generator)
        tokens = pipe.tokenizer(
            [r["text"] for r in records],
            padding="max_length",
            truncation=True,
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        text = pipe.text_encoder(tokens)[0]
        control = outlines if condition == "outline" else torch.zeros_like(outlines)
        with vp.conditioning(pipe, control_image=control):
            prediction = pipe.unet(scheduler.add_noise(latents, noise, steps), steps, encoder_hidden_states=text).sample
    return float(torch.nn.functional.mse_loss(prediction, noise))


#: method -> (its tiny config's method entry, or None for the shipped config's; the options it attaches with).
#: Full ControlNet is left out: at 100 steps (lr 1e-4) its held-out loss with the outline equals the blank one to
#: 1e-5 - its sudden convergence comes after step 200 (gallery/control/), past this test's minute; the converged one
#: shipped in checkpoints/tiny_sd_controlnet is tested below instead.
METHODS = {
    "controlnet_lora": (None, {"hint_channels": [16, 32], "r": 8, "alpha": 8, "targets": ["q", "k", "v", "o"]}),
    # the tiny U-Net has SDXL's layout (a plain first down block): full_adapter_xl, unshuffle 4 = VAE factor 2 x 2
    "t2i_adapter": (None, {"adapter_type": "full_adapter_xl", "downscale_factor": 4}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_a_short_control_run_uses_the_condition(tmp_path, method):
    """100 steps; ControlNet-LoRA's zero convolutions make the two losses equal at initialisation, the T2I-Adapter
    (no zero initialisation) is compared with its untrained self too."""
    from diffusers import StableDiffusionPipeline

    entry, options = METHODS[method]
    config = ROOT / "configs" / "control" / f"{method}_tiny_sd_fill.yaml"
    if entry is not None:
        config = tmp_path / f"{method}.yaml"
        config.write_text(f"_base_: {ROOT / 'configs/control/controlnet_tiny_sd_fill.yaml'}\nmethod: {entry}\n")
    make_fill50k(tmp_path / "train", n=400, size=32, seed=0, palette=CIRCLE_COLOURS)
    make_fill50k(tmp_path / "test", n=48, size=32, seed=1, palette=CIRCLE_COLOURS)
    args = [
        str(config),
        f"data.root={tmp_path / 'train'}",
        "optim.steps=100",
        "train.eval_every=100",
        "train.validation_pairs=1",
        "train.validation_steps=2",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=learn",
        "train.report_to=none",
        "--cpu",
    ]
    assert run(tool.main, args) == 0
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, torch_dtype=torch.float32)
    torch.manual_seed(0)
    vp.attach(pipe, method, **options)
    untrained = [_held_out_loss(pipe, tmp_path / "test", c) for c in ("outline", "blank")]
    if method != "t2i_adapter":
        assert untrained[0] == untrained[1]  # zero convolutions: the condition changes nothing yet
    vp.detach(pipe)
    vp.load_adapter(pipe, tmp_path / "runs" / "learn" / "last")
    outline, blank = (_held_out_loss(pipe, tmp_path / "test", c) for c in ("outline", "blank"))
    assert outline < 0.97 * blank, (outline, blank)
    assert outline / blank < 0.97 * untrained[0] / untrained[1], (untrained, outline, blank)


def test_the_shipped_controlnet_uses_the_condition(tmp_path):
    """``checkpoints/tiny_sd_controlnet`` (the control gallery's ControlNet, loaded as ``generate --control`` loads a
    folder): on pairs of a generator seed it never trained on, the held-out loss with each pair's outline is below
    that with a blank condition."""
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones.diffusers_loading import dtype_keyword
    from visionpeft.cli.generate import load_control_folder

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, **dtype_keyword(torch.float32))
    load_control_folder(pipe, ROOT / "checkpoints" / "tiny_sd_controlnet")
    make_fill50k(tmp_path / "test", n=32, size=32, seed=5, palette=CIRCLE_COLOURS)
    outline, blank = (_held_out_loss(pipe, tmp_path / "test", c) for c in ("outline", "blank"))
    assert outline < 0.9 * blank, (outline, blank)
