"""A ControlNet attached to a U-Net that already carries a LoRA (diffusers' ``load_lora_weights``: PEFT layers, or a
visionpeft LoRA) is built from the U-Net's base weights, as ``ControlNetModel.from_unet`` builds it on the plain U-Net;
``tools/generate.py --adapter pytorch_lora_weights.safetensors --control RUN/controlnet`` draws what diffusers draws
with the same pieces applied by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import assert_same_state, perturb, tiny_sd_pipeline, tiny_unet

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.cli.common import run
from visionpeft.cli.generate import apply_adapter, control_inputs, main, sample

HINT = {"hint_channels": [16, 32]}  # a 2x hint encoder: the tiny pipelines' VAE downsamples by 2
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])


def _plain_controlnet():
    """diffusers' ControlNet of the plain tiny U-Net, its own parts drawn after ``torch.manual_seed(0)``."""
    from diffusers import ControlNetModel

    unet = tiny_unet()
    torch.manual_seed(0)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))


def _controlnet_of(model) -> torch.nn.Module:
    return backbone_of(model).model.controlnet


def test_a_controlnet_after_a_visionpeft_lora_copies_the_base_weights_and_leaves_the_lora_in_place():
    unet = perturb(vp.attach(tiny_unet(), "lora", r=2, targets=["q", "v"]), std=0.3)
    before = unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    torch.manual_seed(0)  # the hint encoder's and zero convs' draws, as for the plain U-Net's ControlNet
    vp.attach(unet, "controlnet", **HINT)
    assert_same_state(_controlnet_of(unet), _plain_controlnet())
    with vp.conditioning(unet, control_image=torch.rand(2, 3, 16, 16)):  # a fresh ControlNet adds zeros
        torch.testing.assert_close(unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample, before, rtol=0, atol=0)


def test_a_controlnet_after_a_diffusers_lora_copies_the_base_weights_and_leaves_the_peft_layers(tmp_path):
    lora = perturb(vp.attach(tiny_sd_pipeline(tmp_path / "tok"), "lora", r=2, targets=["q", "v"]), std=0.3)
    vp.save_adapter(lora, tmp_path / "lora", format="diffusers")
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    pipe.load_lora_weights(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    keys = list(pipe.unet.state_dict())
    assert any(".base_layer." in key for key in keys)  # PEFT's lora.Linear, whose keys from_unet cannot read
    torch.manual_seed(0)
    vp.attach(pipe, "controlnet", **HINT)
    assert list(pipe.unet.state_dict()) == keys
    assert_same_state(_controlnet_of(pipe), _plain_controlnet())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control_beside_lora")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    for name, method in (("lora", ("lora", {"r": 2, "targets": ["q", "v"]})), ("cn", ("controlnet", HINT))):
        model = perturb(vp.attach(tiny_sd_pipeline(tmp / "tok"), [method]), std=0.3, seed=len(name))
        vp.save_adapter(model, tmp / name, format="diffusers")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "edges.png")
    return tmp


def test_generate_with_a_diffusers_lora_and_a_controlnet_draws_what_diffusers_draws(setup, capsys):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from visionpeft.backbones.diffusers_loading import load_pipeline

    lora_file, folder = setup / "lora" / "pytorch_lora_weights.safetensors", setup / "cn" / "controlnet"
    args = ["--model", setup / "pipe", "--prompt", "x", "--seeds", "0", "--steps", "2", "--device", "cpu"]
    args += ["--adapter", lora_file, "--control", folder, "--control-image", setup / "edges.png"]
    assert run(main, [*map(str, args), "--out", str(setup / "grid.png")]) == 0  # crashed in from_unet before
    assert "controlnet (ControlNetModel)" in capsys.readouterr().out

    options = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 7.5, "output_type": "np"}
    pipe = load_pipeline(str(setup / "pipe"))
    for path in (lora_file, folder):
        apply_adapter(pipe, path)
    inputs = control_inputs(pipe, [Image.open(setup / "edges.png")], 16)
    ours = np.stack(sample(pipe, "x", [0, 1], {"negative_prompt": None, **options}, inputs, None))

    by_hand = StableDiffusionControlNetPipeline.from_pretrained(
        setup / "pipe", controlnet=ControlNetModel.from_pretrained(folder), safety_checker=None
    )
    by_hand.set_progress_bar_config(disable=True)
    by_hand.load_lora_weights(str(lora_file))
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    theirs = by_hand(
        "x", image=inputs["control_image"], num_images_per_prompt=2, generator=generators, **options
    ).images
    assert np.abs(ours - theirs).max() <= 1e-5
    by_hand.unload_lora_weights()  # the LoRA shows in the images
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    without = by_hand("x", image=inputs["control_image"], num_images_per_prompt=2, generator=generators, **options)
    assert np.abs(ours - without.images).max() > 1e-3


def test_a_flux_controlnet_after_a_lora_copies_the_base_blocks_not_random_ones(tmp_path):
    """``FluxControlNetModel.from_transformer`` loads the blocks with ``strict=False``: on the LoRA's wrapped layers
    it used to keep their random initialisation without a word."""
    import copy

    from tiny_flow_models import tiny_flux_pipeline

    from visionpeft.methods.flow_controlnet import build_flow_controlnet

    pipe = tiny_flux_pipeline(tmp_path / "tok")
    expected = build_flow_controlnet(copy.deepcopy(pipe.transformer), "flux", 1, 1).state_dict()
    perturb(vp.attach(pipe, "lora"), std=0.3)
    vp.attach(pipe, "controlnet", num_layers=1, num_single_layers=1)
    state = _controlnet_of(pipe).state_dict()
    assert state.keys() == expected.keys()
    copied = [key for key in expected if not key.startswith("controlnet_")]  # the rest: zero convs / random draws
    assert "transformer_blocks.0.attn.to_q.weight" in copied
    for key in copied:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=key)
