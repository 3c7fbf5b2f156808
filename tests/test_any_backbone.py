"""Any backbone a user brings: methods on Linear / Conv layers chosen by module path (PEFT's target_modules rule) on
transformers ViT and timm Swin / ConvNeXt / ResNet / EVA; heads by convention or modules_to_save; PEFT loads the
exported folder; token methods say what is missing."""

from __future__ import annotations

import peft
import pytest
import torch

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.backbones.module_paths import matches_target
from visionpeft.checkpoint.folder import adapter_state_dict
from visionpeft.errors import ConfigError, IncompatibleMethodError


def hf_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return ViTForImageClassification(config).eval()


def dinov2(seed=0):
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return Dinov2ForImageClassification(config).eval()


def siglip(seed=0):
    from transformers import SiglipConfig, SiglipForImageClassification

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    return SiglipForImageClassification(SiglipConfig(vision_config=vision, text_config=text, num_labels=10)).eval()


def swin(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        img_size=32,
        window_size=4,
        num_classes=10,
    ).eval()


def convnext(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "convnext_atto", pretrained=False, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=10
    ).eval()


def resnet(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model):
    out = model(IMAGES) if not hasattr(model, "config") else model(pixel_values=IMAGES)
    return out.logits if hasattr(out, "logits") else out


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_count(model, names, r):
    total = 0
    for path, module in model.named_modules():
        if matches_target(path, names):
            if isinstance(module, torch.nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                total += module.in_channels * kernel * r + r * module.out_channels
            else:
                total += module.in_features * r + r * module.out_features
    return total


CASES = {
    "hf_vit": (hf_vit, ["q_proj", "v_proj"], "classifier"),
    "dinov2": (dinov2, ["q_proj", "v_proj", "fc1"], "classifier"),
    "siglip": (siglip, ["q_proj", "v_proj"], "classifier"),
    "swin": (swin, ["qkv", "fc2"], "head.fc"),
    "convnext": (convnext, ["fc1"], "head.fc"),
    "resnet": (resnet, r"layer\d\.\d\.conv\d", "fc"),  # a regex: resnet10t's stem conv1 is a Sequential
}


@pytest.mark.parametrize("case", CASES)
def test_lora_by_module_path_trains_and_merges_exactly(case):
    factory, targets, head = CASES[case]
    model = factory()
    before = run(model)
    vp.attach(model, "lora", r=2, target_modules=targets)
    assert backbone_of(model).family == "generic"
    torch.testing.assert_close(run(model), before, rtol=0, atol=0)
    groups = vp.count_parameters(model)["by_group"]
    assert groups["lora"] == _lora_count(factory(), targets, 2)
    head_module = model.get_submodule(head)
    assert groups[head] == sum(p.numel() for p in head_module.parameters())  # the head found by convention
    optimizer = torch.optim.SGD([p for _, p in vp.trainable_parameters(model)], lr=0.1)
    vp.set_train_mode(model, True)
    run(model).square().mean().backward()
    optimizer.step()
    model.eval()
    _randomize(model)
    adapted = run(model)
    assert (adapted - before).abs().max() > 1e-3
    vp.merge(model)
    torch.testing.assert_close(run(model), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["hf_vit", "swin", "resnet"])
def test_peft_loads_the_folder_onto_the_same_model(case, tmp_path):
    factory, targets, _ = CASES[case]
    ours = vp.attach(factory(), "lora", r=2, target_modules=targets, use_dora=case == "swin")
    _randomize(ours)
    vp.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(run(loaded), run(ours), rtol=1e-5, atol=1e-5)
    again = vp.load_adapter(factory(), tmp_path)
    torch.testing.assert_close(run(again), run(ours), rtol=0, atol=0)


def test_canonical_names_are_module_paths():
    model = vp.attach(hf_vit(), "lora", r=2, target_modules=["q_proj"], use_dora=True)
    names = sorted(adapter_state_dict(model))
    assert "vit.layers.0.attention.q_proj.lora_A" in names
    assert "vit.layers.1.attention.q_proj.magnitude" in names
    assert "classifier.weight" in names


def test_a_regex_selects_modules_as_in_peft():
    model = vp.attach(hf_vit(), "lora", r=2, target_modules=r"vit\.layers\.1\.mlp\.fc\d")
    wrapped = [p for p, m in model.named_modules() if getattr(m, "_vp_wrapper", False)]
    assert wrapped == ["vit.layers.1.mlp.fc1", "vit.layers.1.mlp.fc2"]


def test_modules_to_save_overrides_the_heads(tmp_path):
    model = vp.attach(swin(), "lora", r=2, target_modules=["qkv"], modules_to_save=["head.fc", "patch_embed.norm"])
    groups = vp.count_parameters(model)["by_group"]
    assert set(groups) == {"lora", "head.fc", "patch_embed.norm"}
    _randomize(model)
    vp.save_adapter(model, tmp_path)
    again = vp.load_adapter(swin(), tmp_path)
    assert set(vp.count_parameters(again)["by_group"]) == {"lora", "head.fc", "patch_embed.norm"}
    torch.testing.assert_close(run(again), run(model), rtol=0, atol=0)


def test_bitfit_full_and_linear_on_any_backbone():
    model = vp.attach(resnet(), "bitfit")
    expected = sum(p.numel() for n, p in resnet().named_parameters() if n.endswith("bias") and not n.startswith("fc."))
    assert vp.count_parameters(model)["by_group"]["bitfit"] == expected
    model = vp.attach(hf_vit(), "bitfit", target_modules=["q_proj"])
    assert vp.count_parameters(model)["by_group"]["bitfit"] == 2 * 32
    model = vp.attach(convnext(), "full", target_modules=["stages.3"])
    stage = convnext().stages[3]
    assert vp.count_parameters(model)["by_group"]["full"] == sum(p.numel() for p in stage.parameters())
    model = vp.attach(resnet(), "linear")
    assert vp.count_parameters(model)["trainable"] == 512 * 10 + 10


def test_wrong_targets_and_missing_pieces_are_one_line():
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        vp.attach(hf_vit(), "lora", target_modules=["qproj"])
    with pytest.raises(ConfigError, match="needs target_modules.*vit.layers.0.attention.q_proj"):
        vp.attach(hf_vit(), "lora")
    with pytest.raises(ConfigError, match="a LayerNorm; it can adapt Linear / Conv2d / MultiheadAttention only"):
        vp.attach(hf_vit(), "lora", target_modules=["layernorm_before"])
    with pytest.raises(IncompatibleMethodError, match="vpt needs a ViT-style token sequence"):
        vp.attach(hf_vit(), "vpt")
    with pytest.raises(IncompatibleMethodError, match="difffit's scales need residual blocks"):
        vp.attach(hf_vit(), "difffit")
    with pytest.raises(IncompatibleMethodError, match="grouped convolution"):
        vp.attach(convnext(), "lora", target_modules=["conv_dw"])


def test_target_modules_also_work_on_recognised_families():
    from tiny_models import tiny_vit

    model = vp.attach(tiny_vit(), "lora", r=2, target_modules=["attn.proj"])
    assert "blocks.0.attn.proj.lora_A" in adapter_state_dict(model)
    assert vp.count_parameters(model)["by_group"]["lora"] == 2 * (32 * 2 + 2 * 32)
