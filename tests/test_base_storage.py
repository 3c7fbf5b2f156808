"""Memory options: a low-bit frozen base under the adapters (train.base_storage fp8 / int8) and 8-bit AdamW.

A LoRA on an 8-bit stored layer gives what PEFT's LoRA gives on the same stored layer; the stored weights take
under a quarter of fp32's bytes; missing extras are one line naming their install."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.trainers.base_storage import store_frozen_base, stored_layers, stored_weight, tensor_bytes

TARGETS = ["0", "2"]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def _pair(storage: str):
    """visionpeft's LoRA on the stored MLP (attached, then the base stored, as a run does), and PEFT's LoRA on an
    identical MLP (its A / B copied from ours; on torchao weights PEFT dispatches its own layer)."""
    import peft

    ours = vp.attach(_mlp(), "lora", target_modules=TARGETS, r=4, alpha=8)
    with torch.no_grad():
        for name, p in vp.trainable_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    plain = _mlp().requires_grad_(False)
    if storage == "int8":  # PEFT's way for torchao: a quantized model, then LoRA (its TorchaoLoraLinear)
        assert store_frozen_base([plain], storage) == 2
    theirs = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    if storage == "fp8":  # PEFT cannot wrap a parametrized layer: its base_layer is stored afterwards
        assert store_frozen_base([theirs], storage) == 2
    ours_tensors = dict(vp.trainable_parameters(ours))
    with torch.no_grad():
        for index in TARGETS:
            layer = theirs.base_model.model[int(index)]
            layer.lora_A["default"].weight.copy_(ours_tensors[f"{index}.updates.main.lora_A"])
            layer.lora_B["default"].weight.copy_(ours_tensors[f"{index}.updates.main.lora_B"])
    assert store_frozen_base([ours], storage) == 2  # a run's way: LoRA attached, then the frozen base stored
    return ours, theirs


def _check_same_output_and_gradients(ours, theirs):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    out = ours(x)
    torch.testing.assert_close(out, theirs(x), rtol=0, atol=1e-6)
    plain = _mlp()(x)
    assert (out - plain).abs().max() > 1e-3  # the LoRA changes the output
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in vp.trainable_parameters(ours))


def test_fp8_storage_keeps_weights_in_float8_and_lora_equals_peft_s_lora_on_the_same_layer():
    ours, theirs = _pair("fp8")
    assert stored_weight(ours[0].base).dtype == torch.float8_e4m3fn and ours[0].base.weight.dtype == torch.float32
    assert {p.dtype for _, p in vp.trainable_parameters(ours)} == {torch.float32}
    _check_same_output_and_gradients(ours, theirs)
    assert stored_weight(ours[0].base).dtype == torch.float8_e4m3fn


def test_int8_weight_only_lora_equals_peft_s_lora_on_the_same_torchao_layer():
    pytest.importorskip("torchao")
    ours, theirs = _pair("int8")
    assert type(ours[0].base.weight).__name__ == "Int8Tensor"
    assert type(theirs.base_model.model[0]).__name__ == "TorchaoLoraLinear"  # PEFT's LoRA for torchao layers
    assert type(theirs.base_model.model[0].base_layer.weight).__name__ == "Int8Tensor"
    _check_same_output_and_gradients(ours, theirs)


def test_stored_weights_are_at_least_3_5x_smaller_than_fp32_and_1_9x_than_bf16():
    """The weight bytes of the tiny SDXL U-Net's stored layers: fp8 4.0x fewer than fp32 (2.0x fewer than bf16);
    torchao int8 weight-only (int8 weights + one fp32 scale per output row) 3.5x+ fewer on 256-wide Linears."""
    from tiny_models import tiny_sdxl_unet

    def weights(layers):
        return sum(tensor_bytes(stored_weight(layer)) for layer in layers)

    unet = tiny_sdxl_unet(levels=3).requires_grad_(False)
    layers = stored_layers([unet], "fp8")
    fp32 = weights(layers)
    store_frozen_base([unet], "fp8")
    assert fp32 / weights(layers) >= 3.5 and fp32 / 2 / weights(layers) >= 1.9, (fp32, weights(layers))
    if importlib.util.find_spec("torchao") is None:
        return
    mlp = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).requires_grad_(False)
    before = weights(mlp)
    store_frozen_base([mlp], "int8")
    assert before / weights(mlp) >= 3.5, (before, weights(mlp))


def test_layers_that_train_keep_their_precision_and_dora_reads_the_upcast_weight():
    model = vp.attach(_mlp(), "lora", target_modules=["0"], r=4, use_dora=True)
    model[2].weight.requires_grad_(True)  # a layer trained in full
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    before = model(x)
    assert store_frozen_base([model], "fp8") == 1  # DoRA's base; layer 2 trains
    assert stored_weight(model[0].base).dtype == torch.float8_e4m3fn and model[2].weight.dtype == torch.float32
    torch.testing.assert_close(model(x), before, rtol=0.1, atol=0.05)  # the same layer, its weight rounded


def test_lora_trains_on_an_fp8_base_of_the_tiny_sdxl_pipeline(tmp_path):
    """The whole text-to-image step on an SDXL pipeline whose U-Net and text encoders are stored in fp8: the loss is
    finite and near the full-precision one, and every LoRA tensor gets a gradient."""
    from tiny_models import perturb, tiny_sdxl_pipeline

    from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss

    pipe = tiny_sdxl_pipeline(tmp_path / "tok")
    vp.attach(pipe, "lora", r=4, targets=["q", "k", "v", "o"])
    perturb(pipe)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a photo", "a dog"]
    full = diffusion_loss(DiffusionParts.from_pipeline(pipe), pixels, prompts, torch.Generator().manual_seed(3))
    assert store_frozen_base([pipe.unet, pipe.text_encoder, pipe.text_encoder_2], "fp8") > 10
    loss = diffusion_loss(DiffusionParts.from_pipeline(pipe), pixels, prompts, torch.Generator().manual_seed(3))
    assert torch.isfinite(loss) and abs(loss.item() - full.item()) < 0.05 * full.item()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in vp.trainable_parameters(pipe))


@pytest.mark.parametrize(
    ("override", "package"), [("optim.name=adamw8bit", "bitsandbytes"), ("train.base_storage=int8", "torchao")]
)
def test_a_missing_extra_is_one_line_naming_its_install(monkeypatch, override, package):
    from _classify_utils import ROOT

    from visionpeft.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "control" / "controlnet_sdxl_fill.yaml", [override])
    key, value = override.split("=")
    assert str(err.value) == f"{key}={value} needs the {package} package: pip install {package}"


def test_adamw8bit_builds_bitsandbytes_adamw8bit_with_the_run_s_groups():
    bitsandbytes = pytest.importorskip("bitsandbytes")
    from omegaconf import OmegaConf

    from visionpeft.trainers.run import build_optimizer

    model = vp.attach(_mlp(), "lora", target_modules=TARGETS, r=4)
    optim = OmegaConf.create(
        {"name": "adamw8bit", "lr": 1e-4, "lr_scale_batch": None, "bias_decay": False, "weight_decay": 1e-2}
    )
    optimizer = build_optimizer(optim, model, 1)
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4] and optimizer.param_groups[0]["weight_decay"] == 1e-2
    before = copy.deepcopy(dict(vp.trainable_parameters(model)))
    model(torch.randn(3, 64)).square().sum().backward()
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in vp.trainable_parameters(model))
