"""Files and numbers other libraries agree with: PEFT's LoRA and diffusers' LoRA loader."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import _run_vit, sample_images, tiny_sd_pipeline, tiny_vit

import visionpeft as vp
from visionpeft.checkpoint.folder import adapter_state_dict


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_matches_peft_with_the_same_weights():
    ours = vp.attach(tiny_vit(), "lora", r=4, alpha=8, targets=["o", "fc1", "fc2"])
    _randomize(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.proj", "mlp.fc1", "mlp.fc2"])
    theirs = peft.get_peft_model(tiny_vit(), config)
    names = {"attn.proj": "attn.o", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    with torch.no_grad():
        for i in range(2):
            for module_path, canonical in names.items():
                layer = theirs.base_model.model.get_submodule(f"blocks.{i}.{module_path}")
                update = dict(adapter_state_dict(ours))
                layer.lora_A["default"].weight.copy_(update[f"blocks.{i}.{canonical}.lora_A"])
                layer.lora_B["default"].weight.copy_(update[f"blocks.{i}.{canonical}.lora_B"])
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
    torch.testing.assert_close(_run_vit(ours), _run_vit(theirs), rtol=1e-5, atol=1e-6)


def test_fused_qv_lora_exports_to_a_file_peft_loads(tmp_path):
    ours = vp.attach(tiny_vit(), "lora", r=4, targets=["q", "v", "fc2"])
    _randomize(ours)
    vp.save_adapter(ours, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    torch.testing.assert_close(_run_vit(loaded), _run_vit(ours), rtol=1e-5, atol=1e-5)


def test_unet_lora_loads_into_a_diffusers_pipeline(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(pipe, "lora", r=4, alpha=2, targets=["q", "k", "v", "o"])
    _randomize(pipe.unet)

    def sample(p):
        return sample_images(p, "a photo of a cat")

    ours = sample(pipe)
    vp.save_adapter(pipe, tmp_path / "lora", format="diffusers")
    fresh = tiny_sd_pipeline(tmp_path / "tok")
    base = sample(fresh)
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = sample(fresh)
    assert abs(ours - base).max() > 1e-3  # the LoRA changes the image ...
    assert abs(loaded - ours).max() < 1e-4  # ... and diffusers' loader reproduces it


def test_diffusers_format_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(vp.VisionPEFTError, match="for a Stable Diffusion U-Net"):
        vp.save_adapter(vp.attach(tiny_vit(), "lora"), tmp_path, format="diffusers")
    with pytest.raises(vp.VisionPEFTError, match="vpt cannot be exported"):
        vp.save_adapter(vp.attach(tiny_vit(), [("vpt", {}), ("lora", {})]), tmp_path, format="peft")


def test_unet_and_text_encoder_lora_load_into_a_diffusers_pipeline(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(
        pipe,
        [
            ("lora", {"r": 4, "targets": ["q", "k", "v", "o"]}),
            ("lora", {"r": 4, "tower": "text_encoder", "targets": ["q", "k", "v", "o"]}),
        ],
    )
    groups = vp.count_parameters(pipe)["by_group"]
    assert groups["lora"] > 0 and set(groups) == {"lora"}
    _randomize(pipe.unet)
    _randomize(pipe.text_encoder, seed=1)

    def sample(p):
        return sample_images(p, "a photo of a dog")

    ours = sample(pipe)
    vp.save_adapter(pipe, tmp_path / "lora", format="diffusers")
    fresh = tiny_sd_pipeline(tmp_path / "tok")
    fresh.load_lora_weights(tmp_path / "lora")
    assert abs(sample(fresh) - ours).max() < 1e-4
