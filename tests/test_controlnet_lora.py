"""`controlnet_lora`: the ControlNet copy frozen with LoRA on its linear layers, zero convs / hint encoder / norms
trained in full; the checkpoint holds only those, the copy is rebuilt from the U-Net on load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_controlnet import CONTROL, HINT, LATENTS, STEPS, TEXT, _run
from tiny_models import assert_same_state, tiny_unet
from torch import nn

import visionpeft as vp
from visionpeft.errors import ConfigError

OPTIONS = {**HINT, "r": 4}


def test_only_the_lora_factors_and_the_parts_a_fresh_controlnet_needs_train():
    from diffusers import ControlNetModel

    unet = vp.attach(tiny_unet(), "controlnet_lora", **OPTIONS)
    net = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=(16, 32))
    in_full = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")
    full = sum(p.numel() for name, p in net.named_parameters() if name.startswith(in_full))
    norms = sum(p.numel() for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for p in m.parameters())
    lora = sum(
        4 * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    )
    assert vp.count_parameters(unet)["by_group"] == {"controlnet_lora": full + norms + lora}
    assert lora > 0 and full + norms + lora < sum(p.numel() for p in net.parameters()) / 4


def test_fresh_it_changes_nothing_and_only_the_zero_convs_get_a_gradient():
    plain = tiny_unet()(LATENTS, STEPS, encoder_hidden_states=TEXT).sample
    unet = vp.attach(tiny_unet(), "controlnet_lora", **OPTIONS)
    out = _run(unet)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    out.square().mean().backward()
    moved = {name for name, p in vp.trainable_parameters(unet) if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(".controlnet_down_blocks." in n or ".controlnet_mid_block." in n for n in moved), moved


def test_the_checkpoint_holds_no_frozen_weight_and_reloads_exactly(tmp_path):
    unet = vp.attach(tiny_unet(), "controlnet_lora", **OPTIONS)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(unet):
            p.add_(0.05 * torch.randn_like(p))
    expected = _run(unet)
    vp.save_adapter(unet, tmp_path)
    saved = load_file(tmp_path / "visionpeft_adapter.safetensors")
    assert "controlnet.conv_in.weight" not in saved and any(k.endswith("to_q.lora_A") for k in saved)
    fresh = vp.load_adapter(tiny_unet(), tmp_path)
    torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=0)
    vp.detach(fresh)
    assert_same_state(fresh, tiny_unet())


def test_frozen_zero_convs_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="zero convs block every gradient upstream of them"):
        vp.attach(tiny_unet(), "controlnet_lora", **OPTIONS, train_full=["hint_encoder", "norms"])


def test_diffusers_load_lora_adapter_puts_the_lora_only_file_on_a_controlnet_from_the_unet(tmp_path):
    """The diffusers export writes, beside the merged controlnet/, controlnet_lora/pytorch_lora_weights.safetensors:
    ``ControlNetModel.from_unet(unet).load_lora_adapter(folder, weight_name=..., prefix=None)`` (diffusers'
    documented Control-LoRA call) gives the residuals visionpeft's ControlNet-LoRA gives; the file holds no frozen
    weight."""
    from diffusers import ControlNetModel

    unet = vp.attach(tiny_unet(), "controlnet_lora", **OPTIONS, alpha=8)  # scale 2: folded into lora_B
    with torch.no_grad():
        for _, p in vp.trainable_parameters(unet):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    expected = _run(unet)
    vp.save_adapter(unet, tmp_path, format="diffusers")
    assert (tmp_path / "controlnet" / "config.json").is_file()
    saved = load_file(tmp_path / "controlnet_lora" / "pytorch_lora_weights.safetensors")
    assert (
        "conv_in.weight" not in saved
        and "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" not in saved
    )
    assert sum(t.numel() for t in saved.values()) == vp.count_parameters(unet)["trainable"]

    base = tiny_unet()
    controlnet = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(16, 32))
    controlnet.load_lora_adapter(
        str(tmp_path / "controlnet_lora"), weight_name="pytorch_lora_weights.safetensors", prefix=None
    )
    down, mid = controlnet(LATENTS, STEPS, encoder_hidden_states=TEXT, controlnet_cond=CONTROL, return_dict=False)
    theirs = base(
        LATENTS,
        STEPS,
        encoder_hidden_states=TEXT,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, tiny_unet()(LATENTS, STEPS, encoder_hidden_states=TEXT).sample, atol=1e-3)
