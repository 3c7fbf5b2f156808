"""The `controlnet` method on a tiny U-Net: diffusers' own ControlNetModel built from the U-Net as a side tower, its
residuals passed to each U-Net call made inside ``vp.conditioning``; a fresh ControlNet changes nothing, trains
through its zero convolutions first, saves and loads like any adapter, and detaches to the plain U-Net."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_same_state, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.errors import ConfigError, DataError, IncompatibleMethodError

HINT = {"hint_channels": [16, 32]}  # a 2x hint encoder: the tiny pipelines' VAE downsamples by 2
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])
CONTROL = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _run(unet, control=CONTROL):
    with vp.conditioning(unet, control_image=control):
        return unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample


def test_the_tower_is_diffusers_controlnet_built_from_the_unet():
    from diffusers import ControlNetModel

    unet = vp.attach(tiny_unet(), "controlnet", **HINT)
    reference = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=(16, 32))
    ours = unet.controlnet.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    count = sum(p.numel() for p in reference.parameters())
    assert vp.count_parameters(unet)["by_group"] == {"controlnet": count}


def test_a_fresh_controlnet_leaves_the_unet_output_unchanged_and_trains_through_its_zero_convs():
    plain = tiny_unet()(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    unet = vp.attach(tiny_unet(), "controlnet", **HINT)
    out = _run(unet)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    out.square().mean().backward()
    moved = {name for name, p in unet.controlnet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) for name in moved)


def test_the_control_image_steers_the_unet_once_the_zero_initialised_convs_have_trained():
    unet = vp.attach(tiny_unet(), "controlnet", **HINT)
    with torch.no_grad():
        zero_initialised = [
            *unet.controlnet.controlnet_down_blocks,
            unet.controlnet.controlnet_mid_block,
            unet.controlnet.controlnet_cond_embedding.conv_out,
        ]  # the hint's last conv starts at 0 too
        for conv in zero_initialised:
            conv.weight.normal_(0, 0.1)
    assert not torch.allclose(_run(unet), _run(unet, torch.zeros_like(CONTROL)))
    halved = vp.attach(tiny_unet(), "controlnet", **HINT, conditioning_scale=0.0)
    halved.controlnet.load_state_dict(unet.controlnet.state_dict())
    plain = tiny_unet()(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    torch.testing.assert_close(_run(halved), plain)  # scale 0: the base U-Net


def test_save_load_and_detach(tmp_path):
    unet = vp.attach(tiny_unet(), "controlnet", **HINT)
    with torch.no_grad():
        for p in unet.controlnet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = _run(unet)
    vp.save_adapter(unet, tmp_path)
    fresh = vp.load_adapter(tiny_unet(), tmp_path)
    torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=0)
    vp.detach(fresh)
    assert not hasattr(fresh, "controlnet")
    assert_same_state(fresh, tiny_unet())
    with pytest.raises(IncompatibleMethodError, match="cannot be merged"):
        vp.merge(vp.attach(tiny_unet(), "controlnet", **HINT))


def test_bad_control_inputs_are_one_line():
    unet = vp.attach(tiny_unet(), "controlnet", **HINT)
    with pytest.raises(DataError, match=r"needs \(batch, 3, 16, 16\) for latents of \(8, 8\)"):
        _run(unet, torch.rand(2, 3, 64, 64))
    with pytest.raises(ConfigError, match="needs a per-call control_image"):
        unet(LATENTS, STEPS, encoder_hidden_states=TEXT)
    with pytest.raises(IncompatibleMethodError, match="UNet2DConditionModel"):
        vp.attach(tiny_vit(), "controlnet")


def test_on_a_pipeline_the_control_reaches_every_denoising_call(tmp_path):
    """Attached to a Stable Diffusion pipeline (classifier-free guidance doubles the U-Net batch): a zero scale gives
    the base pipeline's image, a trained control a different one."""
    from tiny_models import tiny_sd_pipeline

    def sample(pipe, control):
        with vp.conditioning(pipe, control_image=control):
            return pipe(
                "a photo",
                num_inference_steps=2,
                height=16,
                width=16,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
            ).images

    base = tiny_sd_pipeline(tmp_path / "tok")
    plain = base(
        "a photo",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    pipe = vp.attach(tiny_sd_pipeline(tmp_path / "tok2"), "controlnet", **HINT, conditioning_scale=0.0)
    torch.testing.assert_close(torch.from_numpy(sample(pipe, control)), torch.from_numpy(plain))
    vp.detach(pipe)
    vp.attach(pipe, "controlnet", **HINT)
    net = backbone_of(pipe).model.controlnet
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.1)
    assert not torch.allclose(torch.from_numpy(sample(pipe, control)), torch.from_numpy(plain))


SAMPLE = """
import sys, numpy as np, torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
controlnet = ControlNetModel.from_pretrained(sys.argv[2])
pipe = StableDiffusionControlNetPipeline.from_pretrained(sys.argv[1], controlnet=controlnet, safety_checker=None,
                                                         requires_safety_checker=False)
control = torch.load(sys.argv[3])
images = pipe("a photo", image=control, num_inference_steps=2, height=16, width=16, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
np.save(sys.argv[4], images)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["controlnet", "controlnet_lora"])
def test_the_exported_controlnet_loads_in_diffusers_control_pipeline_in_a_new_process(tmp_path, method):
    """`save_adapter(format="diffusers")` writes `controlnet/` (for ControlNet-LoRA: the copy with its LoRA merged);
    diffusers' StableDiffusionControlNetPipeline, with no visionpeft import, draws the image visionpeft draws."""
    import subprocess
    import sys

    import numpy as np
    from tiny_models import tiny_sd_pipeline

    base = tmp_path / "base"
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(base)
    from visionpeft.backbones.diffusers_loading import load_pipeline

    pipe = vp.attach(load_pipeline(str(base)), method, **HINT)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(pipe):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with vp.conditioning(pipe, control_image=control):
        ours = pipe(
            "a photo",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
    assert vp.can_export(pipe, "diffusers")
    vp.save_adapter(pipe, tmp_path / "out", format="diffusers")
    torch.save(control, tmp_path / "control.pt")
    args = [
        sys.executable,
        "-c",
        SAMPLE,
        str(base),
        str(tmp_path / "out" / "controlnet"),
        str(tmp_path / "control.pt"),
        str(tmp_path / "theirs.npy"),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "theirs.npy"), ours, rtol=0, atol=1e-5)
