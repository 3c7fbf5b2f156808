"""ControlNet on Flux and Stable Diffusion 3: one control-trainer step equals train_controlnet_flux.py's /
train_controlnet_sd3.py's, the exported controlnet/ loads in FluxControlNetPipeline /
StableDiffusion3ControlNetPipeline with visionpeft's latents, and what cannot work is one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _run_args import train_args
from tiny_flow_models import tiny_flux_pipeline, tiny_sd3_pipeline
from tiny_models import perturb

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.backbones import pipeline_modules
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.config.diffusion_objective import DiffusionObjective
from visionpeft.errors import ConfigError, DataError, IncompatibleMethodError
from visionpeft.trainers.control import ControlDenoiser

PROMPTS = ["red circle with blue background", "cyan circle with brown floral background"]
#: the tiny layouts have one double- and one single-stream block (Flux) and two joint blocks (SD3)
LAYERS = {"flux": {"num_layers": 1, "num_single_layers": 1}, "sd3": {"num_layers": 1}}
SIZE = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow_control")
    tiny_flux_pipeline(tmp / "tok_flux").save_pretrained(tmp / "flux")
    tiny_sd3_pipeline(tmp / "tok_sd3").save_pretrained(tmp / "sd3")
    return tmp


def _batch():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=generator) * 2 - 1
    control = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    return {"pixel_values": pixels, "conditioning_pixel_values": control, "prompt": PROMPTS}


def _timesteps(scheduler, batch):
    """``u`` (logit-normal, both scripts' default), the timesteps and ``get_sigmas`` (flux lines 1230-1238, 1278-1292;
    sd3 the same lines of its own)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal", batch_size=batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return timesteps, scheduler.sigmas[indices].flatten()[:, None, None, None]


def _latents(vae, pixels):
    return (vae.encode(pixels).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor


def _script_flux_loss(pipe, transformer, controlnet, scheduler, batch):
    """One step of train_controlnet_flux.py (58eb52c) from its lines, fp32: ``encode_prompt`` (1090-1092, the
    pipeline's own), the latents shifted, scaled (1247-1249) and packed (1250-1256), the condition normalised to
    [-1, 1] (762-769) and encoded the same way (1258-1268), image ids (1270-1276), noise, ``u``, timesteps, sigmas and
    the noisy input (1278-1293), guidance 3.5 (1296-1302), the ControlNet (1306-1316), the transformer with its
    samples (1318-1335) and ``F.mse_loss`` against noise - latents (1337). The draws follow visionpeft's order (the
    control latents after ``u``, where the transformer call's hook encodes them); the noise is drawn unpacked and
    packed, the script's ``randn_like`` on packed latents: the same distribution."""
    from diffusers import FluxPipeline

    prompt_embeds, pooled, text_ids = pipe.encode_prompt(batch["prompt"], prompt_2=batch["prompt"])
    latents = _latents(pipe.vae, batch["pixel_values"])
    bsz, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, bsz, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, "cpu", torch.float32)
    noise = FluxPipeline._pack_latents(torch.randn(latents.shape), bsz, channels, height, width)
    timesteps, sigmas = _timesteps(scheduler, bsz)
    sigmas = sigmas[:, :, :, 0]  # the packed latents' three dimensions
    control = _latents(pipe.vae, batch["conditioning_pixel_values"] * 2 - 1)
    control = FluxPipeline._pack_latents(control, bsz, channels, height, width)
    noisy = (1.0 - sigmas) * packed + sigmas * noise
    guidance = torch.full((bsz,), 3.5)
    common = dict(
        hidden_states=noisy,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )
    blocks, singles = controlnet(controlnet_cond=control, **common)
    pred = transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=singles, **common)[0]
    return F.mse_loss(pred.float(), (noise - packed).float(), reduction="mean")


def _script_sd3_loss(pipe, transformer, controlnet, scheduler, batch):
    """One step of train_controlnet_sd3.py (58eb52c) from its lines, fp32: the prompt embeddings (the pipeline's
    ``encode_prompt`` at 77 T5 tokens, as the script's ``compute_text_embeddings``), the latents shifted and scaled
    (1303-1306), noise, ``u``, timesteps, sigmas, noisy input (1309-1326), the condition in [0, 1] (765-771) encoded,
    shifted and scaled (1333-1335), the ControlNet (1337-1345), the transformer with its block samples (1348-1355),
    preconditioning (1359-1360), weighting (1364), target (1367-1370) and loss (1373-1377); draws as in
    :func:`_script_flux_loss`."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    prompts = batch["prompt"]
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=77
    )
    latents = _latents(pipe.vae, batch["pixel_values"])
    noise = torch.randn(latents.shape)
    timesteps, sigmas = _timesteps(scheduler, latents.shape[0])
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    control = _latents(pipe.vae, batch["conditioning_pixel_values"])
    common = dict(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        return_dict=False,
    )
    samples = controlnet(controlnet_cond=control, **common)[0]
    pred = transformer(block_controlnet_hidden_states=samples, **common)[0]
    pred = pred * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    return torch.mean((weighting.float() * (pred.float() - latents.float()) ** 2).reshape(len(latents), -1), 1).mean()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_one_control_step_equals_the_flow_controlnet_scripts(saved, family):
    from visionpeft.trainers.flow_matching import flow_training_scheduler

    pipe = load_pipeline(str(saved / family))
    vp.attach(pipe, "controlnet", **LAYERS[family])
    perturb(pipe)  # the zero-initialised input projection would leave the rest without a gradient
    controlnet = copy.deepcopy(backbone_of(pipe).model.controlnet)
    knobs = DiffusionObjective(weighting_scheme="logit_normal")  # both scripts' default
    denoiser = ControlDenoiser(pipeline_modules(pipe), pipe, "uniform", knobs)
    torch.manual_seed(5)
    ours = denoiser(_batch())
    ours.backward()
    grads = {name.split(".", 1)[1]: p.grad for name, p in vp.trainable_parameters(pipe)}

    plain = load_pipeline(str(saved / family))  # the scripts call the plain transformer
    reference = _script_flux_loss if family == "flux" else _script_sd3_loss
    torch.manual_seed(5)
    theirs = reference(plain, plain.transformer, controlnet, flow_training_scheduler(pipe), _batch())
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    expected = {name: p.grad for name, p in controlnet.named_parameters()}
    assert grads.keys() == expected.keys() and len(grads) > 10
    # SD3: the last copied block's text-side outputs reach nothing, in the script as here (no gradient)
    assert {n for n, g in grads.items() if g is None} == {n for n, g in expected.items() if g is None}
    grads = {name: grad for name, grad in grads.items() if grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6, msg=name)
    assert len(grads) > 10 and sum(float(g.abs().sum()) for g in grads.values()) > 0


def _draw(pipe, family, latents, control=None, **options):
    """Two sampling steps from fixed latents; the VAE's sample of the condition comes from the global stream
    seeded 7 (diffusers' Flux pipeline draws it from the generator given, its SD3 pipeline from the global
    stream)."""
    torch.manual_seed(7)
    extra = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 1.0}
    if control is not None:
        extra["control_image"] = control
        if family == "flux":
            extra["generator"] = torch.Generator().manual_seed(7)
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent", max_sequence_length=16)
    return pipe(PROMPTS[0], latents=latents.clone(), **args, **extra, **options).images


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_export_loads_in_diffusers_flow_control_pipelines(saved, tmp_path, family):
    """`save_adapter(format="diffusers")` writes controlnet/; FluxControlNetModel / SD3ControlNetModel
    .from_pretrained in FluxControlNetPipeline / StableDiffusion3ControlNetPipeline draw visionpeft's latents
    (<= 1e-5; the pipelines take a tensor condition as it is: Flux's in [-1, 1], SD3's in [0, 1], as the scripts
    train them); the control changes the draw, and at scale 0 the control pipeline draws the base pipeline's."""
    import diffusers

    pipe = vp.attach(load_pipeline(str(saved / family)), "controlnet", **LAYERS[family])
    perturb(pipe, std=0.05)
    control = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    shape = (1, 16, 16) if family == "flux" else (1, 4, 8, 8)  # packed 8 x 8 latents / 4 channels at 8 x 8
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with vp.conditioning(pipe, control_image=control):
        ours = _draw(pipe, family, latents)
    vp.save_adapter(pipe, tmp_path / "out", format="diffusers")

    base = load_pipeline(str(saved / family))
    classes = {
        "flux": (diffusers.FluxControlNetModel, diffusers.FluxControlNetPipeline),
        "sd3": (diffusers.SD3ControlNetModel, diffusers.StableDiffusion3ControlNetPipeline),
    }
    model_class, pipeline_class = classes[family]
    controlnet = model_class.from_pretrained(tmp_path / "out" / "controlnet")
    theirs_pipe = pipeline_class(**base.components, controlnet=controlnet)
    theirs_pipe.set_progress_bar_config(disable=True)
    given = control * 2 - 1 if family == "flux" else control
    theirs = _draw(theirs_pipe, family, latents, given)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    plain = _draw(base, family, latents)
    assert (ours - plain).abs().max() > 1e-3  # the control changes the draw
    zero = _draw(theirs_pipe, family, latents, given, controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)


def test_what_a_flow_controlnet_cannot_do_is_one_line(saved):
    sd3 = load_pipeline(str(saved / "sd3"))
    with pytest.raises(ConfigError, match="fewer blocks than the transformer's 2") as err:
        vp.attach(sd3, "controlnet")  # from_transformer's 12 on a 2-block transformer
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no single-stream blocks"):
        vp.attach(load_pipeline(str(saved / "sd3")), "controlnet", num_layers=1, num_single_layers=1)
    with pytest.raises(ConfigError, match="for U-Net ControlNets"):
        vp.attach(load_pipeline(str(saved / "flux")), "controlnet", guess_mode=True, **LAYERS["flux"])
    with pytest.raises(ConfigError, match="a Flux / SD3 transformer has none"):
        vp.attach(load_pipeline(str(saved / "flux")), "controlnet", sd_locked=False, **LAYERS["flux"])
    with pytest.raises(IncompatibleMethodError, match="UNet2DConditionModel"):
        vp.attach(load_pipeline(str(saved / "flux")), "controlnet_lora")
    flux = vp.attach(load_pipeline(str(saved / "flux")), "controlnet", **LAYERS["flux"])
    with (
        pytest.raises(DataError, match="encodes to") as err,
        vp.conditioning(flux, control_image=torch.rand(1, 3, 8, 8)),
    ):
        _draw(flux, "flux", torch.randn(1, 16, 16))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "layers"),
    [("flux", ["method.num_layers=1", "method.num_single_layers=1"]), ("sd3", ["method.num_layers=1"])],
)
def test_the_flow_control_recipes_run_and_leave_a_controlnet_diffusers_loads(saved, family, layers):
    """configs/control/controlnet_{flux,sd3}_fill.yaml on the tiny layouts (fill50k pairs at 16 px, two steps): the
    run validates and writes controlnet/, which the family's ControlNet class loads with the trained weights."""
    import diffusers
    import train as tool
    from safetensors.torch import load_file

    from visionpeft.cli.common import run
    from visionpeft.data.fill50k import make_fill50k

    make_fill50k(saved / "fill", n=4, size=SIZE, seed=0)
    args = train_args(
        f"control/controlnet_{family}_fill",
        saved / "runs",
        family,
        f"model.name={saved / family}",
        f"data.root={saved / 'fill'}",
        f"data.size={SIZE}",
        "optim.steps=2",
        "optim.warmup_steps=0",
        "optim.max_sequence_length=16",
        "train.eval_every=2",
        "train.validation_steps=2",
        *layers,
    )
    assert run(tool.main, args) == 0
    folder = saved / "runs" / family
    model_class = diffusers.FluxControlNetModel if family == "flux" else diffusers.SD3ControlNetModel
    controlnet = model_class.from_pretrained(folder / "controlnet")
    trained = load_file(folder / "adapter" / "visionpeft_adapter.safetensors")
    for name, tensor in controlnet.state_dict().items():
        torch.testing.assert_close(tensor, trained[f"controlnet.{name}"], rtol=0, atol=0)
    assert (folder / "validation" / "001.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_generate_draws_with_a_flow_controlnet_folder_what_the_diffusers_pipeline_draws(saved, tmp_path, family):
    """tools/generate.py --control RUN/controlnet on a Flux / SD3 folder reads it back as a controlnet (methods/
    folders.py) and draws, for seed 3, FluxControlNetPipeline's / StableDiffusion3ControlNetPipeline's image with
    that folder's model and generator seed 3 (SD3's pipeline draws the condition's latent sample from torch's global
    stream: seeded 3 there, as generate seeds it); Flux's pipeline takes the condition image as a PIL image, SD3's as
    the [0, 1] tensor its script trains on. The control changes the image."""
    import diffusers
    import numpy as np
    from PIL import Image

    from visionpeft.cli import generate
    from visionpeft.cli.common import run
    from visionpeft.data.image_grid import image_grid, scale_for

    pipe = vp.attach(load_pipeline(str(saved / family)), "controlnet", **LAYERS[family])
    perturb(pipe, std=0.05)
    vp.save_adapter(pipe, tmp_path / "run", format="diffusers")
    pixels = (np.random.default_rng(3).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "condition.png")
    guidance = "3.5" if family == "flux" else "5.0"

    def generated(*control: str) -> np.ndarray:
        out = tmp_path / f"grid{len(control)}.png"
        args = ["--model", str(saved / family), "--prompt", PROMPTS[0], "--seeds", "3", "--steps", "2"]
        assert (
            run(generate.main, [*args, "--size", str(SIZE), "--guidance", guidance, *control, "--out", str(out)]) == 0
        )
        return np.asarray(Image.open(out)).astype(int)

    control = ["--control", str(tmp_path / "run" / "controlnet"), "--control-image", str(tmp_path / "condition.png")]
    ours = generated(*control)

    model_class = getattr(diffusers, "FluxControlNetModel" if family == "flux" else "SD3ControlNetModel")
    pipeline_class = getattr(
        diffusers, "FluxControlNetPipeline" if family == "flux" else "StableDiffusion3ControlNetPipeline"
    )
    base = load_pipeline(str(saved / family))
    theirs_pipe = pipeline_class(
        **base.components, controlnet=model_class.from_pretrained(tmp_path / "run" / "controlnet")
    )
    theirs_pipe.set_progress_bar_config(disable=True)
    given = (
        Image.fromarray(pixels) if family == "flux" else torch.from_numpy(pixels / 255.0).float().permute(2, 0, 1)[None]
    )
    torch.manual_seed(3)
    image = theirs_pipe(
        PROMPTS[0],
        control_image=given,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        guidance_scale=float(guidance),
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    theirs = np.asarray(image_grid([[image]], scale=scale_for(SIZE), gap=generate.GAP, margin=generate.GAP)).astype(int)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - generated()).max() > 10  # the control changes the image


def test_flow_controlnet_folders_visionpeft_cannot_rebuild_are_one_line(saved, tmp_path):
    """generate --control on a released layout visionpeft's Flux / SD3 ControlNet does not build (a union Flux
    ControlNet, an SD3 one with zero pooled text: InstantX's) or one built for other transformer widths: one line."""
    from diffusers import FluxControlNetModel

    from visionpeft.cli.generate import apply_adapter
    from visionpeft.errors import CheckpointError
    from visionpeft.methods.flow_controlnet import build_flow_controlnet

    flux = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}
    flux.update(joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True)
    FluxControlNetModel(**flux, attention_head_dim=16, axes_dims_rope=(4, 4, 8), num_mode=3).save_pretrained(
        tmp_path / "union"
    )
    FluxControlNetModel(**flux, attention_head_dim=8, axes_dims_rope=(2, 2, 4)).save_pretrained(tmp_path / "narrow")
    sd3 = load_pipeline(str(saved / "sd3"))
    instantx = build_flow_controlnet(sd3.transformer, "sd3", 1, None)
    instantx.register_to_config(force_zeros_for_pooled_projection=True)
    instantx.save_pretrained(tmp_path / "instantx")
    cases = [
        (
            "flux",
            "union",
            "this FluxControlNetModel has num_mode 3 (a union ControlNet reading a control mode), which "
            "visionpeft's FluxControlNet does not build; load it in diffusers' FluxControlNetPipeline",
        ),
        (
            "flux",
            "narrow",
            "the FluxControlNetModel folder does not fit the FluxControlNetModel this pipeline's denoiser builds: ",
        ),
        (
            "sd3",
            "instantx",
            "this SD3ControlNetModel has force_zeros_for_pooled_projection (zero pooled text, "
            "condition latents unshifted), which visionpeft's SD3ControlNet does not build; load it in diffusers' "
            "StableDiffusion3ControlNetPipeline",
        ),
    ]
    for family, folder, message in cases:
        with pytest.raises(CheckpointError) as err:
            apply_adapter(load_pipeline(str(saved / family)), tmp_path / folder)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
