"""ControlNet with the U-Net's decoder unlocked (``method.sd_locked=false``, the official code's ``sd_locked=False``)
and the control task's ``model.init_control`` (a run starting from a trained ControlNet folder): exact counts, the
U-Net unchanged at initialisation, only the decoder trained in place and restored on detach, an export whose unet/ and
controlnet/ draw in diffusers' own pipeline (a new process) what visionpeft draws, bad input in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import train as tool  # noqa: E402
from _run_args import train_args
from safetensors.torch import load_file
from tiny_models import assert_same_state, tiny_sd_pipeline, tiny_unet

import visionpeft as vp
from visionpeft.cli.common import run
from visionpeft.data.fill50k import make_fill50k
from visionpeft.errors import ConfigError
from visionpeft.methods.controlnet import DECODER_PARTS

HINT = {"hint_channels": [16, 32]}  # the tiny pipelines' VAE downsamples by 2
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])
CONTROL = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _decoder_count(unet) -> int:
    return sum(p.numel() for part in DECODER_PARTS for p in getattr(unet, part).parameters())


def test_the_decoder_trains_in_place_beside_the_controlnet_and_detach_restores_it():
    from diffusers import ControlNetModel

    plain = tiny_unet()(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    unet = vp.attach(tiny_unet(), "controlnet", **HINT, sd_locked=False)
    reference = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=(16, 32))
    controlnet = sum(p.numel() for p in reference.parameters())
    assert vp.count_parameters(unet)["trainable"] == controlnet + _decoder_count(tiny_unet())
    trained = {name for name, _ in vp.trainable_parameters(unet)}
    in_place = {name for name in trained if not name.startswith("controlnet.")}
    assert in_place and all(name.startswith(DECODER_PARTS) for name in in_place)
    assert not any(name.startswith(("down_blocks", "mid_block", "conv_in", "time_embedding")) for name in trained)
    with vp.conditioning(unet, control_image=CONTROL):
        out = unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # zero convs: unchanged at initialisation
    out.square().mean().backward()
    assert unet.up_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    assert unet.down_blocks[0].resnets[0].conv1.weight.grad is None
    with torch.no_grad():
        unet.conv_out.weight.add_(1.0)
    vp.detach(unet)
    assert_same_state(unet, tiny_unet())


def test_an_unlocked_controlnet_saves_and_loads_with_its_decoder(tmp_path):
    unet = vp.attach(tiny_unet(), "controlnet", **HINT, sd_locked=False)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(unet):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    with vp.conditioning(unet, control_image=CONTROL):
        ours = unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    vp.save_adapter(unet, tmp_path / "adapter")
    fresh = vp.load_adapter(tiny_unet(), tmp_path / "adapter")
    with vp.conditioning(fresh, control_image=CONTROL):
        torch.testing.assert_close(fresh(LATENTS, STEPS, encoder_hidden_states=TEXT).sample, ours, rtol=0, atol=0)


def test_what_an_unlocked_decoder_cannot_be_is_one_line():
    with pytest.raises(ConfigError, match="sd_locked=false is controlnet's option") as err:
        vp.attach(tiny_unet(), "controlnet_lora", **HINT, sd_locked=False)
    assert "\n" not in str(err.value)
    unet = vp.attach(tiny_unet(), "controlnet", **HINT, sd_locked=False)
    with pytest.raises(ConfigError, match="controlnet already unlocks this U-Net's decoder") as err:
        vp.attach(unet, "controlnet", **HINT, sd_locked=False)
    assert "\n" not in str(err.value)
    vp.attach(unet, "controlnet", **HINT)  # a second, locked ControlNet is fine
    vp.detach(unet)
    vp.attach(unet, "controlnet", **HINT, sd_locked=False)  # detached: the decoder can be unlocked again


def _trained_unlocked_pipeline(tmp_path, base):
    """A tiny pipeline saved to ``base`` and loaded with an ``sd_locked=false`` ControlNet whose trained tensors (the
    ControlNet's and the decoder's) moved away from their start."""
    from visionpeft.backbones.diffusers_loading import load_pipeline

    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(base)
    pipe = vp.attach(load_pipeline(str(base)), "controlnet", **HINT, sd_locked=False)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(pipe):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return pipe


SAMPLE = """
import sys, numpy as np, torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
out = sys.argv[2]
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    sys.argv[1], unet=UNet2DConditionModel.from_pretrained(out + "/unet"),
    controlnet=ControlNetModel.from_pretrained(out + "/controlnet"), safety_checker=None, requires_safety_checker=False)
images = pipe("a photo", image=torch.load(sys.argv[3]), num_inference_steps=2, height=16, width=16, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
np.save(sys.argv[4], images)
"""


def test_the_export_adds_the_trained_unet_and_diffusers_draws_what_visionpeft_draws_in_a_new_process(tmp_path):
    import numpy as np

    base = tmp_path / "base"
    pipe = _trained_unlocked_pipeline(tmp_path, base)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    draw = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "np"}
    with vp.conditioning(pipe, control_image=control):
        ours = pipe("a photo", **draw, generator=torch.Generator().manual_seed(0)).images
    vp.save_adapter(pipe, tmp_path / "out", format="diffusers")
    saved = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == pipe.unet.state_dict().keys()  # a plain U-Net: no ControlNet, no hooks' tensors
    torch.save(control, tmp_path / "control.pt")
    args = [sys.executable, "-c", SAMPLE, str(base), str(tmp_path / "out"), str(tmp_path / "control.pt")]
    result = subprocess.run([*args, str(tmp_path / "theirs.npy")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "theirs.npy"), ours, rtol=0, atol=1e-5)
    vp.detach(pipe)  # and the pipeline's own U-Net draws differently: the decoder really was trained
    assert np.abs(pipe("a photo", **draw, generator=torch.Generator().manual_seed(0)).images - ours).max() > 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unlocked")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    make_fill50k(tmp / "fill", n=6, size=16, seed=0)
    return tmp


def _train(runs, name, *overrides, config="controlnet_sd15_fill"):
    args = train_args(
        f"control/{config}",
        runs / "runs",
        name,
        f"model.name={runs / 'pipe'}",
        f"data.root={runs / 'fill'}",
        "optim.lr=1e-3",
        "train.eval_every=100",
        "method.hint_channels=[16, 32]",
        *overrides,
    )
    return run(tool.main, args)


def test_a_run_starts_from_a_trained_controlnet_folder_and_unlocks_the_decoder(runs):
    assert _train(runs, "first") == 0
    first = runs / "runs" / "first" / "controlnet"
    assert not (runs / "runs" / "first" / "unet").exists()  # a locked run exports the ControlNet alone
    # lr 0: what the second run writes is where it started; under bf16 the training copy holds the frozen U-Net
    # rounded, and unet/ still has tiny_sd's full-precision weights
    unlocked = ("method.sd_locked=false", "optim.lr=0", "train.mixed_precision=bf16")
    assert _train(runs, "second", f"model.init_control={first}", *unlocked) == 0
    second = runs / "runs" / "second"
    name = "diffusion_pytorch_model.safetensors"
    started, given = load_file(second / "controlnet" / name), load_file(first / name)
    assert started.keys() == given.keys()
    for key, tensor in given.items():
        torch.testing.assert_close(started[key], tensor, rtol=0, atol=0, msg=key)
    assert torch.count_nonzero(given["controlnet_mid_block.weight"]) > 0  # the first run moved its zero convs
    unet = load_file(second / "unet" / name)
    base = load_file(runs / "pipe" / "unet" / name)
    assert unet.keys() == base.keys() and all(torch.equal(unet[k], base[k]) for k in base)


def test_a_folder_that_cannot_start_the_run_s_control_is_one_line(runs, capsys):
    """``model.init_control`` naming a ControlNet folder for a run that trains another method (ControlNet-LoRA), or a
    ControlNet built with other hint-encoder widths: one line, exit 2, no run folder."""
    first = runs / "runs" / "first" / "controlnet"
    if not first.is_dir():
        assert _train(runs, "first") == 0
    capsys.readouterr()
    assert _train(runs, "lora", f"model.init_control={first}", config="controlnet_lora_sd15_fill") == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.init_control is a ControlNetModel, which starts one controlnet; this run trains controlnet_lora"
    )
    assert _train(runs, "wide", f"model.init_control={first}", "method.hint_channels=[16, 64]") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the ControlNetModel folder does not fit") and "\n" not in err
    assert not (runs / "runs" / "lora").exists() and not (runs / "runs" / "wide").exists()


def test_generate_loads_an_unlocked_export_and_draws_what_diffusers_draws(tmp_path, capsys):
    """``generate --control FOLDER`` with the ``controlnet/`` + ``unet/`` of an ``sd_locked=false`` export draws, pixel
    for pixel, what ``StableDiffusionControlNetPipeline`` draws with those folders; a ``unet/`` trained from another
    U-Net, or one beside a ControlNet that does not fit, is one line."""
    import numpy as np
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from PIL import Image

    from visionpeft.cli.generate import main

    base = tmp_path / "base"
    pipe = _trained_unlocked_pipeline(tmp_path, base)
    vp.save_adapter(pipe, tmp_path / "out", format="diffusers")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    args = ["--model", str(base), "--prompt", "a photo", "--seeds", "0", "--steps", "2", "--device", "cpu"]
    args += ["--guidance", "3", "--control-image", str(tmp_path / "c.png")]
    assert run(main, [*args, "--control", str(tmp_path / "out"), "--out", str(tmp_path / "ours.png")]) == 0
    theirs = StableDiffusionControlNetPipeline.from_pretrained(
        base,
        unet=UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet"),
        controlnet=ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet"),
        safety_checker=None,
        requires_safety_checker=False,
    )
    image = theirs(
        "a photo",
        image=Image.open(tmp_path / "c.png"),
        num_inference_steps=2,
        guidance_scale=3.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    grid = np.asarray(Image.open(tmp_path / "ours.png").convert("RGB"))
    cell = grid[4 : 4 + 128 : 8, 4 : 4 + 128 : 8]  # one cell, 8x enlarged to 128 px, 4 px margin
    assert np.abs(cell.astype(int) - np.asarray(image).astype(int)).max() <= 1
    other = tmp_path / "other"
    tiny_sd_pipeline(tmp_path / "tok2", seed=1).unet.save_pretrained(other / "unet")
    ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet").save_pretrained(other / "controlnet")
    capsys.readouterr()
    assert run(main, [*args, "--control", str(other), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "differs from this pipeline's outside its decoder" in err and "\n" not in err
