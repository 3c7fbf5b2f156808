"""SSF (Lian et al. 2022): the ViT-B/16 count, the official equations, the official initialisation, merge, save / load,
training and bad options.

The reference below is this test's own code for the equations of dongzelian/SSF ``models/vision_transformer.py``
(commit e94e0e7): ``ssf_ada`` (lines 388-395: ``x * scale + shift`` over the channel dimension) after the patch
embedding (lines 364-367), before the pre-norm of each branch (``Block.forward``, lines 252-255), after qkv
(``Attention.forward``, line 199), after proj (line 211), after fc1 and fc2 (``Mlp.forward``, lines 157-166) and after
the final norm (``VisionTransformer.forward_features``, lines 531-533); initialisation ``init_ssf_scale_shift``
(lines 378-385: scale ~ N(1, 0.02), shift ~ N(0, 0.02)).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip, tiny_clip_timm, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import ConfigError, IncompatibleMethodError

D, DEPTH = 768, 12


def test_vitb16_count_is_petl_vision():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "ssf"))
    per_block = 2 * (3 * D + D + 4 * D + D + D + D)  # qkv, proj, fc1, fc2, norm1, norm2: a scale and a shift each
    expected = DEPTH * per_block + 2 * D + 2 * D  # + the patch embedding and the final norm
    assert expected == 268 * D == 205_824
    assert counts["by_group"]["ssf"] == expected
    assert counts["trainable"] == expected + D * 100 + 100


def ssf_ada(x, params, site):
    """Official ``ssf_ada`` (lines 388-395) on a (..., channels) tensor with the parameters of ``site``."""
    return x * params[f"{site}.ssf.scale"] + params[f"{site}.ssf.shift"]


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def official_forward(model, params, images):
    """The official SSF ViT forward, written out on the timm model's frozen weights (functional calls only, so no
    hook of the attached method runs)."""
    conv = model.patch_embed.proj
    patches = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)
    x = ssf_ada(patches.flatten(2).transpose(1, 2), params, "embed")  # lines 362-367
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    for i, blk in enumerate(model.blocks):
        name = f"blocks.{i}"
        attn, mlp = blk.attn, blk.mlp
        h = ssf_ada(layer_norm(x, blk.norm1), params, f"{name}.attn.norm")
        b, n, c = h.shape
        qkv = ssf_ada(F.linear(h, attn.qkv.weight, attn.qkv.bias), params, f"{name}.attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        h = (weights @ v).transpose(1, 2).reshape(b, n, c)
        x = x + ssf_ada(F.linear(h, attn.proj.weight, attn.proj.bias), params, f"{name}.attn.o")
        h = ssf_ada(layer_norm(x, blk.norm2), params, f"{name}.mlp.norm")
        h = F.gelu(ssf_ada(F.linear(h, mlp.fc1.weight, mlp.fc1.bias), params, f"{name}.mlp.fc1"))
        x = x + ssf_ada(F.linear(h, mlp.fc2.weight, mlp.fc2.bias), params, f"{name}.mlp.fc2")
    x = ssf_ada(layer_norm(x, model.norm), params, "norm")
    return model.head(x[:, 0])


def images(n=2, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_equals_the_official_equations():
    model = vp.attach(tiny_vit(), "ssf")
    params = dict(methods_of(model)[0].named_tensors())
    assert len(params) == 2 * (2 * 6 + 2)  # 2 blocks x 6 sites + embed + norm, a scale and a shift each
    with torch.no_grad():
        torch.testing.assert_close(model(images()), official_forward(model, params, images()), rtol=1e-5, atol=1e-5)


def test_initialisation_is_the_official_one():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    vp.attach(model.to_empty(device="cpu"), "ssf")
    params = dict(methods_of(model)[0].named_tensors())
    scales = torch.cat([p.detach() for n, p in params.items() if n.endswith(".scale")])
    shifts = torch.cat([p.detach() for n, p in params.items() if n.endswith(".shift")])
    assert abs(scales.mean() - 1) < 1e-3 and abs(scales.std() - 0.02) < 1e-3
    assert abs(shifts.mean()) < 1e-3 and abs(shifts.std() - 0.02) < 1e-3
    zero = vp.attach(tiny_vit(), "ssf", init_std=0.0)
    with torch.no_grad():
        torch.testing.assert_close(zero(images()), tiny_vit()(images()), rtol=0, atol=1e-6)


def test_merge_equals_unmerged():
    model = vp.attach(tiny_vit(), "ssf")
    with torch.no_grad():
        before = model(images())
        merged = vp.merge(model)
        torch.testing.assert_close(merged(images()), before, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())


LORA = ("lora", {"targets": ["q", "v", "fc1"]})


@pytest.mark.parametrize(
    "methods",
    [
        [LORA, ("ssf", {})],
        [("ssf", {}), LORA],
        [("fact", {}), ("ssf", {})],  # fact updates through forward hooks on the same Linears
        [("ssf", {}), ("fact", {})],
        [("difffit", {}), ("ssf", {})],
        [("ssf", {}), ("difffit", {})],
    ],
    ids=["lora-then-ssf", "ssf-then-lora", "fact-then-ssf", "ssf-then-fact", "difffit-then-ssf", "ssf-then-difffit"],
)
def test_merge_with_other_methods_on_the_same_layers(methods):
    """ssf attached after lora / fact scales their update too, before them only the base layer's output: either
    folds exactly, and always before DiffFit's gamma, which multiplies the shift."""
    model = vp.attach(tiny_vit(), methods)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
        before = model(images())
        torch.testing.assert_close(vp.merge(model)(images()), before, rtol=1e-5, atol=1e-5)


DORA = ("lora", {"targets": ["q", "v", "fc1"], "use_dora": True})


def test_dora_outside_ssf_refuses_merge_and_inside_merges_exactly():
    """A DoRA update attached after ssf normalises the rows of the weight ssf would fold into: refused in one line,
    before anything merged (it was folded 4e-2 off before); DoRA attached first is inside the scale and folds first."""
    model = vp.attach(tiny_vit(), [("ssf", {}), DORA])
    with pytest.raises(IncompatibleMethodError) as err:
        vp.merge(model)
    assert "DoRA" in str(err.value) and "\n" not in str(err.value)
    assert [name for name, _ in vp.attached_methods(model)] == ["ssf", "lora"]
    model = vp.attach(tiny_vit(), [DORA, ("ssf", {})])
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
        before = model(images())
        torch.testing.assert_close(vp.merge(model)(images()), before, rtol=1e-5, atol=1e-5)


class PassThrough(torch.nn.Module):
    """A wrapper as methods install them (``_vp_wrapper``, the original as ``base``)."""

    _vp_wrapper = True

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x)


def test_ssf_inside_one_wrapper_and_outside_another_refuses_merge_first():
    model = vp.attach(tiny_vit(), [LORA, ("ssf", {})])
    mlp = model.blocks[0].mlp
    mlp.fc2 = PassThrough(mlp.fc2)  # a layer wrapped after ssf was attached, as a later method would
    with pytest.raises(IncompatibleMethodError) as err:
        vp.merge(model)
    assert "blocks.0.attn.qkv" in str(err.value) and "blocks.0.mlp.fc2" in str(err.value)
    assert "\n" not in str(err.value)
    assert [name for name, _ in vp.attached_methods(model)] == ["lora", "ssf"]  # lora not merged either


def test_save_load_round_trip(tmp_path):
    model = vp.attach(tiny_vit(), "ssf")
    with torch.no_grad():
        trained = model(images())
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), trained, rtol=0, atol=0)


def test_short_training_lowers_the_loss():
    model = vp.attach(tiny_vit(), "ssf")
    losses = training_losses(model, steps=30, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_bad_option_is_one_line():
    with pytest.raises(ConfigError) as err:
        vp.attach(tiny_vit(), "ssf", init_std=-1.0)
    assert "init_std" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("factory", "options", "words"),
    [
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), {}, "token tower"),
        (lambda: eva(), {}, "q/v biases"),
        (lambda: tiny_clip(), {"tower": "text"}, "token tower"),
    ],
    ids=["generic", "eva-fused-qkv-biases", "clip-text"],
)
def test_model_without_the_modules_is_one_line(factory, options, words):
    model = factory()
    keys = set(model.state_dict())
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, "ssf", **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert set(model.state_dict()) == keys and not vp.attached_methods(model)


def eva(**overrides):
    """A tiny EVA-02-like model (rotary embedding); fused qkv with q/v biases unless ``qkv_fused=False``."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=True)
    return Eva(**{**kw, "use_rot_pos_emb": True, "ref_feat_shape": (4, 4), **overrides}).eval()


def test_open_clip_timm_trunk_merges_exactly():
    model = vp.attach(tiny_clip_timm(), "ssf")
    with torch.no_grad():
        before = model.encode_image(images(size=224))
        torch.testing.assert_close(vp.merge(model).encode_image(images(size=224)), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "site"),
    [({"qkv_fused": False, "swiglu_mlp": True}, "blocks.0.attn.k"), ({"qkv_bias": False}, "blocks.0.attn.qkv")],
    ids=["eva02-separate-qkv", "eva-fused-qkv-no-bias"],
)
def test_eva_trains_and_a_layer_without_bias_refuses_merge(options, site):
    check_trains_and_refuses_merge(eva(**options), site)


def test_avg_pooled_vit_keeps_ssf_after_its_identity_norm_and_refuses_merge():
    """With ``global_pool='avg'`` timm's ``norm`` is an Identity (``fc_norm`` follows the pooling); the official
    model puts the last SSF after it all the same (lines 436, 468, 531-533), where nothing can absorb it."""
    model = tiny_vit(global_pool="avg")
    assert isinstance(model.norm, torch.nn.Identity)
    check_trains_and_refuses_merge(model, "after norm cannot be folded into its Identity")


def check_trains_and_refuses_merge(model, words):
    model = vp.attach(model, "ssf")
    model(images()).square().mean().backward()
    assert all(p.grad is not None for _, p in vp.trainable_parameters(model))
    with pytest.raises(IncompatibleMethodError) as err:
        vp.merge(model)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert vp.attached_methods(model)  # nothing folded: the model is still the adapted one
