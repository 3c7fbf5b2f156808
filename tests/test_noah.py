"""NOAH (Zhang et al. 2022): exact counts, the official equations, weight sharing between the supernet and a subnet,
the official sampling rule, initialisation, save / load, training and bad options.

The reference below is this test's own code for the equations of ZhangYuanhan-AI/NOAH (commit e9c55f3)
``model/supernet_vision_transformer_timm.py``: ``Attention.forward`` (lines 272-297: ``q, k, v`` plus
``LoRA_b[:, :l](LoRA_drop(LoRA_a[:l] x))``), ``Block.forward`` (lines 354-366: the block's ``v`` prompts appended at
the end of the sequence in place of the previous block's, ``x + adapter(drop_path(mlp(norm2(x))))``),
``VisionTransformer.forward_features`` (lines 625-648: the class token read out after the final norm) and
``model/module/adapter_super.py`` (``AdapterSuper.forward``, lines 62-74: ``x + ln2[:, :a](QuickGELU(ln1[:a] x))``).
"""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.methods import make_config
from visionpeft.methods.noah import Geometry, largest_subnet, sample_subnet, subnet_parameters

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
#: a space for the 3-block tiny ViT; every dropout off so that forward passes compare exactly
SPACE = dict(
    vpt_tokens=[2, 3],
    lora_ranks=[1, 2],
    adapter_dims=[2, 4],
    vpt_depths=[2, 3],
    lora_depths=[1, 3],
    adapter_depths=[0, 2, 3],
    vpt_dropout=0.0,
    lora_dropout=0.0,
    adapter_dropout=0.0,
)
MIXED = {"vpt": [3, 2, 0], "lora": [2, 1, 2], "adapter": [4, 2, 0]}
#: the official CIFAR-100 subnet (experiments/NOAH/subnet/VTAB/ViT-B_prompt_cifar100.yaml, RETRAIN)
CIFAR100 = {
    "vpt": [10, 5, 10, 1, 5, 1, 10, 1, 10, 5, 1, 10],
    "lora": [10, 1, 5, 5, 1, 10, 1, 1, 1, 10, 1, 1],
    "adapter": [5, 10, 10, 10, 5, 1, 1, 1, 10, 10, 10, 1],
}


def vit3():
    return tiny_vit(depth=3)


def noah_of(model):
    return next(m for m in methods_of(model) if m.name == "noah")


def randomise(model, seed: int = 0) -> None:
    """Non-zero NOAH tensors (B starts at zero), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in noah_of(model).named_tensors():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def vitb16():
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)


def test_vitb16_counts_are_exact():
    d, qkv = 768, 3 * 768
    model = vp.attach(vitb16(), "noah", mode="subnet", subnet=CIFAR100)
    v, lora, a = (sum(CIFAR100[m]) for m in ("vpt", "lora", "adapter"))
    closed = v * d + lora * (d + qkv) + a * (2 * d + 1) + 12 * d  # every block of this subnet has an adapter
    assert closed == 52_992 + 144_384 + 122_954 == 320_330
    counts = vp.count_parameters(model)
    assert counts["by_group"]["noah"] == closed == subnet_parameters(CIFAR100, Geometry(12, d, qkv))
    assert counts["trainable"] == closed + d * 100 + 100
    # the official get_sampled_params_numel adds the dead first-layer prompt and its 100-token position embedding
    assert closed + 10 * d + 100 * d == 404_810
    supernet = vp.attach(vitb16(), "noah")  # the VTAB space's largest subnet: 10 / 10 / 10 in all 12 blocks
    largest = 12 * (10 * d + 10 * (d + qkv) + 10 * (2 * d + 1) + d)
    assert vp.count_parameters(supernet)["by_group"]["noah"] == largest == 654_456
    assert noah_of(supernet).geometry() == Geometry(12, d, qkv)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def official_forward(model, params, subnet, images):
    """The official NOAH forward of ``subnet`` on the timm model's frozen weights and the shared NOAH tensors
    ``params`` (functional calls only, so no hook of the attached method runs); prompts appended at the end."""
    conv = model.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    previous = 0
    for i, blk in enumerate(model.blocks):
        v, lora, a = (subnet[m][i] for m in ("vpt", "lora", "adapter"))
        name = f"blocks.{i}.noah"
        if v:  # lines 356-363: the new prompts replace the last `previous` tokens
            prompts = params[f"{name}.vpt.prompt"][:v].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, : x.shape[1] - previous], prompts], dim=1)
            previous = v
        attn, h = blk.attn, layer_norm(x, blk.norm1)
        b, n, c = h.shape
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
        if lora:  # lines 277-281
            qkv = qkv + F.linear(
                F.linear(h, params[f"{name}.lora.lora_A"][:lora]), params[f"{name}.lora.lora_B"][:, :lora]
            )
        q, k, w = qkv.reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        x = x + F.linear((weights @ w).transpose(1, 2).reshape(b, n, c), attn.proj.weight, attn.proj.bias)
        mlp = blk.mlp
        m = F.linear(
            F.gelu(F.linear(layer_norm(x, blk.norm2), mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias
        )
        if a:  # AdapterSuper.forward: identity + ln2(act(ln1(x)))
            hidden = quick_gelu(
                F.linear(m, params[f"{name}.adapter.down.weight"][:a], params[f"{name}.adapter.down.bias"][:a])
            )
            m = m + F.linear(hidden, params[f"{name}.adapter.up.weight"][:, :a], params[f"{name}.adapter.up.bias"])
        x = x + m
    return model.head(layer_norm(x, model.norm)[:, 0])


def test_forward_equals_the_official_equations_in_both_modes():
    supernet = vp.attach(vit3(), "noah", **SPACE)
    randomise(supernet)
    params = dict(noah_of(supernet).named_tensors())
    noah_of(supernet).fix_subnet(MIXED)
    with torch.no_grad():
        expected = official_forward(supernet, params, MIXED, IMAGES)
        torch.testing.assert_close(supernet(IMAGES), expected, rtol=1e-5, atol=1e-5)
        assert (expected - vit3()(IMAGES)).abs().max() > 1e-2  # the modules really act
    subnet = vp.attach(vit3(), "noah", mode="subnet", subnet=MIXED, **SPACE)
    randomise(subnet, seed=3)
    params = dict(noah_of(subnet).named_tensors())
    with torch.no_grad():
        torch.testing.assert_close(
            subnet(IMAGES), official_forward(subnet, params, MIXED, IMAGES), rtol=1e-5, atol=1e-5
        )


def test_subnet_mode_equals_the_supernet_with_that_subnet_fixed():
    """Weight sharing: the subnet's tensors are the first rows / columns of the supernet's."""
    supernet = vp.attach(vit3(), "noah", **SPACE)
    randomise(supernet)
    noah_of(supernet).fix_subnet(MIXED)
    subnet = vp.attach(vit3(), "noah", mode="subnet", subnet=MIXED, **SPACE)
    shared = dict(noah_of(supernet).named_tensors())
    with torch.no_grad():
        for name, tensor in noah_of(subnet).named_tensors():
            rows = shared[name][: tensor.shape[0]]
            tensor.copy_(rows[:, : tensor.shape[1]] if tensor.dim() > 1 else rows)
        torch.testing.assert_close(subnet(IMAGES), supernet(IMAGES), rtol=0, atol=1e-6)
    assert sorted(t.shape[0] for n, t in noah_of(subnet).named_tensors() if n.endswith("vpt.prompt")) == [2, 3]


def test_the_largest_subnet_equals_deep_vpt_and_lora_on_qkv_on_the_same_weights():
    """With the adapter off, NOAH at its largest choice is VPT-deep plus a LoRA (alpha = r) on the fused qkv."""
    options = {**SPACE, "vpt_depths": [3], "lora_depths": [3], "adapter_depths": [0]}
    noah = vp.attach(vit3(), "noah", **options)
    randomise(noah)
    shared = dict(noah_of(noah).named_tensors())
    pair = vp.attach(
        vit3(), [("vpt", {"num_tokens": 3, "deep": True}), ("lora", {"target_modules": ["qkv"], "r": 2, "alpha": 2})]
    )
    with torch.no_grad():
        for method in methods_of(pair):  # canonical names: blocks.0.vpt.prompt, blocks.0.attn.qkv.lora_A, ...
            for name, tensor in method.named_tensors():
                block, _, rest = name.removeprefix("blocks.").partition(".")
                source = "vpt.prompt" if rest == "vpt.prompt" else "lora." + rest.rpartition(".")[2]
                tensor.copy_(shared[f"blocks.{block}.noah.{source}"])
        torch.testing.assert_close(noah(IMAGES), pair(IMAGES), rtol=1e-5, atol=1e-5)


def enumerate_space(space, layers):
    """Every subnet of ``space``: per module a depth and a width for each of its first blocks."""
    per_module = []
    for module in ("vpt", "lora", "adapter"):
        options = []
        for depth in space.depths(module):
            for widths in itertools.product(space.widths(module), repeat=depth):
                options.append(tuple(widths) + (0,) * (layers - depth))
        per_module.append(options)
    return {tuple(choice) for choice in itertools.product(*per_module)}


def test_sampling_covers_the_space_and_nothing_else():
    space = make_config("noah", {**SPACE, "adapter_depths": [0, 2]})
    expected = enumerate_space(space, 3)
    rng = random.Random(0)
    seen = {tuple(s.values()) for s in (sample_subnet(space, 3, rng.choice) for _ in range(20_000))}
    assert seen == expected and len(expected) == (4 + 8) * (2 + 8) * (1 + 4)


def test_a_supernet_draws_a_subnet_each_training_step_and_evaluates_its_largest():
    model = vp.attach(vit3(), "noah", **SPACE)
    method, space = noah_of(model), make_config("noah", SPACE)
    everything = enumerate_space(space, 3)
    vp.set_train_mode(model, True)
    torch.manual_seed(0)
    drawn = []
    for _ in range(12):
        model(IMAGES)
        drawn.append(tuple(method.active.values()))
    assert set(drawn) <= everything and len(set(drawn)) > 6
    assert method.tower.tokens.extra_prefix == 0  # the prompts' count is back after each pass
    vp.set_train_mode(model, False)
    model(IMAGES)
    assert method.active == largest_subnet(space, 3)
    method.fix_subnet(MIXED)
    vp.set_train_mode(model, True)
    model(IMAGES)
    assert method.active == {k: tuple(v) for k, v in MIXED.items()}


def test_initialisation_is_the_official_one():
    d = 768
    model = vitb16().to_empty(device="cpu")
    torch.manual_seed(0)
    vp.attach(model, "noah")
    params = dict(noah_of(model).named_tensors())
    prompts = torch.cat([p for n, p in params.items() if n.endswith("vpt.prompt")])
    assert prompts.abs().max() <= math.sqrt(6 / (d * 101)) and prompts.std() > 0.8 * math.sqrt(
        6 / (d * 101)
    ) / math.sqrt(3)
    weights = torch.cat([p.flatten() for n, p in params.items() if "adapter" in n and n.endswith("weight")])
    bound = math.sqrt(6 / (d + 100))  # xavier of the official 100-wide tensors
    assert weights.abs().max() <= bound and weights.abs().max() > 0.99 * bound
    biases = torch.cat([p for n, p in params.items() if "adapter" in n and n.endswith("bias")])
    assert 0 < biases.abs().max() < 1e-5
    assert all(p.abs().sum() == 0 for n, p in params.items() if n.endswith("lora_B"))
    a = torch.cat([p for n, p in params.items() if n.endswith("lora_A")])
    assert a.abs().max() <= 1 / math.sqrt(d) and a.abs().max() > 0.99 / math.sqrt(d)  # kaiming_uniform(a=sqrt 5)


def test_save_load_on_a_fresh_model_keeps_the_mode_and_detach_restores(tmp_path):
    model = vp.attach(vit3(), "noah", mode="subnet", subnet=MIXED, **SPACE)
    randomise(model)
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(vit3(), tmp_path)
    assert vp.attached_methods(fresh)[0][1].subnet == {k: tuple(v) for k, v in MIXED.items()}
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGES), trained, rtol=0, atol=0)
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), vit3()(IMAGES), rtol=0, atol=0)


RELOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
import visionpeft as vp
from tiny_models import tiny_vit
torch.set_num_threads(1)
model = vp.load_adapter(tiny_vit(), {adapter!r}).eval()
with torch.no_grad():
    torch.save(model(torch.load({images!r})), {out!r})
"""


@pytest.mark.slow
def test_save_load_in_a_new_process(tmp_path):
    options = dict(
        vpt_tokens=[2], lora_ranks=[1], adapter_dims=[4], vpt_depths=[2], lora_depths=[1], adapter_depths=[1]
    )
    subnet = {"vpt": [2, 2], "lora": [1, 0], "adapter": [4, 0]}
    model = vp.attach(tiny_vit(), "noah", mode="subnet", subnet=subnet, **options)
    randomise(model)
    with torch.no_grad():
        trained = model(IMAGES)
    vp.save_adapter(model, tmp_path / "adapter")
    torch.save(IMAGES, tmp_path / "images.pt")
    script = RELOAD.format(
        tests=str(Path(__file__).parent),
        adapter=str(tmp_path / "adapter"),
        images=str(tmp_path / "images.pt"),
        out=str(tmp_path / "out.pt"),
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the child runs with one thread, this process maybe with two: reductions may differ by ~1e-7
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), trained, rtol=1e-5, atol=1e-6)


def test_supernet_training_lowers_the_loss():
    torch.manual_seed(0)
    model = vp.attach(vit3(), "noah", **SPACE)
    losses = training_losses(model, steps=30, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.abs().sum() > 0 for n, p in noah_of(model).named_tensors() if n.endswith("lora_B"))


def test_features_and_convpass_see_the_prompts_of_each_block():
    model = vp.attach(vit3(), [("noah", SPACE), ("convpass", {"dim": 4})])
    noah_of(model).fix_subnet(MIXED)
    maps = vp.features(model, IMAGES, [0])  # stops after block 0: the next pass starts clean
    assert maps[0].shape == (2, 32, 4, 4)
    with torch.no_grad():
        model(IMAGES)
    assert noah_of(model).tower.tokens.extra_prefix == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"vpt_tokens": []}, "option 'vpt_tokens' must not be empty"),
        ({"vpt_depths": [0], "lora_depths": [0], "adapter_depths": [0]}, "empty search space"),
        ({"lora_ranks": [4, 4]}, "option 'lora_ranks' must list distinct integers of at least 1"),
        ({"adapter_dims": [0, 2]}, "option 'adapter_dims' must list distinct integers of at least 1"),
        ({"mode": "subnet"}, "mode subnet needs subnet"),
        ({"subnet": MIXED}, "option 'subnet' is for mode subnet"),
        ({"mode": "subnet", "subnet": {**MIXED, "lora": [2, 7, 2]}}, r"lora \[2, 7, 2\]: 7 is not in the space"),
        ({"mode": "subnet", "subnet": {**MIXED, "vpt": [3, 0, 2]}}, r"vpt \[3, 0, 2\]: 2 is not in the space"),
        ({"mode": "subnet", "subnet": {**MIXED, "adapter": [4, 0, 0]}}, "is on in 1 blocks; the space's depths"),
        ({"mode": "subnet", "subnet": {"vpt": [3, 2, 0], "lora": [2, 1, 2]}}, "maps vpt, lora and adapter"),
        ({"mode": "subnet", "subnet": {k: v + [0] for k, v in MIXED.items()}}, "lists 4 blocks; the model has 3"),
        ({"vpt_depths": [2, 12]}, "'vpt_depths' goes to 12 blocks; the timm_vit tower has 3"),
    ],
)
def test_bad_options_are_one_line(options, message):
    model = vit3()
    with pytest.raises(ConfigError, match=message) as err:
        vp.attach(model, "noah", **{**SPACE, **options})
    assert "\n" not in str(err.value)
    assert not vp.attached_methods(model)


CLIP_SPACE = {**SPACE, "vpt_depths": [2], "lora_depths": [2], "adapter_depths": [2]}  # 2 blocks


def test_nn_multihead_attention_is_one_line_unless_the_lora_is_off():
    with pytest.raises(IncompatibleMethodError, match="nn.MultiheadAttention is not supported") as err:
        vp.attach(tiny_clip(), "noah", **CLIP_SPACE)
    assert "\n" not in str(err.value)
    model = vp.attach(tiny_clip(), "noah", **{**CLIP_SPACE, "lora_depths": [0]})  # prompts and adapters only
    assert vp.count_parameters(model)["by_group"]["noah"] > 0


def test_eva_with_separate_q_k_v_projections_matches_the_fused_layout():
    """One A and one B (q, k, v rows) whether q, k and v are one fused Linear or three (EVA's qkv_fused=False)."""
    from timm.models.eva import Eva

    def eva(fused: bool, bias: bool = False):
        torch.manual_seed(0)
        kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=bias)
        return Eva(**kw, qkv_fused=fused).eval()

    options = {**SPACE, "vpt_depths": [2], "lora_depths": [2], "adapter_depths": [0]}
    separate, fused = vp.attach(eva(False), "noah", **options), vp.attach(eva(True), "noah", **options)
    with torch.no_grad():
        for name, proj in ((n, p) for n, p in separate.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))):
            block, slot = name.split(".")[1], "qkv".index(name[-6])
            fused.blocks[int(block)].attn.qkv.weight[32 * slot : 32 * (slot + 1)] = proj.weight
        randomise(separate)
        for (_, tensor), (_, source) in zip(noah_of(fused).named_tensors(), noah_of(separate).named_tensors()):
            tensor.copy_(source)
        torch.testing.assert_close(fused(IMAGES), separate(IMAGES), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(separate(IMAGES), eva(False)(IMAGES), rtol=1e-2, atol=0)  # EVA's logits are ~1e-4
    with pytest.raises(IncompatibleMethodError, match="reads its weight without calling the module") as err:
        vp.attach(eva(True, bias=True), "noah", **options)  # EVA's fused qkv with q / v biases outside it
    assert "\n" not in str(err.value)


def test_runs_on_a_half_precision_backbone_with_fp32_modules():
    """The backbone stored in bf16 (as ``freeze_in_precision`` stores frozen weights), NOAH's tensors in fp32."""
    model = vp.attach(vit3(), "noah", **SPACE)
    randomise(model)
    noah_of(model).fix_subnet(MIXED)
    own = {id(p) for _, p in noah_of(model).named_tensors()}
    with torch.no_grad():
        expected = model(IMAGES)
        for p in model.parameters():
            if id(p) not in own:
                p.data = p.data.to(torch.bfloat16)
        half = model(IMAGES.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=0.05, atol=0.05)
