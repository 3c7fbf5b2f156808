"""LoHa: equal to PEFT 0.21's LoHa layers (counts, initial draws, outputs, training-time dropouts, PEFT's folder) on
timm ViT, a diffusers U-Net (Linear and Conv2d, effective conv) and DiT; exact merge and detach on every family
(fused Q / V slices, open_clip's nn.MultiheadAttention, a generic model); reload in a new process, composition,
training, bad input in one line."""

from __future__ import annotations

import peft
import pytest
from lycoris_checks import (
    DIT_MODULES,
    FAMILIES,
    UNET_MODULES,
    VIT_MODULES,
    assert_composes,
    assert_equals_peft,
    assert_initial_draws_equal_peft,
    assert_merges_exactly_and_detaches,
    assert_one_line,
    assert_peft_folder_loads,
    assert_reloads_in_a_new_process,
    assert_training_forward_equals_peft,
    assert_training_lowers_the_loss,
    assert_vitb16_counts,
)

import visionpeft as vp
from visionpeft.errors import CheckpointError, ConfigError

PEFT_CASES = [
    ("vit", {"target_modules": VIT_MODULES}, {}),
    ("vit", {"target_modules": VIT_MODULES}, {"r": 4, "alpha": 2}),
    ("unet", {"target_modules": UNET_MODULES}, {}),
    ("unet", {"target_modules": UNET_MODULES}, {"r": 2, "use_effective_conv2d": True}),
    ("dit", {"target_modules": DIT_MODULES}, {"r": 4}),
]


@pytest.mark.parametrize(("case", "where", "options"), PEFT_CASES, ids=lambda v: str(v))
def test_outputs_and_counts_equal_peft(case, where, options):
    assert_equals_peft(case, "loha", {**where, **options}, peft.LoHaConfig(**where, **options))


@pytest.mark.parametrize(
    ("case", "where", "options"), [PEFT_CASES[0], PEFT_CASES[3]], ids=["vit", "unet-effective-conv"]
)
def test_initial_draws_equal_peft(case, where, options):
    assert_initial_draws_equal_peft(case, "loha", {**where, **options}, peft.LoHaConfig(**where, **options))


def test_rank_and_module_dropout_draw_what_peft_draws():
    options = {"rank_dropout": 0.3, "module_dropout": 0.3}
    assert_training_forward_equals_peft("loha", options, peft.LoHaConfig(target_modules=VIT_MODULES, **options))


@pytest.mark.slow
def test_vitb16_counts():
    # whole qkv: 12 x 2 x (2304 x 8 + 8 x 768); Q and V: 12 x 2 x 2 x (768 x 8 + 8 x 768)
    assert_vitb16_counts("loha", {}, peft.LoHaConfig(target_modules=["qkv"]), 589_824, 589_824)


MERGE_CASES = [
    ("vit", {}),  # Q and V slices of timm's fused qkv
    ("vit", {"targets": ["q", "k", "v", "o", "fc1", "fc2"], "rank_dropout": 0.1}),
    ("clip_vision", {"targets": ["q", "v", "o", "fc1"]}),  # nn.MultiheadAttention in weight space
    ("clip_text", {"tower": "text", "targets": ["k", "o"]}),
    ("unet", {"targets": ["q", "k", "conv1", "conv2"], "use_effective_conv2d": True}),
    ("dit", {"targets": ["q", "v", "fc1"]}),
    ("generic", {"target_modules": ["0", "2", "5"], "use_effective_conv2d": True}),
]


@pytest.mark.parametrize(("case", "options"), MERGE_CASES, ids=lambda v: str(v))
def test_merges_exactly_and_detaches(case, options):
    assert_merges_exactly_and_detaches(case, "loha", options)


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("vit", {"target_modules": VIT_MODULES}),
        ("unet", {"target_modules": UNET_MODULES, "use_effective_conv2d": True}),
    ],
    ids=["vit", "unet"],
)
def test_peft_folder_loads_with_the_same_outputs(case, options, tmp_path):
    assert_peft_folder_loads(case, "loha", options, tmp_path, "LOHA")


@pytest.mark.slow
def test_reloads_in_a_new_process(tmp_path):
    assert_reloads_in_a_new_process("vit", "loha", {"targets": ["q", "v", "fc1"]}, tmp_path)


def test_composes_with_lora_and_ssf():
    assert_composes([("loha", {"targets": ["q", "v"]}), ("lora", {"targets": ["fc1"]}), ("ssf", {})])
    assert_composes([("ssf", {}), ("loha", {"targets": ["q", "v", "fc2"]})])


def test_short_training_lowers_the_loss():
    assert_training_lowers_the_loss("loha", {"targets": ["q", "v", "fc1"]})


def test_bad_input_is_one_line():
    assert_one_line(ConfigError, "loha target 'qv' does not exist", "loha", targets=["qv"])
    assert_one_line(ConfigError, "selects no module (did you mean 'qkv'?)", "loha", target_modules=["qkvv"])
    assert_one_line(ConfigError, "option 'r' must be at least 1", "loha", r=0)
    assert_one_line(ConfigError, "needs target_modules", "loha", case="generic")


def test_slices_and_attention_modules_have_no_peft_folder(tmp_path):
    slices = vp.attach(FAMILIES["vit"].factory(), "loha")
    with pytest.raises(CheckpointError, match=r"q / v slices has no PEFT layout.*target_modules=\['qkv'\]") as err:
        vp.save_adapter(slices, tmp_path / "a", format="peft")
    assert "\n" not in str(err.value)
    vp.save_adapter(slices, tmp_path / "b")  # the default folder: visionpeft's files only
    assert not (tmp_path / "b" / "adapter_config.json").exists()
    attention = vp.attach(FAMILIES["clip_vision"].factory(), "loha", target_modules=["attn"])
    with pytest.raises(CheckpointError, match="not nn.MultiheadAttention"):
        vp.save_adapter(attention, tmp_path / "c", format="peft")
