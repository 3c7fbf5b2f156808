"""timm EVA / EVA-02 as a token tower: VPT / AdaptFormer / Convpass / LoRA with rotary embedding and q/v biases."""

from __future__ import annotations

import peft
import pytest
import torch

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.errors import CheckpointError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def eva(seed=0, **overrides):
    """EVA-02-like: rotary embedding, q/v biases; fused qkv unless ``qkv_fused=False`` (then SwiGLU, as EVA-02)."""
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    kw = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        qkv_bias=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        init_values=0.1,
    )
    return Eva(**{**kw, **overrides}).eval()


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", ["vpt", "adaptformer", "convpass", "lora"])
def test_token_methods_attach_train_and_detach(method):
    model = eva()
    assert backbone_of(model).family == "timm_eva"
    before = model(IMAGES)
    options = {"deep": True, "num_tokens": 3} if method == "vpt" else {}
    vp.attach(model, method, **options)
    _randomize(model)
    out = model(IMAGES)
    assert out.shape == (2, 10) and (out - before).abs().max() > 1e-4
    out.square().sum().backward()
    assert all(p.grad is not None for _, p in vp.trainable_parameters(model))
    vp.detach(model)
    torch.testing.assert_close(model(IMAGES), before, rtol=0, atol=0)
    assert all(b.attn.num_prefix_tokens == 1 and not b.attn.qkv_bias_separate for b in model.blocks)


def test_vpt_counts_and_prompts_skip_the_rotary_embedding():
    model = vp.attach(eva(), "vpt", deep=True, num_tokens=3)
    assert vp.count_parameters(model)["by_group"]["vpt"] == 2 * 3 * 32
    model(IMAGES)
    assert all(b.attn.num_prefix_tokens == 1 + 3 for b in model.blocks)


def test_lora_in_the_fused_qkv_with_biases_is_not_bypassed_and_merges_exactly():
    model = eva()
    before = model(IMAGES)
    vp.attach(model, "lora", r=4, targets=["q", "v"], use_dora=True)
    torch.testing.assert_close(model(IMAGES), before, rtol=1e-6, atol=1e-6)  # qkv(x) + bias: the same function
    _randomize(model)
    adapted = model(IMAGES)
    assert (adapted - before).abs().max() > 1e-3  # EVA's F.linear(x, qkv.weight) would have ignored the LoRA
    with pytest.raises(CheckpointError, match="reads qkv.weight directly"):
        vp.save_adapter(model, "unused", format="peft")
    vp.merge(model)
    torch.testing.assert_close(model(IMAGES), adapted, rtol=1e-4, atol=1e-5)


def test_eva02_separate_projections_export_to_peft(tmp_path):
    factory = lambda: eva(qkv_fused=False, swiglu_mlp=True)  # noqa: E731
    model = vp.attach(factory(), "lora", r=4, targets=["q", "v", "fc1"])
    _randomize(model)
    vp.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(loaded(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)


def test_an_adapted_eva_copies_and_exports_merged(tmp_path):
    from safetensors.torch import load_file

    model = vp.attach(eva(), [("lora", {"r": 4, "targets": ["q", "v"]}), ("bitfit", {})])
    _randomize(model)
    expected = model(IMAGES)
    path = vp.export_merged(model, tmp_path / "eva.safetensors")  # merges a deep copy
    fresh = eva(seed=1)
    fresh.load_state_dict(load_file(path))
    torch.testing.assert_close(fresh(IMAGES), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(IMAGES), expected, rtol=0, atol=0)  # the original stays adapted
