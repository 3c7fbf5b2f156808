"""FacT: the official equations, the published counts, identity at initialisation, exact merge, save / load."""

from __future__ import annotations

import copy
import types

import pytest
import timm
import torch
from tiny_models import tiny_vit, training_losses

import visionpeft as vp
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.methods.fact import FacTFactors

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("variant", "dim", "expected"),
    [("tt", 8, 21_504), ("tt", 32, 196_608), ("tk", 16, 30_976), ("tk", 32, 86_528), ("tk", 64, 369_664)],
)
def test_vit_b16_counts_equal_petl_vision(variant, dim, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "fact", variant=variant, dim=dim))
    assert counts["by_group"]["fact"] == expected
    assert counts["trainable"] == expected + 768 * 100 + 100


def factors_of(model: torch.nn.Module) -> FacTFactors:
    return next(m for m in model.modules() if isinstance(m, FacTFactors))


def randomise(factors: FacTFactors, seed: int = 0) -> None:
    """Non-zero factors (V starts at zero), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in factors.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def official_reference(plain: torch.nn.Module, factors: FacTFactors, variant: str, scale: float) -> torch.nn.Module:
    """``plain`` with its attention and MLP forwards replaced by the official FacT equations, in eval mode.

    Follows JieShibo/PETL-ViT ``FacT/fact_tt.py`` and ``FacT/fact_tk.py`` (commit 546bde3): ``fact_forward_attn``
    (about lines 59-83: a delta on q, k, v from ``FacTv(dp(core(FacTu(x))))`` added to ``qkv(x)`` times ``s``, the
    same on ``proj``), ``fact_forward_mlp`` (about lines 85-100: fc1's delta reshaped to 4 chunks of ``dim`` before
    ``FacTv``; fc2's input reshaped to 4 chunks of C before ``FacTu``) and ``set_FacT`` (Tucker: ``FacTc @
    FacTp[:, idx:idx + 4]`` for attention, ``[:, idx:idx + 8]`` for the MLP, idx advancing 4 then 8 per block).
    Our own code: nn.Linear ``FacTu`` is ``x @ u.T``, ``FacTv`` is ``h @ v.T``, a tt core Linear is ``h @ W.T``.
    """
    model = copy.deepcopy(plain).eval()
    u, v, dim = factors.u, factors.v, factors.dim

    def down(x):
        return x @ u.t()

    def up(h):
        return h @ v.t()

    def attention(index, attn, x):
        b, n, c = x.shape
        if variant == "tt":
            mix = [lambda h, k=k: h @ factors.cores[f"{index}_attn_{k}"].t() for k in "qkvo"]
        else:
            cores = factors.tucker_c @ factors.tucker_p[:, 12 * index : 12 * index + 4]
            mix = [lambda h, j=j: h @ cores[:, :, j] for j in range(4)]
        qkv = attn.qkv(x) + torch.cat([up(mix[j](down(x))) for j in range(3)], dim=2) * scale
        q, k, w = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        out = (weights @ w).transpose(1, 2).reshape(b, n, c)
        return attn.proj(out) + up(mix[3](down(out))) * scale

    def mlp(index, block_mlp, x):
        b, n, c = x.shape
        if variant == "tt":
            fc1_core = factors.cores[f"{index}_mlp_fc1"]  # Linear(dim, 4 dim): h @ W.T
            fc2_core = factors.cores[f"{index}_mlp_fc2"]  # Linear(4 dim, dim)
            fc1_mix, fc2_mix = (lambda h: h @ fc1_core.t()), (lambda h: h @ fc2_core.t())
        else:
            cores = factors.tucker_c @ factors.tucker_p[:, 12 * index + 4 : 12 * index + 12]
            fc1_core, fc2_core = cores[:, :, :4].reshape(dim, 4 * dim), cores[:, :, 4:].reshape(dim, 4 * dim)
            fc1_mix, fc2_mix = (lambda h: h @ fc1_core), (lambda h: h @ fc2_core.t())
        h = block_mlp.fc1(x) + up(fc1_mix(down(x)).reshape(b, n, 4, dim)).reshape(b, n, 4 * c) * scale
        a = block_mlp.act(h)
        chunks = down(a.reshape(b, n, 4, c)).reshape(b, n, 4 * dim)
        return block_mlp.fc2(a) + up(fc2_mix(chunks)) * scale

    for index, block in enumerate(model.blocks):
        block.attn.forward = types.MethodType(lambda attn, x, i=index, **_: attention(i, attn, x), block.attn)
        block.mlp.forward = types.MethodType(lambda m, x, i=index: mlp(i, m, x), block.mlp)
    return model


@pytest.mark.parametrize(("variant", "scale"), [("tt", 1.0), ("tk", 0.5)])
def test_forward_equals_the_official_equations_and_merges_exactly(variant, scale):
    plain = tiny_vit(mlp_ratio=4.0)
    model = vp.attach(copy.deepcopy(plain), "fact", variant=variant, dim=4, scale=scale)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), plain(IMAGES), rtol=0, atol=0)  # V is zero: unchanged
        factors = factors_of(model)
        randomise(factors)
        adapted = model(IMAGES)
        reference = official_reference(plain, factors, variant, scale)(IMAGES)
    assert (adapted - plain(IMAGES)).abs().max() > 1e-2  # the factors really act
    torch.testing.assert_close(adapted, reference, rtol=1e-5, atol=1e-5)
    vp.merge(model)
    assert not vp.attached_methods(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), adapted, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_save_load_on_a_fresh_model_and_detach(variant, tmp_path):
    model = vp.attach(tiny_vit(), "fact", variant=variant, dim=3)
    randomise(factors_of(model))
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert vp.attached_methods(fresh)[0][1].variant == variant
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES), trained, rtol=0, atol=0)
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), tiny_vit()(IMAGES), rtol=0, atol=0)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = vp.attach(tiny_vit(), "fact", variant="tk", dim=4, dropout=0.0)
    losses = training_losses(model)
    assert losses[-1] < losses[0]
    assert factors_of(model).v.abs().sum() > 0  # the zero-initialised factor trained


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dim": 0}, "method 'fact' option 'dim' must be at least 1, got 0"),
        ({"variant": "cp"}, "method 'fact' option 'variant'"),
        ({"scale": 0}, "method 'fact' option 'scale' must be above 0"),
    ],
)
def test_bad_options_are_one_line(options, message):
    model = tiny_vit()
    with pytest.raises(ConfigError, match=message) as err:
        vp.attach(model, "fact", **options)
    assert "\n" not in str(err.value)
    assert not vp.attached_methods(model)


def test_a_model_without_blocks_is_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(IncompatibleMethodError, match="fact needs") as err:
        vp.attach(model, "fact")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "options", [{"qkv_fused": False}, {"qkv_bias": True}], ids=["separate-qkv", "fused-qkv-biases"]
)
def test_eva_adapts_and_merges(options):
    """EVA with separate q/k/v Linears, and EVA's fused qkv whose q/v biases live outside the Linear (its attention
    reads qkv.weight unless a method hooks the module: then it calls the module and adds the biases after)."""
    from timm.models.eva import Eva

    def eva():
        torch.manual_seed(0)
        return Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, **options).eval()

    model = vp.attach(eva(), "fact", dim=3)
    randomise(factors_of(model))
    with torch.no_grad():
        adapted = model(IMAGES)
        assert not torch.allclose(adapted, eva()(IMAGES), rtol=1e-2, atol=0)  # tiny logits (1e-4)
        vp.merge(model)
        torch.testing.assert_close(model(IMAGES), adapted, rtol=1e-5, atol=1e-8)


def test_composes_with_lora_on_the_same_fused_qkv_and_both_merge():
    model = vp.attach(tiny_vit(), [("lora", {"r": 2}), ("fact", {"dim": 3, "variant": "tk"})])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        adapted = model(IMAGES)
        vp.merge(model)
        torch.testing.assert_close(model(IMAGES), adapted, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_vit().state_dict())
