"""DoRA (LoRA's ``use_dora`` option): unchanged at initialisation, exact merge, equal to PEFT's DoRA layers (outputs
and gradients, the norm detached), exact parameter counts, files PEFT and diffusers load."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import CASES, _run_unet, _run_vit, sample_images, tiny_sd_pipeline, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.checkpoint.folder import adapter_state_dict

TARGETS = {
    "vit": ["q", "v", "fc1"],  # Q and V inside timm's fused qkv, and a plain Linear
    "clip_vision": ["q", "v", "o", "fc1"],  # nn.MultiheadAttention slots (weight space) and a Linear
    "clip_text": ["k", "o"],
    "unet": ["q", "k", "o", "conv1", "conv2"],  # diffusers Linear and Conv2d
}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", TARGETS)
def test_dora_starts_unchanged_and_merges_exactly(case):
    c = CASES[case]
    model = c.factory()
    before = c.run(model)
    tower = "text" if case == "clip_text" else None
    vp.attach(model, "lora", r=4, targets=TARGETS[case], use_dora=True, tower=tower)
    torch.testing.assert_close(c.run(model), before, rtol=0, atol=0)  # magnitude / norm is exactly 1 at init
    _randomize(model)
    adapted = c.run(model)
    assert (adapted - before).abs().max() > 1e-3
    vp.merge(model)
    assert not vp.attached_methods(model)
    torch.testing.assert_close(c.run(model), adapted, rtol=1e-4, atol=1e-5)


def test_dora_unmerge_restores_the_weight():
    model = vp.attach(tiny_vit(), "lora", r=4, targets=["q", "v"], use_dora=True)
    _randomize(model)
    layer = model.blocks[0].attn.qkv
    original = layer.base.weight.detach().clone()
    layer.merge(1.0)
    assert not torch.allclose(layer.base.weight, original)
    layer.merge(-1.0)
    torch.testing.assert_close(layer.base.weight, original, rtol=1e-5, atol=1e-6)


def test_dora_parameter_counts_are_exact():
    d, r, blocks = 32, 4, 2
    model = vp.attach(tiny_vit(), "lora", r=r, targets=["q", "v", "fc1"], use_dora=True)
    hidden = model.blocks[0].mlp.fc1.base.out_features
    per_block = 2 * (d * r + r * d + d) + (d * r + r * hidden + hidden)  # A, B and one magnitude per output row
    assert vp.count_parameters(model)["by_group"]["lora"] == blocks * per_block
    unet = vp.attach(tiny_unet(), "lora", r=r, targets=["conv1"], use_dora=True)
    expected = 0
    for module in tiny_unet().modules():
        for name, child in module.named_children():
            if name == "conv1" and isinstance(child, torch.nn.Conv2d):
                k = child.kernel_size[0] * child.kernel_size[1]
                expected += child.in_channels * k * r + r * child.out_channels + child.out_channels
    assert vp.count_parameters(unet)["by_group"]["lora"] == expected


def _peft_dora_vit(ours, dropout=0.0):
    """PEFT's DoRA on the same separate Linear layers, with our weights copied in."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["attn.proj", "mlp.fc1"], use_dora=True, lora_dropout=dropout
    )
    theirs = peft.get_peft_model(tiny_vit(), config)
    state = adapter_state_dict(ours)
    with torch.no_grad():
        for i in range(2):
            for path, canonical in (("attn.proj", "attn.o"), ("mlp.fc1", "mlp.fc1")):
                layer = theirs.base_model.model.get_submodule(f"blocks.{i}.{path}")
                assert isinstance(layer, peft.tuners.lora.LoraLayer) and layer.use_dora["default"]
                layer.lora_A["default"].weight.copy_(state[f"blocks.{i}.{canonical}.lora_A"])
                layer.lora_B["default"].weight.copy_(state[f"blocks.{i}.{canonical}.lora_B"])
                layer.lora_magnitude_vector["default"].weight.copy_(state[f"blocks.{i}.{canonical}.magnitude"])
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
    return theirs


def test_dora_equals_peft_dora_in_outputs_and_gradients():
    """PEFT detaches the weight norm in the backward pass (DoRA paper sec. 4.3); so does visionpeft: the gradients
    of A, B and the magnitude agree with PEFT's."""
    ours = vp.attach(tiny_vit(), "lora", r=4, alpha=8, targets=["o", "fc1"], use_dora=True)
    _randomize(ours)
    theirs = _peft_dora_vit(ours)
    out_ours, out_theirs = _run_vit(ours), _run_vit(theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    layer = theirs.base_model.model.blocks[1].mlp.fc1
    update = ours.blocks[1].mlp.fc1.updates["main"]
    torch.testing.assert_close(update.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad)
    torch.testing.assert_close(update.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(update.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_dora_equals_peft_dora_on_a_conv():
    ours = vp.attach(tiny_unet(), "lora", r=4, alpha=4, targets=["conv1"], use_dora=True)
    _randomize(ours)
    theirs = peft.get_peft_model(
        tiny_unet(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["conv1"], use_dora=True)
    )
    copied = 0
    with torch.no_grad():
        for path, module in theirs.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                update = ours.get_submodule(path).update  # visionpeft's LoRAConv2d at the same path
                module.lora_A["default"].weight.copy_(update.lora_A)
                module.lora_B["default"].weight.copy_(update.lora_B)
                module.lora_magnitude_vector["default"].weight.copy_(update.magnitude.view(1, -1, 1, 1))
                copied += 1
    assert copied == len(vp.adapter.methods_of(ours)[0].wrappers())
    torch.testing.assert_close(_run_unet(ours), _run_unet(theirs), rtol=1e-5, atol=1e-5)


def test_dora_on_fused_qv_exports_to_a_folder_peft_loads(tmp_path):
    ours = vp.attach(tiny_vit(), "lora", r=4, targets=["q", "v", "fc2"], use_dora=True)
    _randomize(ours)
    vp.save_adapter(ours, tmp_path)  # the default folder holds PEFT's files too
    loaded = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    assert loaded.peft_config["default"].use_dora
    torch.testing.assert_close(_run_vit(loaded), _run_vit(ours), rtol=1e-5, atol=1e-5)
    again = vp.load_adapter(tiny_vit(), tmp_path)
    torch.testing.assert_close(_run_vit(again), _run_vit(ours), rtol=0, atol=0)


def test_dora_conv_exports_to_peft(tmp_path):
    ours = vp.attach(tiny_unet(), "lora", r=4, targets=["q", "conv2"], use_dora=True)
    _randomize(ours)
    vp.save_adapter(ours, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path).eval()
    torch.testing.assert_close(_run_unet(loaded), _run_unet(ours), rtol=1e-5, atol=1e-5)


def test_dora_and_plain_lora_in_one_file_is_refused(tmp_path):
    model = vp.attach(
        tiny_sd_pipeline(tmp_path / "tok"),
        [("lora", {"targets": ["q"], "use_dora": True}), ("lora", {"tower": "text_encoder", "targets": ["q"]})],
    )
    with pytest.raises(vp.VisionPEFTError, match="one use_dora switch"):
        vp.save_adapter(model, tmp_path / "x", format="diffusers")


@pytest.mark.slow
def test_dora_unet_loads_into_a_diffusers_pipeline(tmp_path):
    """diffusers' load_lora_weights reads DoRA in its own format (lora_magnitude_vector keys -> use_dora)."""
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(pipe, "lora", r=4, targets=["q", "v", "conv1"], use_dora=True)
    _randomize(pipe.unet)
    ours = sample_images(pipe, "a cat")
    vp.save_adapter(pipe, tmp_path / "lora", format="diffusers")
    fresh = tiny_sd_pipeline(tmp_path / "tok")
    base = sample_images(fresh, "a cat")
    fresh.load_lora_weights(tmp_path / "lora")
    assert abs(ours - base).max() > 1e-3
    assert abs(sample_images(fresh, "a cat") - ours).max() < 1e-4


def test_dora_option_name_suggests_use_dora():
    with pytest.raises(vp.VisionPEFTError, match="did you mean 'use_dora'"):
        vp.attach(tiny_vit(), "lora", dora=True)


def test_dora_with_dropout_in_training_equals_peft():
    """With LoRA dropout active, PEFT rescales the base output recomputed on the dropped-out input; so does this."""
    ours = vp.attach(tiny_vit(), "lora", r=4, alpha=8, targets=["o", "fc1"], use_dora=True, dropout=0.5)
    _randomize(ours)
    theirs = _peft_dora_vit(ours, dropout=0.5)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    out_ours = _run_vit(ours)
    torch.manual_seed(5)
    torch.testing.assert_close(out_ours, _run_vit(theirs), rtol=1e-5, atol=1e-5)
