"""The `t2i_adapter` method on a tiny U-Net: diffusers' own T2IAdapter as a side tower, its states passed as
``down_intrablock_additional_residuals`` to each U-Net call made inside ``vp.conditioning``; it has diffusers' tensors
and the shapes the down blocks take, trains, saves and loads like any adapter, and detaches to the plain U-Net."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import assert_same_state, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.errors import ConfigError, DataError, IncompatibleMethodError

FIT = {"downscale_factor": 2}  # the tiny pipelines' VAE downsamples by 2: 16 px images, 8 x 8 latents
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])
CONTROL = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _three_block_unet(seed: int = 0, down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")):
    """A tiny U-Net whose last two down blocks are as wide (16, 32, 32), the layout a light adapter fits."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    up = tuple("UpBlock2D" if d == "DownBlock2D" else "CrossAttnUpBlock2D" for d in reversed(down))
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()


def _run(unet, control=CONTROL, **kwargs):
    with vp.conditioning(unet, control_image=control):
        return unet(LATENTS, STEPS, encoder_hidden_states=TEXT, **kwargs).sample


def _plain(unet=None, **kwargs):
    unet = tiny_unet() if unet is None else unet
    return unet(LATENTS, STEPS, encoder_hidden_states=TEXT, **kwargs).sample


def _trained(unet):
    """Moves the adapter off its initialisation (the tests' stand-in for a trained adapter)."""
    with torch.no_grad():
        for p in unet.t2i_adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


@pytest.mark.parametrize(
    ("make_unet", "options"),
    [(tiny_unet, {}), (_three_block_unet, {"adapter_type": "light_adapter", "num_res_blocks": 1})],
    ids=["full_adapter", "light_adapter"],
)
def test_the_tower_is_diffusers_t2i_adapter_and_its_states_fit_the_down_blocks(make_unet, options):
    from diffusers import T2IAdapter

    unet = vp.attach(make_unet(), "t2i_adapter", **FIT, **options)
    channels = [16, 32]  # light: the U-Net's widths but the last, which its extra block repeats
    make_unet()  # the same random stream as the attach above
    reference = T2IAdapter(
        in_channels=3,
        channels=channels,
        num_res_blocks=options.get("num_res_blocks", 2),
        downscale_factor=2,
        adapter_type=options.get("adapter_type", "full_adapter"),
    )
    ours = unet.t2i_adapter.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    count = sum(p.numel() for p in reference.parameters())
    assert vp.count_parameters(unet)["by_group"] == {"t2i_adapter": count}
    assert all(p.dtype == torch.float32 for p in unet.t2i_adapter.parameters())

    taken = []  # what each down block adds a state to: its last resnet's output (attention keeps the shape)
    hooks = [b.resnets[-1].register_forward_hook(lambda m, i, o: taken.append(o.shape)) for b in unet.down_blocks]
    vp.detach(unet)
    _plain(unet)
    for hook in hooks:
        hook.remove()
    assert [state.shape for state in reference(CONTROL)] == taken


def test_scale_zero_is_the_plain_unet_and_scale_one_steers_it_through_down_intrablock_residuals():
    plain = _plain()
    quiet = vp.attach(tiny_unet(), "t2i_adapter", **FIT, conditioning_scale=0.0)
    torch.testing.assert_close(_run(quiet), plain, rtol=0, atol=0)

    unet = vp.attach(tiny_unet(), "t2i_adapter", **FIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated down_block_additional_residuals path
        out = _run(unet)
    assert not torch.allclose(out, plain)
    states = unet.t2i_adapter(CONTROL)
    expected = _plain(tiny_unet(), down_intrablock_additional_residuals=[s.detach() for s in states])
    torch.testing.assert_close(out.detach(), expected)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.t2i_adapter.parameters())
    assert all(p.grad is None for name, p in unet.named_parameters() if not name.startswith("t2i_adapter."))

    half = vp.attach(tiny_unet(), "t2i_adapter", **FIT, conditioning_scale=0.5)
    half.t2i_adapter.load_state_dict(unet.t2i_adapter.state_dict())
    with torch.no_grad():
        scaled = [0.5 * s for s in unet.t2i_adapter(CONTROL)]
        torch.testing.assert_close(_run(half), _plain(down_intrablock_additional_residuals=scaled))


def test_states_add_to_another_controls():
    """With a ControlNet attached too, and with states the caller passes itself, the U-Net gets the sums."""
    torch.manual_seed(5)
    extra = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    unet = _trained(vp.attach(tiny_unet(), [("controlnet", {"hint_channels": [16, 32]}), ("t2i_adapter", FIT)]))
    with torch.no_grad():
        for conv in [*unet.controlnet.controlnet_down_blocks, unet.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
        out = _run(unet, down_intrablock_additional_residuals=list(extra))
        down, mid = unet.controlnet(
            LATENTS, STEPS, encoder_hidden_states=TEXT, controlnet_cond=CONTROL, return_dict=False
        )
        states = [e + s for e, s in zip(extra, unet.t2i_adapter(CONTROL))]
        expected = _plain(
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            down_intrablock_additional_residuals=states,
        )
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, _plain(down_block_additional_residuals=down, mid_block_additional_residual=mid))


def test_the_adapter_stays_fp32_on_a_half_precision_unet():
    unet = vp.attach(tiny_unet().to(torch.bfloat16), "t2i_adapter", **FIT)
    assert {p.dtype for p in unet.t2i_adapter.parameters()} == {torch.float32}
    with torch.no_grad(), vp.conditioning(unet, control_image=CONTROL.half()):
        out = unet(LATENTS.bfloat16(), STEPS, encoder_hidden_states=TEXT.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_load_and_detach(tmp_path):
    unet = _trained(vp.attach(tiny_unet(), "t2i_adapter", **FIT))
    expected = _run(unet)
    vp.save_adapter(unet, tmp_path)
    fresh = vp.load_adapter(tiny_unet(), tmp_path)
    torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=0)
    vp.detach(fresh)
    assert not hasattr(fresh, "t2i_adapter")
    assert_same_state(fresh, tiny_unet())
    torch.testing.assert_close(_plain(fresh), _plain(), rtol=0, atol=0)
    assert not vp.can_merge(unet)
    with pytest.raises(IncompatibleMethodError, match="cannot be merged"):
        vp.merge(unet)


def test_on_a_pipeline_the_control_reaches_every_guided_denoising_call(tmp_path):
    """Attached to a Stable Diffusion pipeline (classifier-free guidance doubles the U-Net batch, one control image
    serves both halves): a zero scale gives the base pipeline's image, an adapter a different one."""
    from tiny_models import tiny_sd_pipeline

    def sample(pipe, control=None):
        args = dict(
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="np",
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
        )
        if control is None:
            return torch.from_numpy(pipe("a photo", **args).images)
        with vp.conditioning(pipe, control_image=control):
            return torch.from_numpy(pipe("a photo", **args).images)

    plain = sample(tiny_sd_pipeline(tmp_path / "tok"))
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    pipe = vp.attach(tiny_sd_pipeline(tmp_path / "tok2"), "t2i_adapter", **FIT, conditioning_scale=0.0)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    torch.testing.assert_close(sample(pipe, control), plain, rtol=0, atol=0)
    assert batches == [2, 2]
    vp.detach(pipe)
    vp.attach(pipe, "t2i_adapter", **FIT)
    assert not torch.allclose(sample(pipe, control), plain)


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line():
    unet = vp.attach(tiny_unet(), "t2i_adapter", **FIT)
    with pytest.raises(DataError, match=r"needs \(batch, 3, 16, 16\) for latents of \(8, 8\)") as err:
        _run(unet, torch.rand(2, 3, 64, 64))
    assert "downscales by 2" in _one_line(err)
    with pytest.raises(DataError, match="3 control images for a batch of 2"):
        _run(unet, torch.rand(3, 3, 16, 16))
    with pytest.raises(ConfigError, match="needs a per-call control_image"):
        _plain(unet)
    with pytest.raises(IncompatibleMethodError, match="UNet2DConditionModel") as err:
        vp.attach(tiny_vit(), "t2i_adapter")
    _one_line(err)


@pytest.mark.parametrize(
    ("make_unet", "options", "message"),
    [
        (
            tiny_unet,
            {"channels": [16, 64]},
            r"gives states of widths \[16, 64\]; the U-Net's 2 down blocks take "
            r"\[16, 32\]",
        ),
        (tiny_unet, {"channels": [16, 32, 64]}, r"widths \[16, 32, 64\]; the U-Net's 2 down blocks"),
        (tiny_unet, {"adapter_type": "light_adapter"}, r"widths \[16, 16\].*light_adapter repeats its last width"),
        (
            lambda: _three_block_unet(down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")),
            {},
            r"down block 0 \(DownBlock2D\): the U-Net adds its state after the block's downsampler",
        ),
    ],
    ids=["widths", "count", "light_on_unequal_last_blocks", "sdxl_layout"],
)
def test_an_adapter_that_does_not_fit_the_unet_is_refused_at_attach(make_unet, options, message):
    unet = make_unet()
    with pytest.raises(IncompatibleMethodError, match=message) as err:
        vp.attach(unet, "t2i_adapter", **FIT, **options)
    _one_line(err)
    assert not hasattr(unet, "t2i_adapter") and not vp.attached_methods(unet)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="must be one of full_adapter, light_adapter, full_adapter_xl, got 'xl'"):
        vp.attach(tiny_unet(), "t2i_adapter", adapter_type="xl")
    with pytest.raises(ConfigError, match=r"'channels' must be widths of at least 4 for light_adapter, got \[2, 2\]"):
        vp.attach(_three_block_unet(), "t2i_adapter", adapter_type="light_adapter", channels=[2, 2])
    with pytest.raises(ConfigError, match="'downscale_factor' must be at least 1"):
        vp.attach(tiny_unet(), "t2i_adapter", downscale_factor=0)


def test_on_the_sd15_unet_it_trains_tencentarcs_77m():
    """T2I-Adapter for SD 1.5 as diffusers builds it, ``T2IAdapter(in_channels=3, channels=[320, 640, 1280, 1280],
    num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter")``: 77,369,280 parameters, the configuration of
    TencentARC's released SD 1.x adapters with a 3-channel condition (``t2iadapter_zoedepth_sd15v1``,
    ``t2iadapter_seg_sd14v1``; the model cards' "77 M"). The light adapter of their colour release
    (``channels=[320, 640, 1280]``, 4 residual blocks): 18,689,200."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
        )
    assert vp.count_parameters(vp.attach(unet, "t2i_adapter"))["by_group"] == {"t2i_adapter": 77_369_280}
    vp.detach(unet)
    light = vp.attach(unet, "t2i_adapter", adapter_type="light_adapter", num_res_blocks=4)
    assert vp.count_parameters(light)["by_group"] == {"t2i_adapter": 18_689_200}


def test_while_sampling_the_adapter_runs_once_per_condition_image():
    """Under no_grad (sampling), repeated U-Net calls with the same condition image reuse the adapter's states; a new
    image, or training, computes them again."""
    unet = vp.attach(tiny_unet(), "t2i_adapter", downscale_factor=2)
    calls = []
    adapter = backbone_of(unet).model.t2i_adapter
    adapter.register_forward_hook(lambda *args: calls.append(1))
    latents, text, control = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad(), vp.conditioning(unet, control_image=control):
        first = unet(latents, 10, encoder_hidden_states=text).sample
        again = unet(latents, 500, encoder_hidden_states=text).sample
    assert len(calls) == 1 and not torch.equal(first, again)
    with torch.no_grad(), vp.conditioning(unet, control_image=torch.rand(1, 3, 16, 16)):
        unet(latents, 10, encoder_hidden_states=text)
    assert len(calls) == 2
    with vp.conditioning(unet, control_image=control):
        unet(latents, 10, encoder_hidden_states=text)
        unet(latents, 10, encoder_hidden_states=text)
    assert len(calls) == 4


def test_each_control_takes_its_own_condition_image():
    """control_image={"controlnet": edges, "t2i_adapter": depth}: each side tower reads its own image."""
    torch.manual_seed(5)
    unet = _trained(vp.attach(tiny_unet(), [("controlnet", {"hint_channels": [16, 32]}), ("t2i_adapter", FIT)]))
    other = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for conv in [*unet.controlnet.controlnet_down_blocks, unet.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
        out = _run(unet, control={"controlnet": CONTROL, "t2i_adapter": other})
        down, mid = unet.controlnet(
            LATENTS, STEPS, encoder_hidden_states=TEXT, controlnet_cond=CONTROL, return_dict=False
        )
        expected = _plain(
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            down_intrablock_additional_residuals=list(unet.t2i_adapter(other)),
        )
        torch.testing.assert_close(out, expected)
        assert not torch.allclose(out, _run(unet))  # not the shared image
    with pytest.raises(ConfigError, match="names lora, which is not an attached method that reads it"):
        _run(unet, control={"controlnet": CONTROL, "lora": other})
    with pytest.raises(ConfigError, match="names controlnet but not t2i_adapter, which reads it"):
        _run(unet, control={"controlnet": CONTROL})


SAMPLE = """
import sys, numpy as np, torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
adapter = T2IAdapter.from_pretrained(sys.argv[2])
pipe = StableDiffusionAdapterPipeline.from_pretrained(sys.argv[1], adapter=adapter, safety_checker=None,
                                                      requires_safety_checker=False)
control = torch.load(sys.argv[3])
images = [pipe("a photo", image=control, num_inference_steps=2, height=16, width=16, output_type="np",
               adapter_conditioning_scale=scale, generator=torch.Generator().manual_seed(0)).images
          for scale in (1.0, 0.0)]
np.save(sys.argv[4], np.stack(images))
"""


@pytest.mark.slow
def test_the_exported_adapter_loads_in_diffusers_adapter_pipeline_in_a_new_process(tmp_path):
    """`save_adapter(format="diffusers")` writes `t2i_adapter/`; diffusers' StableDiffusionAdapterPipeline, with no
    visionpeft import, draws the image visionpeft draws, and at scale 0 the base pipeline's."""
    import subprocess
    import sys

    import numpy as np
    from tiny_models import tiny_sd_pipeline

    from visionpeft.backbones.diffusers_loading import load_pipeline

    base = tmp_path / "base"
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(base)
    args = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    plain = load_pipeline(str(base))("a photo", generator=torch.Generator().manual_seed(0), **args).images
    pipe = vp.attach(load_pipeline(str(base)), "t2i_adapter", **FIT)
    _trained(backbone_of(pipe).model)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with vp.conditioning(pipe, control_image=control):
        ours = pipe("a photo", generator=torch.Generator().manual_seed(0), **args).images
    assert vp.can_export(pipe, "diffusers") and not np.allclose(ours, plain, atol=1e-3)
    vp.save_adapter(pipe, tmp_path / "out", format="diffusers")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t2i_adapter"]
    torch.save(control, tmp_path / "control.pt")
    script = [sys.executable, "-c", SAMPLE, str(base), str(tmp_path / "out" / "t2i_adapter")]
    result = subprocess.run(
        [*script, str(tmp_path / "control.pt"), str(tmp_path / "theirs.npy")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = np.load(tmp_path / "theirs.npy")
    np.testing.assert_allclose(theirs[0], ours, rtol=0, atol=1e-5)
    np.testing.assert_allclose(theirs[1], plain, rtol=0, atol=1e-5)
