"""ControlNet and T2I-Adapter on Stable Diffusion XL: one training step equals diffusers' SDXL scripts' step, the
exported folders load in diffusers' SDXL control pipelines with visionpeft's latents, and the CLI recipes run."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from _run_args import train_args
from benchmarks.script_steps import sdxl_control_embeddings, sdxl_controlnet_loss
from tiny_models import perturb, tiny_sdxl_pipeline

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.backbones import pipeline_modules
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.errors import IncompatibleMethodError
from visionpeft.trainers.control import ControlDenoiser

PROMPTS = ["red circle with blue background", "cyan circle with brown floral background"]
HINT = {"hint_channels": [16, 32]}  # the tiny VAE downsamples by 2: a two-stage hint encoder
HINT_OVERRIDE = ["method.hint_channels=[16, 32]"]
XL = {"adapter_type": "full_adapter_xl", "downscale_factor": 4}  # SDXL's 16 = 2 x its VAE's 8; here 2 x 2
RESOLUTION = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny SDXL pipeline with SDXL's three down blocks (the layout full_adapter_xl fits), saved."""
    tmp = tmp_path_factory.mktemp("sdxl_control")
    tiny_sdxl_pipeline(tmp / "tok", levels=3).save_pretrained(tmp / "pipe")
    return tmp


def _batch():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    control = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator)
    return {"pixel_values": pixels, "conditioning_pixel_values": control, "prompt": PROMPTS}


def _script_controlnet_loss(pipe, unet, controlnet, scheduler, batch):
    """One step of train_controlnet_sdxl.py (``benchmarks.script_steps``), fp32, drawing from the global stream."""
    prompt_embeds, added = sdxl_control_embeddings(pipe, batch["prompt"], RESOLUTION)
    pixels, control = batch["pixel_values"], batch["conditioning_pixel_values"]
    return sdxl_controlnet_loss(pipe, unet, controlnet, scheduler, pixels, control, prompt_embeds, added)


def _script_t2i_loss(pipe, unet, adapter, batch):
    """One step of train_t2i_adapter_sdxl.py (58eb52c) from its lines, fp32: its Euler scheduler (859), latents
    (1180-1185), noise (1188), cubic timesteps (1195-1198), Euler ``add_noise`` (1202), ``get_sigmas`` (1040-1050) and
    the input scaled by 1 / sqrt(sigma^2 + 1) (1205-1206), the adapter's states (1209-1214), the U-Net (1216-1223),
    the denoised latents and sigma^-2 weighting (1226-1227) against the latents (1231) and the loss (1238-1242)."""
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample() * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape)  # randn_like: see _step
    timesteps = torch.rand((latents.shape[0],))
    timesteps = (1 - timesteps**3) * euler.config.num_train_timesteps
    timesteps = timesteps.long().to(euler.timesteps.dtype).clamp(0, euler.config.num_train_timesteps - 1)
    noisy = euler.add_noise(latents, noise, timesteps)
    indices = [(euler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = euler.sigmas[indices].flatten()[:, None, None, None]
    inputs = noisy / ((sigmas**2 + 1) ** 0.5)
    states = adapter(batch["conditioning_pixel_values"])
    prompt_embeds, added = sdxl_control_embeddings(pipe, batch["prompt"], RESOLUTION)
    pred = unet(
        inputs,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        down_intrablock_additional_residuals=list(states),  # the script's down_block_additional_residuals path
        return_dict=False,
    )[0]
    denoised = pred * (-sigmas) + noisy
    weighing = sigmas**-2.0
    return torch.mean(
        (weighing.float() * (denoised.float() - latents.float()) ** 2).reshape(len(latents), -1), 1
    ).mean()


def _step(saved, method, options, timesteps):
    """visionpeft's loss and gradients of one step (the control trainer's ControlDenoiser, seed 5), the plain
    U-Net, a copy of the trained side tower and the pipeline. The script-side code draws from the same global
    stream in the same order (latents, noise, timesteps); its noise is ``torch.randn(latents.shape)`` where the
    scripts write ``randn_like(latents)``: the same distribution, but randn_like fills the tiny VAE's channels-last
    latents in memory order, another order of the same draws."""
    from diffusers import UNet2DConditionModel

    pipe = load_pipeline(str(saved / "pipe"))
    vp.attach(pipe, method, **options)
    perturb(pipe)  # zero convolutions at zero would leave the rest of the ControlNet without a gradient
    tower = copy.deepcopy(getattr(backbone_of(pipe).model, method))
    denoiser = ControlDenoiser(pipeline_modules(pipe), pipe, timesteps)
    torch.manual_seed(5)
    ours = denoiser(_batch())
    ours.backward()
    grads = {name.split(".", 1)[1]: p.grad for name, p in vp.trainable_parameters(pipe)}
    unet = UNet2DConditionModel.from_pretrained(saved / "pipe" / "unet")
    return ours, grads, unet, tower, pipe


def _assert_same_gradients(ours, tower):
    theirs = {name: p.grad for name, p in tower.named_parameters()}
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=0, atol=1e-6, msg=name)
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0


def test_one_controlnet_step_equals_train_controlnet_sdxl(saved):
    ours, grads, unet, controlnet, pipe = _step(saved, "controlnet", HINT, "uniform")
    from visionpeft.trainers.diffusion import training_scheduler

    torch.manual_seed(5)
    theirs = _script_controlnet_loss(pipe, unet, controlnet, training_scheduler(pipe), _batch())
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    _assert_same_gradients(grads, controlnet)
    assert controlnet.config.addition_embed_type == "text_time"  # from_unet kept SDXL's add-embedding


def test_one_t2i_adapter_step_equals_train_t2i_adapter_sdxl(saved):
    """The script's loss on Euler sigmas equals the epsilon loss on DDPM's noisy latents with cubic timesteps (what
    the recipe trains): sigma^-2 |x + sigma n - sigma eps - x|^2 = |n - eps|^2 and (x + sigma n) / sqrt(1 + sigma^2)
    = sqrt(abar) x + sqrt(1 - abar) n."""
    ours, grads, unet, adapter, pipe = _step(saved, "t2i_adapter", XL, "cubic")
    torch.manual_seed(5)
    theirs = _script_t2i_loss(pipe, unet, adapter, _batch())
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    _assert_same_gradients(grads, adapter)


def test_the_sdxl_adapter_is_diffusers_full_adapter_xl_with_sdxl_s_widths():
    """The script's adapter (lines 886-892) on SDXL's U-Net (config values of stable-diffusion-xl-base-1.0): the
    defaults give channels (320, 640, 1280, 1280) and downscale 16: 79,028,160 parameters; the SD 1.x layout is
    refused in one line."""
    from benchmarks.layouts import sdxl_parts  # SDXL base 1.0's config values
    from diffusers import T2IAdapter
    from tiny_models import tiny_unet

    from visionpeft.methods.t2i_adapter import DEFAULT_DOWNSCALE

    with torch.device("meta"):
        unet = sdxl_parts()["unet"]
        reference = T2IAdapter(channels=[320, 640, 1280, 1280], downscale_factor=16, adapter_type="full_adapter_xl")
    vp.attach(unet, "t2i_adapter", adapter_type="full_adapter_xl")
    count = sum(p.numel() for p in reference.parameters())
    assert vp.count_parameters(unet)["by_group"] == {"t2i_adapter": count} and count == 79_028_160
    assert unet.t2i_adapter.config.channels == [320, 640, 1280, 1280] and DEFAULT_DOWNSCALE["full_adapter_xl"] == 16
    with pytest.raises(IncompatibleMethodError, match="full_adapter_xl fits SDXL's U-Net layout") as err:
        vp.attach(tiny_unet(), "t2i_adapter", adapter_type="full_adapter_xl")
    assert "\n" not in str(err.value) and "use full_adapter or light_adapter" in str(err.value)


SAMPLE = """
import sys, numpy as np, torch
from diffusers import (ControlNetModel, StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline,
                       StableDiffusionXLPipeline, T2IAdapter)
base, folder, control, out = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))  # the test's own count: another reduction order differs in the last bits
control = torch.load(control)
if folder.endswith("controlnet"):
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=ControlNetModel.from_pretrained(folder))
    scale = "controlnet_conditioning_scale"
else:
    pipe = StableDiffusionXLAdapterPipeline.from_pretrained(base, adapter=T2IAdapter.from_pretrained(folder))
    scale = "adapter_conditioning_scale"
args = dict(num_inference_steps=2, height=16, width=16, output_type="latent")
draw = lambda p, **kw: p("a photo", generator=torch.Generator().manual_seed(0), **args, **kw).images.numpy()
plain = StableDiffusionXLPipeline.from_pretrained(base)
np.savez(out, adapted=draw(pipe, image=control), zero=draw(pipe, image=control, **{scale: 0.0}), base=draw(plain))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "options", "folder"), [("controlnet", HINT, "controlnet"), ("t2i_adapter", XL, "t2i_adapter")]
)
def test_the_export_loads_in_diffusers_sdxl_control_pipeline_in_a_new_process(saved, tmp_path, method, options, folder):
    """`save_adapter(format="diffusers")` writes controlnet/ or t2i_adapter/; StableDiffusionXLControlNetPipeline /
    StableDiffusionXLAdapterPipeline, with no visionpeft import, draw visionpeft's latents (<= 1e-5), and at scale 0
    the base StableDiffusionXLPipeline's - as visionpeft's pipeline with conditioning_scale 0 does."""
    pipe = vp.attach(load_pipeline(str(saved / "pipe")), method, **options)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(pipe):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def draw(p):
        with vp.conditioning(p, control_image=control):
            args = dict(num_inference_steps=2, height=16, width=16, output_type="latent")
            return p("a photo", generator=torch.Generator().manual_seed(0), **args).images.numpy()

    ours = draw(pipe)
    vp.save_adapter(pipe, tmp_path / "out", format="diffusers")
    quiet = vp.attach(load_pipeline(str(saved / "pipe")), method, **options, conditioning_scale=0.0)
    quiet_latents = draw(quiet)
    torch.save(control, tmp_path / "control.pt")
    args = [sys.executable, "-c", SAMPLE, str(saved / "pipe"), str(tmp_path / "out" / folder)]
    threads = str(torch.get_num_threads())
    result = subprocess.run(
        [*args, str(tmp_path / "control.pt"), str(tmp_path / "theirs.npz"), threads], capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    theirs = np.load(tmp_path / "theirs.npz")
    np.testing.assert_allclose(theirs["adapted"], ours, rtol=0, atol=1e-5)
    assert np.abs(ours - theirs["base"]).max() > 1e-3  # the control changes the draw
    np.testing.assert_allclose(theirs["zero"], theirs["base"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(quiet_latents, theirs["base"])


@pytest.fixture(scope="module")
def cli(saved):
    """fill50k pairs at 16 px and a tiny Stable Diffusion 1.x folder (for the family check)."""
    from tiny_models import tiny_sd_pipeline

    from visionpeft.data.fill50k import make_fill50k

    make_fill50k(saved / "fill", n=4, size=16, seed=0)
    tiny_sd_pipeline(saved / "tok_sd").save_pretrained(saved / "sd15")
    return saved


def _train(root, config, name, *overrides):
    import train as tool

    from visionpeft.cli.common import run

    args = train_args(
        f"control/{config}",
        root / "runs",
        name,
        f"model.name={root / 'pipe'}",
        "model.vae=null",  # the recipe's fp16-fix VAE is a hub id; the tiny pipeline keeps its own,
        f"data.root={root / 'fill'}",
        "optim.steps=2",
        "optim.lr=1e-3",
        "train.eval_every=2",
        "train.validation_steps=2",
        *overrides,
    )
    return run(tool.main, args)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "method", "folder"),
    [
        ("controlnet_sdxl_fill", "method.hint_channels=[16, 32]", "controlnet"),
        ("t2i_adapter_sdxl_fill", "method.downscale_factor=4", "t2i_adapter"),
    ],
)
def test_the_sdxl_recipes_run_and_generate_draws_with_the_run(cli, tmp_path, capsys, config, method, folder):
    """tools/train.py with the SDXL control recipes (the ControlNet one over an fp8-stored frozen base) leaves
    controlnet/ or t2i_adapter/; tools/generate.py --control RUN draws with it on the SDXL pipeline."""
    import json

    import generate as generate_tool
    from diffusers import ControlNetModel, T2IAdapter

    from visionpeft.cli.common import run

    storage = ["train.base_storage=fp8"] if folder == "controlnet" else []
    assert _train(cli, config, config, method, *storage) == 0
    if storage:
        assert "train.base_storage=fp8: " in capsys.readouterr().out
    run_dir = cli / "runs" / config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "train/loss" in r]) == 2 and any("eval/fill_iou" in r for r in records)
    if folder == "controlnet":
        assert ControlNetModel.from_pretrained(run_dir / folder).config.addition_embed_type == "text_time"
    else:
        assert T2IAdapter.from_pretrained(run_dir / folder).config.adapter_type == "full_adapter_xl"
    capsys.readouterr()
    args = ["--model", str(cli / "pipe"), "--prompt", "red circle", "--seeds", "0", "--steps", "2", "--size", "16"]
    image = ["--control-image", str(cli / "fill" / "source" / "0.png"), "--out", str(tmp_path / "grid.png")]
    assert run(generate_tool.main, [*args, "--control", str(run_dir), *image]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {tmp_path / 'grid.png'}")


@pytest.mark.slow
def test_an_sdxl_recipe_on_an_sd15_folder_or_a_size_off_the_vae_grid_is_one_line(cli, capsys):
    assert _train(cli, "controlnet_sdxl_fill", "wrong", f"model.name={cli / 'sd15'}") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: model.family=sdxl: this recipe is for Stable Diffusion XL pipelines, but {cli / 'sd15'} holds a "
        "StableDiffusionPipeline (Stable Diffusion 1.x / 2.x); use a recipe written for Stable Diffusion 1.x / 2.x "
        "or set model.family=null"
    )
    assert _train(cli, "controlnet_sdxl_fill", "odd", "data.size=15") == 2
    assert capsys.readouterr().err.strip().startswith("error: data.size (15) is not a multiple of 2")
    assert not (cli / "runs" / "wrong").exists() and not (cli / "runs" / "odd").exists()


def test_the_sdxl_control_recipes_carry_the_scripts_values():
    from _classify_utils import ROOT

    from visionpeft.config import load_config

    controlnet = load_config(ROOT / "configs" / "control" / "controlnet_sdxl_fill.yaml")
    assert (controlnet.model.family, controlnet.model.vae) == ("sdxl", "madebyollin/sdxl-vae-fp16-fix")
    assert (controlnet.data.size, controlnet.optim.lr, controlnet.optim.steps) == (1024, 1e-5, 15000)
    assert (controlnet.data.batch_size, controlnet.optim.grad_accum, controlnet.train.timesteps) == (4, 4, "uniform")
    t2i = load_config(ROOT / "configs" / "control" / "t2i_adapter_sdxl_fill.yaml")
    assert t2i.method.adapter_type == "full_adapter_xl" and t2i.train.timesteps == "cubic"
    assert t2i.model.family == "sdxl" and t2i.data.size == 1024


@pytest.mark.slow
def test_predict_decodes_with_the_vae_the_run_trained_with(cli, tmp_path, capsys):
    """A run trained with ``model.vae`` (the SDXL recipes' fp16-fix VAE; here a tiny VAE of other weights) is sampled
    by ``visionpeft predict`` (and eval: the same sampler) with that VAE, as the trainer sampled it: the image equals
    the trainer's validation sampler's on the pipeline holding that VAE, and differs from one its own VAE gives."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from tiny_models import tiny_vae

    from visionpeft.cli.common import run
    from visionpeft.cli.predict import main as predict_main
    from visionpeft.config import load_config
    from visionpeft.data.control_pairs import condition_transform
    from visionpeft.data.images import load_rgb
    from visionpeft.trainers.control import ControlValidation
    from visionpeft.trainers.loop import LoopConfig, make_accelerator

    torch.manual_seed(11)
    tiny_vae().save_pretrained(tmp_path / "vae")
    assert _train(cli, "controlnet_sdxl_fill", "own_vae", *HINT_OVERRIDE, f"model.vae={tmp_path / 'vae'}") == 0
    run_dir, source = cli / "runs" / "own_vae", cli / "fill" / "source" / "0.png"
    capsys.readouterr()
    args = [str(run_dir), str(source), "--prompt", "red circle", "--seeds", "3", "--out", str(tmp_path / "out")]
    assert run(predict_main, [*args, "--cpu"]) == 0
    predicted = np.asarray(Image.open(tmp_path / "out" / "0_seed3.png"))

    config = load_config(run_dir / "config.yaml")
    condition = condition_transform(config.data.size)(load_rgb(source))
    accelerator = make_accelerator(LoopConfig(), cpu=True)

    def drawn(vae):
        pipe = load_pipeline(str(cli / "pipe"))
        if vae is not None:
            pipe.vae = AutoencoderKL.from_pretrained(vae)
        vp.load_adapter(pipe, run_dir / "adapter")
        sampler = ControlValidation(pipe, config, run_dir, None)
        return np.asarray(sampler.sample(accelerator, condition, "red circle", 3))

    np.testing.assert_array_equal(predicted, drawn(tmp_path / "vae"))
    assert np.abs(predicted.astype(int) - drawn(None)).max() > 10  # the pipeline's own VAE decodes another image
