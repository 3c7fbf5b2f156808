"""A diffusers model folder a method exports (a ControlNetModel, a T2IAdapter) is read back as that method by the
methods' own declaration (``diffusers_folder_class``): the same tower, the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_unet

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import CheckpointError
from visionpeft.methods.folders import folder_classes, read_diffusers_folder

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])
CONTROL = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _run(unet):
    with torch.no_grad(), vp.conditioning(unet, control_image=CONTROL):
        return unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample


def _trained(unet, tower: str):
    """Moves the control tower off its initialisation (a stand-in for training)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in getattr(unet, tower).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return unet


@pytest.mark.parametrize(
    ("method", "options", "tower"),
    [
        ("controlnet", {"hint_channels": [16, 32], "conditioning_channels": 3}, "controlnet"),
        ("t2i_adapter", {"downscale_factor": 2, "num_res_blocks": 1}, "t2i_adapter"),
    ],
)
def test_an_exported_folder_reads_back_as_its_method(tmp_path, method, options, tower):
    unet = _trained(vp.attach(tiny_unet(), method, **options), tower)
    getattr(unet, tower).save_pretrained(tmp_path / tower)
    folder = read_diffusers_folder(tmp_path / tower)
    assert folder.method == method and options.items() <= folder.options.items()
    assert folder_classes()[folder.class_name] == method
    fresh = vp.attach(tiny_unet(), folder.method, **folder.options)
    methods_of(fresh)[-1].load_folder_model(folder.model)
    torch.testing.assert_close(_run(fresh), _run(unet), rtol=0, atol=0)


def test_a_folder_no_method_reads_is_one_line(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError) as err:
        read_diffusers_folder(tmp_path / "unet")
    assert str(err.value) == (
        f"{tmp_path / 'unet'} holds a UNet2DConditionModel, not a model folder a method reads "
        "(ControlNetModel, FluxControlNetModel, SD3ControlNetModel, T2IAdapter)"
    )
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="holds a config.json without a _class_name, not a model folder"):
        read_diffusers_folder(tmp_path / "list")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_diffusers_folder(tmp_path / "bad")
