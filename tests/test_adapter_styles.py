"""The Houlsby / Pfeiffer adapters (method ``adapter``): the ViT-B/16 counts, the official equations and placement,
the initialisation rules, composition, save / load, training and bad options.

The references below are this test's own code for the equations of OSU-MLB/PETL_Vision (commit 245d262):
``model/adapter.py`` ``Adapter.forward`` (lines 34-54: ``up_proj(dropout(relu(down_proj(x)))) * adapter_scaler``,
dropout p = 0.1 at line 41, plus the residual with ``add_residual=True``), placed by ``model/block.py``
``sequential_after`` (lines 108-110 after the attention, 150-152 after the MLP: ``drop_path(ls(adapter(h) + h))``
with ``h = drop_path(ls(branch(norm(x))))``; Pfeiffer = ``ft_mlp_module`` only, ``lora_p_adapter.yml`` /
``rand_p_adapter.yml``), and of ``model/utils.py`` ``init_weight`` (lines 6-29: ``xavier``, ``lora_xavier``); the
default ``houlsby`` rule is google-research/adapter-bert ``modeling.py`` (commit 1a31fc6) ``feedforward_adapter``
(lines 321-360: truncated normal std 1e-3, zero biases), applied after the sublayer's dropout (lines 942-946, 960-965).
"""

from __future__ import annotations

import copy
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_repadapter import assert_all_close, block_outputs, outputs_in_new_process
from tiny_models import perturb, tiny_clip, tiny_dit, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.checkpoint.folder import WEIGHTS_NAME
from visionpeft.errors import ConfigError, IncompatibleMethodError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
D, DEPTH = 768, 12


@pytest.mark.parametrize(
    ("style", "bottleneck", "expected"),
    [("houlsby", 4, 165_984), ("houlsby", 8, 313_536), ("houlsby", 16, 608_640), ("pfeiffer", 8, 156_768)],
)
def test_vitb16_counts(style, bottleneck, expected):
    """Houlsby's are PETL_Vision's counts; Pfeiffer's is half of them (one adapter per block)."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "adapter", style=style, bottleneck=bottleneck))
    adapters = DEPTH * (2 if style == "houlsby" else 1)
    assert adapters * (D * bottleneck + bottleneck + bottleneck * D + D) == expected
    assert counts["by_group"]["adapter"] == expected
    assert counts["trainable"] == expected + D * 100 + 100


def tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in methods_of(model)[0].named_tensors()}


def official_adapter(h: torch.Tensor, params: dict, site: str, scale: float) -> torch.Tensor:
    """``Adapter.forward(h, add_residual=True)`` (lines 34-54) in eval mode."""
    down = F.relu(F.linear(h, params[f"{site}.adapter.down.weight"], params[f"{site}.adapter.down.bias"]))
    return F.linear(down, params[f"{site}.adapter.up.weight"], params[f"{site}.adapter.up.bias"]) * scale + h


def reference(plain, adapted, style: str, scale: float, second_pass: bool) -> torch.nn.Module:
    """``plain`` (a copy, no hooks) with its blocks running the adapters and head of ``adapted``: PETL_Vision's
    ``sequential_after`` block (``second_pass``: its layer scale and drop path again over ``adapter(h) + h``,
    lines 110 / 152) or this module's placement (without it, adapter-bert's)."""
    model = copy.deepcopy(plain).eval()
    model.head.load_state_dict(adapted.head.state_dict())
    params = tensors_of(adapted)

    def branch(name, h, ls, drop_path):
        if f"{name}.adapter.up.weight" not in params:
            return h
        out = official_adapter(h, params, name, scale)
        return drop_path(ls(out)) if second_pass else out

    def block_forward(name, blk, x):
        x = x + branch(f"{name}.attn", blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x)))), blk.ls1, blk.drop_path1)
        return x + branch(f"{name}.mlp", blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), blk.ls2, blk.drop_path2)

    for i, blk in enumerate(model.blocks):
        blk.forward = types.MethodType(lambda b, x, n=f"blocks.{i}", **_: block_forward(n, b, x), blk)
    return model


@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_forward_equals_petl_visions_block(style):
    """On a ViT without layer scale (as ViT-B/16), in eval mode."""
    plain = tiny_vit(mlp_ratio=4.0)
    model = vp.attach(copy.deepcopy(plain), "adapter", style=style, scale=0.5, init="xavier")
    perturb(model)
    with torch.no_grad():
        adapted = block_outputs(model, model.blocks, IMAGES)
        official = reference(plain, model, style, 0.5, second_pass=True)
        assert (adapted[1] - block_outputs(plain, plain.blocks, IMAGES)[1]).abs().max() > 1e-2
        assert_all_close(adapted, block_outputs(official, official.blocks, IMAGES))
    assert {n.split(".")[2] for n in tensors_of(model)} == ({"attn", "mlp"} if style == "houlsby" else {"mlp"})


def test_the_adapter_reads_the_branch_past_its_layer_scale_once():
    """With a layer scale the adapter reads ``ls(attn(...))`` and adds to it; PETL_Vision's second pass through the
    layer scale is not repeated (it differs there)."""
    plain = tiny_vit(init_values=0.1)
    model = vp.attach(copy.deepcopy(plain), "adapter", init="xavier")
    perturb(model)
    with torch.no_grad():
        adapted = block_outputs(model, model.blocks, IMAGES)
        ours = reference(plain, model, "houlsby", 1.0, second_pass=False)
        assert_all_close(adapted, block_outputs(ours, ours.blocks, IMAGES))
        petl = reference(plain, model, "houlsby", 1.0, second_pass=True)
        assert (block_outputs(petl, petl.blocks, IMAGES)[1] - adapted[1]).abs().max() > 1e-3


def test_initialisation_rules():
    plain = tiny_vit(embed_dim=64)
    with torch.no_grad():
        model = vp.attach(copy.deepcopy(plain), "adapter", init="lora_xavier")  # a zero up-projection
        torch.testing.assert_close(model(IMAGES), plain(IMAGES), rtol=0, atol=0)
        model = vp.attach(copy.deepcopy(plain), "adapter")  # houlsby: near-identity
        assert (model(IMAGES) - plain(IMAGES)).abs().max() < 1e-4
    params = tensors_of(model)
    weights = torch.cat([p.flatten() for n, p in params.items() if n.endswith("weight")])
    assert weights.abs().max() <= 2e-3 and abs(weights.std() - 8.8e-4) < 1e-4  # N(0, 1e-3) truncated at 2 std
    assert all(p.count_nonzero() == 0 for n, p in params.items() if n.endswith("bias"))
    params = tensors_of(vp.attach(copy.deepcopy(plain), "adapter", init="xavier", bottleneck=16))
    bound = (6 / (64 + 16)) ** 0.5
    up = params["blocks.0.mlp.adapter.up.weight"]
    assert up.abs().max() <= bound and up.abs().max() > 0.9 * bound
    assert 0 < params["blocks.0.mlp.adapter.up.bias"].abs().max() < 1e-5  # N(0, 1e-6)


def test_composes_with_lora_and_vpt_saves_what_it_trains_and_loads_identically(tmp_path):
    methods = [("vpt", {"num_tokens": 2, "deep": True}), ("adapter", {"style": "pfeiffer"}), ("lora", {"r": 2})]
    model = vp.attach(tiny_vit(), methods)
    perturb(model)
    model(IMAGES).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in vp.trainable_parameters(model))
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path)
    trained_names = {name for method in methods_of(model) for name, _ in method.named_tensors()}
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == trained_names | {"head.weight", "head.bias"}
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert [(n, getattr(c, "style", None)) for n, c in vp.attached_methods(fresh)][1] == ("adapter", "pfeiffer")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES), trained, rtol=0, atol=0)
    with pytest.raises(IncompatibleMethodError, match="adapter") as err:
        vp.merge(model)
    assert "\n" not in str(err.value)
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), tiny_vit()(IMAGES), rtol=0, atol=0)


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    model = vp.attach(tiny_vit(), "adapter", bottleneck=4, scale=0.1, init="xavier")
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path / "adapter")
    reloaded = outputs_in_new_process("tiny_vit", tmp_path / "adapter", IMAGES, tmp_path)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)


def eva(**overrides):
    """A tiny EVA-02-like model: rotary embedding, q/v biases, layer scale (gamma), separate q/k/v and SwiGLU."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=True)
    kw.update(use_rot_pos_emb=True, ref_feat_shape=(4, 4), init_values=0.1, qkv_fused=False, swiglu_mlp=True)
    return Eva(**{**kw, **overrides}).eval()


@pytest.mark.parametrize(
    ("factory", "run"),
    [
        (eva, lambda m: m(IMAGES)),
        (tiny_clip, lambda m: m.encode_image(IMAGES)),
        (lambda: tiny_clip(batch_first=False), lambda m: m.encode_image(IMAGES)),
    ],
    ids=["eva02", "open_clip-mha", "open_clip-mha-seq-first"],
)
def test_eva_and_open_clip_start_unchanged_train_and_reload(factory, run, tmp_path):
    model = vp.attach(factory(), "adapter", init="lora_xavier")
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(factory()), rtol=0, atol=0)
    run(model).square().mean().backward()
    ups = [p for n, p in methods_of(model)[0].named_tensors() if n.endswith("up.weight")]
    assert len(ups) == 4 and all(p.grad.abs().sum() > 0 for p in ups)
    perturb(model)
    with torch.no_grad():
        trained = run(model)
        assert (trained - run(factory())).abs().max() > 1e-4
    vp.save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(run(vp.load_adapter(factory(), tmp_path)), trained, rtol=0, atol=0)


def test_short_training_lowers_the_loss():
    model = vp.attach(tiny_vit(), "adapter")
    losses = training_losses(model, steps=30, lr=3e-2)
    assert losses[-1] < 0.8 * losses[0]
    assert tensors_of(model)["blocks.1.mlp.adapter.up.weight"].abs().max() > 1e-2  # left its 2e-3 init bound


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"style": "lora"}, "method 'adapter' option 'style'"),
        ({"init": "zero"}, "method 'adapter' option 'init'"),
        ({"bottleneck": 0}, "method 'adapter' option 'bottleneck' must be at least 1, got 0"),
        ({"scale": 0}, "method 'adapter' option 'scale' must be above 0"),
        ({"dropout": 1.0}, "method 'adapter' option 'dropout' must be below 1"),
    ],
)
def test_bad_options_are_one_line(options, message):
    model = tiny_vit()
    keys = set(model.state_dict())
    with pytest.raises(ConfigError) as err:
        vp.attach(model, "adapter", **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not vp.attached_methods(model) and set(model.state_dict()) == keys


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), "adapter needs transformer blocks"),
        pytest.param(tiny_dit, "adapter (houlsby) needs attn and mlp branches", marks=pytest.mark.slow),  # diffusers
    ],
    ids=["generic", "dit"],
)
def test_a_model_without_the_branches_is_one_line(factory, words):
    model = factory()
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, "adapter")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not vp.attached_methods(model)
