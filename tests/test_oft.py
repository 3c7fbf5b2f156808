"""OFT: equal to PEFT 0.21's OFT layers (counts, outputs with the Cayley-Neumann series or the exact transform,
block sharing, COFT's projection, PEFT's folder) on timm ViT, a diffusers U-Net and DiT - on convolutions larger than
1x1 equal to PEFT's merged layer, since PEFT 0.21's unmerged conv forward is not its own layer -; orthogonality, the
multiplicative dropout; exact merge and detach on every family; reload in a new process, composition, training, bad
input in one line."""

from __future__ import annotations

import peft
import pytest
import torch
from lycoris_checks import (
    DIT_MODULES,
    FAMILIES,
    UNET_MODULES,
    VIT_MODULES,
    assert_composes,
    assert_equals_peft,
    assert_merges_exactly_and_detaches,
    assert_one_line,
    assert_peft_folder_loads,
    assert_reloads_in_a_new_process,
    assert_training_lowers_the_loss,
    assert_vitb16_counts,
    randomize,
)

import visionpeft as vp
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.layers.oft import OFTUpdate

POINTWISE = ["proj_in", "conv_shortcut", "to_q", "to_v"]  # a U-Net's 1x1 convs and Linears
PEFT_CASES = [
    ("vit", {"target_modules": VIT_MODULES}, {"oft_block_size": 8}),
    ("vit", {"target_modules": VIT_MODULES}, {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False}),
    ("vit", {"target_modules": VIT_MODULES}, {"oft_block_size": 16, "block_share": True}),
    ("vit", {"target_modules": VIT_MODULES}, {"oft_block_size": 8, "coft": True, "eps": 1e-2}),
    ("vit", {"target_modules": VIT_MODULES}, {"oft_block_size": 8, "num_cayley_neumann_terms": 3}),
    ("unet", {"target_modules": POINTWISE}, {"oft_block_size": 4}),
    ("dit", {"target_modules": DIT_MODULES}, {"oft_block_size": 4}),
]


@pytest.mark.parametrize(("case", "where", "options"), PEFT_CASES, ids=lambda v: str(v))
def test_outputs_and_counts_equal_peft(case, where, options):
    assert_equals_peft(case, "oft", {**where, **options}, peft.OFTConfig(**where, **options))


def test_convolutions_larger_than_1x1_equal_pefts_merged_layer():
    options = {"target_modules": UNET_MODULES, "oft_block_size": 4}
    assert_equals_peft("unet", "oft", options, peft.OFTConfig(**options), peft_merged=True)


@pytest.mark.slow
def test_vitb16_counts():
    # 768 / 32 = 24 blocks of 32 x 31 / 2 = 496 per adapted slice or module
    assert_vitb16_counts("oft", {}, peft.OFTConfig(target_modules=["qkv"]), 12 * 24 * 496, 12 * 2 * 24 * 496)


def test_the_exact_cayley_transform_keeps_every_row_norm_and_the_series_nearly():
    weight = torch.randn(12, 32)
    for neumann, tolerance in ((False, 1e-5), (True, 1e-2)):
        update = OFTUpdate(32, 8, use_cayley_neumann=neumann)
        with torch.no_grad():
            update.oft_R.normal_(0, 0.02)
            turned = update.updated(weight)
        assert (turned - weight).abs().max() > 1e-3
        torch.testing.assert_close(turned.norm(dim=1), weight.norm(dim=1), rtol=tolerance, atol=0)


def test_module_dropout_makes_that_many_blocks_the_identity_in_training_only():
    update = OFTUpdate(64, 8, module_dropout=0.5, use_cayley_neumann=False)
    with torch.no_grad():
        update.oft_R.normal_(0, 0.1)
    eye = torch.eye(8)
    torch.manual_seed(0)
    sampled = update.rotations(sample=True)
    assert sum(torch.equal(block, eye) for block in sampled) == 4  # int(0.5 x 8 blocks)
    assert not any(torch.allclose(block, eye) for block in update.rotations())


def test_a_whole_linear_runs_the_frozen_layer_on_the_turned_input_as_peft_does():
    """x R into the base layer (PEFT's forward: no gradient of a weight-sized product) is the map of W R^T."""
    layer = torch.nn.Linear(32, 12)
    model = vp.attach(torch.nn.Sequential(layer), "oft", target_modules=["0"], oft_block_size=8)
    randomize(model, scale=0.2)
    inputs = []
    layer.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    x = torch.randn(5, 3, 32)
    output = model(x)
    wrapper = model[0]
    rotation = torch.block_diag(*wrapper.updates["main"].rotations())
    torch.testing.assert_close(inputs[0], x @ rotation)
    torch.testing.assert_close(output, torch.nn.functional.linear(x, wrapper.effective_weight(), layer.bias))
    output.sum().backward()
    assert wrapper.updates["main"].oft_R.grad.abs().max() > 0


def test_coft_keeps_each_block_within_its_radius():
    model = vp.attach(FAMILIES["vit"].factory(), "oft", target_modules=["qkv"], oft_block_size=8, coft=True, eps=1e-2)
    randomize(model, scale=1.0)
    FAMILIES["vit"].run(model)
    update = model.blocks[0].attn.qkv.updates["main"]
    norms = update.skew(update.oft_R).flatten(1).norm(dim=1)
    assert norms.max() <= 1e-2 / 2 + 1e-7  # eps / sqrt(4 blocks)


MERGE_CASES = [
    ("vit", {"oft_block_size": 8}),  # Q and V slices of timm's fused qkv
    ("vit", {"targets": ["q", "k", "v", "o", "fc1", "fc2"], "r": 2, "oft_block_size": 0, "coft": True}),
    ("clip_vision", {"targets": ["q", "v", "o", "fc1"], "oft_block_size": 8}),  # nn.MultiheadAttention
    ("clip_text", {"tower": "text", "target_modules": ["attn"], "block_share": True, "oft_block_size": 16}),
    ("unet", {"targets": ["q", "k", "conv1", "conv2"], "oft_block_size": 8, "use_cayley_neumann": False}),
    ("dit", {"targets": ["q", "v", "fc1"], "oft_block_size": 4}),
    ("generic", {"target_modules": ["0", "2", "5"], "r": 1, "oft_block_size": 0}),
]


@pytest.mark.parametrize(("case", "options"), MERGE_CASES, ids=lambda v: str(v))
def test_merges_exactly_and_detaches(case, options):
    assert_merges_exactly_and_detaches(case, "oft", options)


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("vit", {"target_modules": VIT_MODULES, "oft_block_size": 8}),
        ("unet", {"target_modules": POINTWISE, "r": 2, "oft_block_size": 0, "use_cayley_neumann": False}),
    ],
    ids=["vit", "unet"],
)
def test_peft_folder_loads_with_the_same_outputs(case, options, tmp_path):
    assert_peft_folder_loads(case, "oft", options, tmp_path, "OFT")


@pytest.mark.slow
def test_reloads_in_a_new_process(tmp_path):
    assert_reloads_in_a_new_process("vit", "oft", {"targets": ["q", "v", "fc2"], "oft_block_size": 8}, tmp_path)


@pytest.mark.parametrize(
    "methods",
    [
        [("oft", {"target_modules": ["qkv", "fc1"], "oft_block_size": 8}), ("ssf", {})],
        [("ssf", {}), ("oft", {"target_modules": ["qkv", "fc1"], "oft_block_size": 8})],
        [("fact", {"dim": 3}), ("oft", {"oft_block_size": 8})],  # FacT's increment beside the rotated qkv
    ],
    ids=["oft-then-ssf", "ssf-then-oft", "fact-then-oft"],
)
def test_composes_and_merges_with_methods_on_the_same_layers(methods):
    assert_composes(methods)


def test_short_training_lowers_the_loss():
    assert_training_lowers_the_loss("oft", {"targets": ["q", "v", "fc1"], "oft_block_size": 8})


def test_bad_input_is_one_line():
    assert_one_line(
        ConfigError, "oft_block_size 5 does not divide the input size 32 of blocks.0.attn.q", "oft", oft_block_size=5
    )
    assert_one_line(ConfigError, "exactly one of r (4) and oft_block_size (32)", "oft", r=4)
    assert_one_line(ConfigError, "exactly one of r (0) and oft_block_size (0)", "oft", oft_block_size=0)
    assert_one_line(ConfigError, "oft r 3 does not divide the input size 32", "oft", r=3, oft_block_size=0)
    assert_one_line(ConfigError, "oft target 'qq' does not exist", "oft", targets=["qq"])


def test_grouped_convolutions_are_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(IncompatibleMethodError, match="0 is a grouped convolution") as err:
        vp.attach(model, "oft", target_modules=["0"], r=1, oft_block_size=0)
    assert "\n" not in str(err.value) and not vp.attached_methods(model)
