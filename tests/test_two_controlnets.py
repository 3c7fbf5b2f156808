"""Two ControlNets on one U-Net: the second is ``controlnet_1`` (its key for ``vp.conditioning`` and
``count_parameters``, its tower, its checkpoint keys and its diffusers folder, as diffusers numbers a
``MultiControlNetModel``'s folders); both train, save, load, and draw what diffusers' pipeline draws with the list of
the two ControlNets on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import perturb, tiny_sd_pipeline, tiny_unet

import visionpeft as vp
from visionpeft.adapter import backbone_of, methods_of
from visionpeft.cli.common import run
from visionpeft.cli.generate import apply_adapter, control_inputs, main, sample
from visionpeft.errors import ConfigError

HINT = {"hint_channels": [16, 32]}  # a 2x hint encoder: the tiny pipelines' VAE downsamples by 2
TWO = [("controlnet", HINT), ("controlnet", {**HINT, "conditioning_scale": 0.5})]
EDGES, DEPTH = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
OPTIONS = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 7.5, "output_type": "np"}


def _draw(pipe, control):
    with vp.conditioning(pipe, control_image=control):
        return pipe("a photo", generator=torch.Generator().manual_seed(0), **OPTIONS).images


def _by_hand(base, controlnets, images=(EDGES, DEPTH), scales=(1.0, 0.5)):
    """diffusers' StableDiffusionControlNetPipeline with the list of ControlNets (its MultiControlNetModel)."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnets, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo", image=list(images), controlnet_conditioning_scale=list(scales), generator=generator, **OPTIONS
    ).images


def test_the_second_controlnet_has_its_own_key_tower_and_tensors():
    unet = vp.attach(tiny_unet(), TWO)
    first, second = methods_of(unet)
    assert (first.key, second.key) == ("controlnet", "controlnet_1")
    model = backbone_of(unet).model
    assert first.controlnet is model.controlnet and second.controlnet is model.controlnet_1
    per_net = sum(p.numel() for p in model.controlnet.parameters())
    assert vp.count_parameters(unet)["by_group"] == {"controlnet": per_net, "controlnet_1": per_net}
    names = [name for name, _ in vp.trainable_parameters(unet)]
    assert len(names) == 2 * len(list(model.controlnet.parameters())) and len(set(names)) == len(names)


def test_both_train_on_their_own_condition_image_and_a_missing_one_is_one_line():
    unet = perturb(vp.attach(tiny_unet(), TWO), std=0.05)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    with vp.conditioning(unet, control_image={"controlnet": EDGES, "controlnet_1": DEPTH}):
        unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample.square().mean().backward()
    model = backbone_of(unet).model
    for tower in (model.controlnet, model.controlnet_1):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.controlnet_down_blocks.parameters())
    with pytest.raises(ConfigError, match="^vp.conditioning's control_image names controlnet but not controlnet_1"):
        with vp.conditioning(unet, control_image={"controlnet": EDGES}):
            unet(latents, torch.tensor([500]), encoder_hidden_states=text)


def test_a_method_that_allows_one_per_tower_still_refuses_a_second():
    with pytest.raises(ConfigError, match="^lora is already attached to the 'unet' tower$"):
        vp.attach(tiny_unet(), ["lora", "lora"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pipeline folder and, trained on it, two ControlNets saved as visionpeft (``adapter/``) and diffusers."""
    tmp = tmp_path_factory.mktemp("two_controlnets")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    pipe = perturb(vp.attach(tiny_sd_pipeline(tmp / "tok"), TWO), std=0.3)
    vp.save_adapter(pipe, tmp / "run" / "adapter")
    vp.save_adapter(pipe, tmp / "run", format="diffusers")
    ours = _draw(pipe, {"controlnet": EDGES, "controlnet_1": DEPTH})
    swapped = _draw(pipe, {"controlnet": DEPTH, "controlnet_1": EDGES})
    return tmp, ours, swapped


def test_the_two_draw_what_diffusers_multi_controlnet_draws_from_the_exported_folders(saved):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    tmp, ours, swapped = saved
    assert sorted(p.name for p in (tmp / "run").iterdir() if p.name.startswith("controlnet")) == [
        "controlnet",
        "controlnet_1",
    ]
    loaded = MultiControlNetModel.from_pretrained(
        str(tmp / "run" / "controlnet")
    )  # reads controlnet, controlnet_1, ...
    assert len(loaded.nets) == 2
    theirs = _by_hand(tmp / "pipe", list(loaded.nets))
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(ours - swapped).max() > 1e-3  # each reads its own image


def test_the_two_load_back_from_the_adapter_folder(saved):
    tmp, ours, _ = saved
    pipe = vp.load_adapter(tiny_sd_pipeline(tmp / "tok"), tmp / "run" / "adapter")
    assert [m.key for m in methods_of(pipe)] == ["controlnet", "controlnet_1"]
    assert np.abs(_draw(pipe, {"controlnet": EDGES, "controlnet_1": DEPTH}) - ours).max() <= 1e-6


def test_generate_takes_two_controlnet_folders_each_with_its_image(saved, capsys):
    tmp, _, _ = saved
    for name, tensor in (("edges", EDGES), ("depth", DEPTH)):
        pixels = (tensor[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(tmp / f"{name}.png")
    folders = [tmp / "run" / "controlnet", tmp / "run" / "controlnet_1"]
    args = ["--model", tmp / "pipe", "--prompt", "a photo", "--seeds", "0", "--steps", "2", "--device", "cpu"]
    args += ["--control", folders[0], "--control-image", tmp / "edges.png"]
    args += ["--control", folders[1], "--control-image", tmp / "depth.png"]
    assert run(main, [*map(str, args), "--out", str(tmp / "grid.png")]) == 0  # "already attached" before

    from visionpeft.backbones.diffusers_loading import load_pipeline

    pipe = load_pipeline(str(tmp / "pipe"))
    for folder in folders:
        apply_adapter(pipe, folder)
    methods_of(pipe)[1].config.conditioning_scale = 0.5  # as trained; a diffusers folder does not hold the scale
    inputs = control_inputs(pipe, [Image.open(tmp / "edges.png"), Image.open(tmp / "depth.png")], 16)
    assert list(inputs["control_image"]) == ["controlnet", "controlnet_1"]
    options = {"negative_prompt": None, **OPTIONS}
    ours = np.stack(sample(pipe, "a photo", [0], options, inputs, None))
    from diffusers import ControlNetModel

    nets = [ControlNetModel.from_pretrained(folder) for folder in folders]
    read_back = inputs["control_image"].values()  # the images as generate read them from the PNG files
    assert np.abs(ours - _by_hand(tmp / "pipe", nets, images=read_back)).max() <= 1e-5


def test_a_controlnet_and_a_controlnet_lora_export_apart(tmp_path):
    """A ControlNet-LoRA beside a ControlNet takes the tower controlnet_1: its merged folder is controlnet_1/ and
    its LoRA-only file (keys relative to its own ControlNet) still loads onto ``ControlNetModel.from_unet``."""
    from diffusers import ControlNetModel

    unet = perturb(vp.attach(tiny_unet(), [("controlnet", HINT), ("controlnet_lora", {**HINT, "r": 4})]), std=0.05)
    assert [m.key for m in methods_of(unet)] == ["controlnet", "controlnet_lora"]
    vp.save_adapter(unet, tmp_path, format="diffusers")
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"controlnet", "controlnet_1", "controlnet_lora"}
    latents, steps, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 16)
    inputs = {"encoder_hidden_states": text, "controlnet_cond": DEPTH, "return_dict": False}
    ours = backbone_of(unet).model.controlnet_1(latents, steps, **inputs)
    from_lora = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=(16, 32))
    lora = {"weight_name": "pytorch_lora_weights.safetensors", "prefix": None}
    from_lora.load_lora_adapter(str(tmp_path / "controlnet_lora"), **lora)
    merged = ControlNetModel.from_pretrained(tmp_path / "controlnet_1")
    for net in (from_lora, merged):
        down, mid = net(latents, steps, **inputs)
        torch.testing.assert_close([*down, mid], [*ours[0], ours[1]], rtol=0, atol=1e-5)
    first = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    torch.testing.assert_close(first.state_dict(), backbone_of(unet).model.controlnet.state_dict(), rtol=0, atol=0)
