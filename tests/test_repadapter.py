"""RepAdapter: the ViT-B/16 counts, the official equations, the official initialisation, the structural
re-parameterisation (merge) alone and beside other methods, save / load, training and bad options.

The references below are this test's own code for the equations of luogen1996/RepAdapter ``repadapter.py``
(commit 360992f): ``RepAdapter`` (lines 147-172: ``conv_A`` a 1x1 Conv1d D -> hidden with bias, ``conv_B`` a grouped
1x1 Conv1d hidden -> D with bias, ``nn.Dropout(0.1)``; init lines 164-167: conv_A xavier-uniform, conv_B and both
biases zero; forward lines 168-172: ``conv_B(dropout(conv_A(x^T))) * scale + x^T``), placed by
``forward_vit_block_adapter`` (lines 21-24: ``x + drop_path(attn(adapter_attn(norm1(x))))``, then the same with
``mlp``, ``adapter_mlp`` and ``norm2``), and folded by ``set_RepWeight`` (lines 271-299) with ``sparse2dense``
(lines 213-220: the grouped conv_B as a block-diagonal dense matrix) and ``reparameterize`` (lines 201-211:
``W = Wa Wb s + I``, bias ``(Ba Wb + Bb) s``, then ``qkv`` / ``fc1`` weight ``(W_adapter^T W_qkv^T)^T`` and bias
``b_adapter W_qkv^T + b_qkv``). PETL_Vision runs the same module (``model/repadapter.py`` lines 5-27) in the same
place (``model/block.py`` lines 112-113 and 154-155, ``sequential_before``).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import perturb, tiny_clip, tiny_clip_timm, tiny_dit, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.checkpoint.folder import WEIGHTS_NAME
from visionpeft.errors import ConfigError, IncompatibleMethodError

ROOT = Path(__file__).resolve().parents[1]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
D, DEPTH = 768, 12


@pytest.mark.parametrize(("bottleneck", "expected"), [(8, 239_808), (16, 461_184)])
def test_vitb16_counts_equal_petl_vision(bottleneck, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "repadapter", bottleneck=bottleneck))
    per_adapter = D * bottleneck + bottleneck + D * bottleneck // 2 + D  # conv_A and the 2-group conv_B, with biases
    assert DEPTH * 2 * per_adapter == expected
    assert counts["by_group"]["repadapter"] == expected
    assert counts["trainable"] == expected + D * 100 + 100


def block_outputs(model: torch.nn.Module, blocks, images: torch.Tensor) -> list[torch.Tensor]:
    """The logits of ``model`` on ``images``, then the output of each of ``blocks`` in that forward pass."""
    seen: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda m, a, out: seen.append(out)) for block in blocks]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [logits, *seen]


def assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float = 1e-5) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=f"output {index} (0: logits)")


def official_adapter(x: torch.Tensor, params: dict, site: str, groups: int, scale: float) -> torch.Tensor:
    """``RepAdapter.forward`` (lines 168-172) in eval mode, on (batch, tokens, D) tokens."""
    t = x.transpose(1, 2)
    hidden = F.conv1d(t, params[f"{site}.repadapter.conv_A.weight"], params[f"{site}.repadapter.conv_A.bias"])
    weight, bias = params[f"{site}.repadapter.conv_B.weight"], params[f"{site}.repadapter.conv_B.bias"]
    return (F.conv1d(hidden, weight, bias, groups=groups) * scale + t).transpose(1, 2).contiguous()


def official_reference(plain: torch.nn.Module, adapted: torch.nn.Module, groups: int, scale: float) -> torch.nn.Module:
    """``plain`` (a copy, no hooks) with each block's forward replaced by ``forward_vit_block_adapter`` (lines
    21-24), the adapters and the head holding the tensors of ``adapted``."""
    model = copy.deepcopy(plain).eval()
    model.head.load_state_dict(adapted.head.state_dict())
    params = tensors_of(adapted)

    def block_forward(name, blk, x):
        x = x + blk.drop_path1(blk.attn(official_adapter(blk.norm1(x), params, f"{name}.attn", groups, scale)))
        return x + blk.drop_path1(blk.mlp(official_adapter(blk.norm2(x), params, f"{name}.mlp", groups, scale)))

    for i, blk in enumerate(model.blocks):
        blk.forward = types.MethodType(lambda b, x, n=f"blocks.{i}", **_: block_forward(n, b, x), blk)
    return model


def tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in methods_of(model)[0].named_tensors()}


@pytest.mark.parametrize(("bottleneck", "groups", "scale"), [(8, 2, 1.0), (8, 4, 0.5), (6, 1, 2.0)])
def test_forward_equals_the_official_equations_and_starts_unchanged(bottleneck, groups, scale):
    plain = tiny_vit(mlp_ratio=4.0)
    model = vp.attach(copy.deepcopy(plain), "repadapter", bottleneck=bottleneck, groups=groups, scale=scale)
    with torch.no_grad():
        assert_all_close(block_outputs(model, model.blocks, IMAGES), block_outputs(plain, plain.blocks, IMAGES), 0)
        perturb(model)
        adapted = block_outputs(model, model.blocks, IMAGES)
        reference = official_reference(plain, model, groups, scale)
        expected = block_outputs(reference, reference.blocks, IMAGES)
    assert (adapted[0] - plain(IMAGES)).abs().max() > 1e-2  # the adapters really act
    assert_all_close(adapted, expected)


def test_initialisation_is_the_official_one():
    model = vp.attach(tiny_vit(embed_dim=64), "repadapter", bottleneck=16)
    params = tensors_of(model)
    conv_a = params["blocks.0.attn.repadapter.conv_A.weight"]
    assert conv_a.shape == (16, 64, 1) and params["blocks.0.attn.repadapter.conv_B.weight"].shape == (64, 8, 1)
    bound = (6 / (64 + 16)) ** 0.5  # xavier-uniform of a (16, 64, 1) weight
    assert conv_a.abs().max() <= bound and conv_a.abs().max() > 0.9 * bound
    zero = [n for n in params if not n.endswith("conv_A.weight")]
    assert all(params[n].count_nonzero() == 0 for n in zero) and len(zero) == 2 * 2 * 3


def official_rep_weight(weight, bias, params, site, groups, scale):
    """``set_RepWeight`` (lines 271-299) for one adapter and the Linear after it: ``sparse2dense`` of conv_B, then
    ``reparameterize`` twice."""
    conv_b = params[f"{site}.repadapter.conv_B.weight"].squeeze(-1)  # (D, hidden / groups)
    d, per_group = conv_b.shape
    blocks = conv_b.view(groups, d // groups, per_group).transpose(1, 2)
    dense = torch.zeros(per_group * groups, d)
    for i in range(groups):
        dense[i * per_group : (i + 1) * per_group, i * (d // groups) : (i + 1) * (d // groups)] = blocks[i]
    wa, wb = params[f"{site}.repadapter.conv_A.weight"].squeeze(-1).t(), dense  # sparse2dense(...).T.T
    adapter_weight = wa @ wb * scale + torch.eye(d)
    adapter_bias = (params[f"{site}.repadapter.conv_A.bias"] @ wb + params[f"{site}.repadapter.conv_B.bias"]) * scale
    return (adapter_weight @ weight.t()).t(), adapter_bias @ weight.t() + bias


def test_merge_is_the_official_reparameterisation_and_equals_unmerged():
    plain = tiny_vit(mlp_ratio=4.0)
    model = vp.attach(copy.deepcopy(plain), "repadapter", groups=4, scale=0.7)
    perturb(model)
    params = tensors_of(model)
    with torch.no_grad():
        before = block_outputs(model, model.blocks, IMAGES)
        merged = vp.merge(model)
        assert_all_close(block_outputs(merged, merged.blocks, IMAGES), before)
    assert not vp.attached_methods(merged)
    assert set(merged.state_dict()) == set(plain.state_dict())
    for i, blk in enumerate(plain.blocks):
        for site, layer in ((f"blocks.{i}.attn", blk.attn.qkv), (f"blocks.{i}.mlp", blk.mlp.fc1)):
            weight, bias = official_rep_weight(layer.weight, layer.bias, params, site, 4, 0.7)
            folded = merged.get_submodule(f"{site}.{'qkv' if site.endswith('attn') else 'fc1'}")
            torch.testing.assert_close(folded.weight, weight.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(folded.bias, bias.detach(), rtol=1e-5, atol=1e-6)


LORA = ("lora", {"targets": ["q", "v", "fc1"], "r": 2})


@pytest.mark.parametrize(
    "methods",
    [
        [LORA, ("repadapter", {})],
        [("repadapter", {}), LORA],
        [("lora", {"targets": ["q", "k", "v", "fc1"], "use_dora": True}), ("repadapter", {})],
        [("fact", {"dim": 3}), ("repadapter", {})],
        [("repadapter", {}), ("fact", {"dim": 3})],
        [("ssf", {}), ("repadapter", {})],
        [("repadapter", {}), ("ssf", {})],
        [("repadapter", {}), ("difffit", {})],
    ],
    ids=[
        "lora-then-rep",
        "rep-then-lora",
        "dora-then-rep",
        "fact-then-rep",
        "rep-then-fact",
        "ssf-then-rep",
        "rep-then-ssf",
        "rep-then-difffit",
    ],
)
def test_merges_exactly_beside_other_methods_in_either_order(methods):
    """The adapter always feeds the layers it folds into, whatever the attach order, so the fold W (I + s B A)
    comes after LoRA's / FacT's updates of those layers and commutes with SSF's scale-shift after them."""
    model = vp.attach(tiny_vit(mlp_ratio=4.0), methods)
    perturb(model, std=0.05)
    with torch.no_grad():
        before = block_outputs(model, model.blocks, IMAGES)
        merged = vp.merge(model)
        assert_all_close(block_outputs(merged, merged.blocks, IMAGES), before)
    assert set(merged.state_dict()) == set(tiny_vit(mlp_ratio=4.0).state_dict())


def test_merging_it_alone_while_lora_still_updates_the_same_layer_is_one_line():
    model = vp.attach(tiny_vit(), [LORA, ("repadapter", {})])
    perturb(model)
    with torch.no_grad():
        before = model(IMAGES)
    with pytest.raises(IncompatibleMethodError) as err:
        vp.merge(model, methods=["repadapter"])
    message = str(err.value)
    assert "blocks.0.attn.q" in message and "vp.merge(model)" in message and "\n" not in message
    assert [name for name, _ in vp.attached_methods(model)] == ["lora", "repadapter"]
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), before, rtol=0, atol=0)


def eva(**overrides):
    """A tiny EVA-02-like model (rotary embedding); fused qkv with q/v biases unless ``qkv_fused=False``."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=True)
    return Eva(**{**kw, "use_rot_pos_emb": True, "ref_feat_shape": (4, 4), **overrides}).eval()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, "blocks.0.attn.q, which has no bias to take the adapter's constant term (EVA keeps the q / v biases"),
        ({"qkv_fused": False, "swiglu_mlp": True, "init_values": 0.1}, "blocks.0.attn.k, which has no bias"),
    ],
    ids=["eva-fused-qkv-outside-biases", "eva02-separate-qkv-swiglu"],
)
def test_eva_starts_unchanged_trains_and_refuses_merge_in_one_line(options, words):
    """EVA's key projection has no bias (fused: none of q / k / v has one in the Linear), so the adapter's constant
    term cannot be folded into it; the rotary embedding after it makes that term matter."""
    plain = eva(**options)
    model = vp.attach(copy.deepcopy(plain), [LORA, ("repadapter", {})])
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), plain(IMAGES), rtol=0, atol=1e-6)
    model(IMAGES).square().mean().backward()
    assert all(p.grad is not None for _, p in vp.trainable_parameters(model))
    with pytest.raises(IncompatibleMethodError) as err:
        vp.merge(model)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert [name for name, _ in vp.attached_methods(model)] == ["lora", "repadapter"]  # refused before lora merged


CLIP_TOWERS = {"mha": tiny_clip, "mha-seq-first": lambda: tiny_clip(batch_first=False), "timm-trunk": tiny_clip_timm}


@pytest.mark.parametrize(
    ("tower", "with_lora"),
    [("mha", "none"), ("mha", "lora-first"), ("mha", "lora-after"), ("mha-seq-first", "lora-first")]
    + [("timm-trunk", "lora-after")],
)
def test_open_clip_visual_tower_starts_unchanged_and_merges_beside_lora(tower, with_lora):
    """open_clip's own tower computes q / k / v in nn.MultiheadAttention, which a LoRA replaces by a wrapper that
    never calls it: there the adapter reads the pre-norm's output, and folds into in_proj."""
    factory = CLIP_TOWERS[tower]
    size = 224 if tower == "timm-trunk" else 32
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    lora = ("lora", {"targets": ["q", "v"], "r": 2})
    methods = {"none": ["repadapter"], "lora-first": [lora, "repadapter"], "lora-after": ["repadapter", lora]}
    model = vp.attach(factory(), methods[with_lora])
    with torch.no_grad():  # a LoRA on nn.MultiheadAttention runs its functional form: equal to ~1e-7
        torch.testing.assert_close(model.encode_image(images), factory().encode_image(images), rtol=0, atol=1e-6)
        perturb(model, std=0.05)
        before = model.encode_image(images)
        assert (before - factory().encode_image(images)).abs().max() > 1e-3
        torch.testing.assert_close(vp.merge(model).encode_image(images), before, rtol=1e-5, atol=1e-5)


RELOAD = """
import sys
import torch
sys.path.insert(0, {tests!r})
import tiny_models
import visionpeft as vp
torch.set_num_threads(1)
model = vp.load_adapter(tiny_models.{factory}(), {adapter!r}).eval()
with torch.no_grad():
    torch.save(model(torch.load({images!r})), {out!r})
"""


def outputs_in_new_process(factory: str, adapter: Path, images: torch.Tensor, scratch: Path) -> torch.Tensor:
    """What a new Python process gets from ``vp.load_adapter(tiny_models.<factory>(), adapter)`` on ``images``."""
    torch.save(images, scratch / "images.pt")
    script = RELOAD.format(
        tests=str(ROOT / "tests"),
        factory=factory,
        adapter=str(adapter),
        images=str(scratch / "images.pt"),
        out=str(scratch / "out.pt"),
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return torch.load(scratch / "out.pt")


def test_save_load_keeps_only_what_it_trains_beside_vpt_and_detach_restores(tmp_path):
    model = vp.attach(tiny_vit(), [("vpt", {"num_tokens": 3, "deep": True}), ("repadapter", {"groups": 4})])
    perturb(model)
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path)
    trained_names = {name for method in methods_of(model) for name, _ in method.named_tensors()}
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == trained_names | {"head.weight", "head.bias"}
    fresh = vp.load_adapter(tiny_vit(), tmp_path)
    assert vp.attached_methods(fresh)[1][1].groups == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES), trained, rtol=0, atol=0)
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), tiny_vit()(IMAGES), rtol=0, atol=0)


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    model = vp.attach(tiny_vit(), "repadapter", bottleneck=4, scale=0.5)
    perturb(model)
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path / "adapter")
    reloaded = outputs_in_new_process("tiny_vit", tmp_path / "adapter", IMAGES, tmp_path)
    # the child runs with one thread, this process maybe with two: reductions may differ by ~1e-7
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)


def test_short_training_lowers_the_loss():
    model = vp.attach(tiny_vit(), "repadapter")
    losses = training_losses(model, steps=30, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]
    assert tensors_of(model)["blocks.1.mlp.repadapter.conv_B.weight"].count_nonzero() > 0  # the zero conv trained


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bottleneck": 0}, "method 'repadapter' option 'bottleneck' must be at least 1, got 0"),
        ({"groups": 3}, "method 'repadapter' option 'groups' must divide bottleneck (8), got 3"),
        ({"bottleneck": 6, "groups": 3}, "method 'repadapter' option 'groups' must divide the token width 32"),
        ({"scale": 0}, "method 'repadapter' option 'scale' must be above 0"),
        ({"dropout": 1.0}, "method 'repadapter' option 'dropout' must be below 1"),
    ],
)
def test_bad_options_are_one_line(options, message):
    model = tiny_vit()
    keys = set(model.state_dict())
    with pytest.raises(ConfigError) as err:
        vp.attach(model, "repadapter", **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not vp.attached_methods(model) and set(model.state_dict()) == keys


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), "repadapter needs transformer blocks"),
        pytest.param(tiny_dit, "repadapter needs attention and MLP branches", marks=pytest.mark.slow),  # diffusers
    ],
    ids=["generic", "dit"],
)
def test_a_model_without_the_modules_is_one_line(factory, words):
    model = factory()
    with pytest.raises(IncompatibleMethodError) as err:
        vp.attach(model, "repadapter")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not vp.attached_methods(model)
