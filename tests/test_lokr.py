"""LoKr: equal to PEFT 0.21's LoKr layers (factorisation, counts, initial draws, outputs, training-time dropouts,
PEFT's folder) on timm ViT, a diffusers U-Net (Linear and Conv2d, effective conv) and DiT; exact merge and detach on
every family; reload in a new process, composition, training, bad input in one line."""

from __future__ import annotations

import peft
import pytest
from lycoris_checks import (
    DIT_MODULES,
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
from peft.tuners.lokr.layer import factorization as peft_factorization

from visionpeft.errors import ConfigError
from visionpeft.layers.lokr import factorization


def test_factorization_is_pefts():
    assert factorization(768) == (24, 32) and factorization(2304) == (48, 48) and factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32) and factorization(128, 64) == (64, 2) and factorization(100, 3) == (2, 50)
    for dimension in range(1, 400):
        for factor in (-1, 2, 3, 4, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


PEFT_CASES = [
    ("vit", {"target_modules": VIT_MODULES}, {}),
    ("vit", {"target_modules": VIT_MODULES}, {"r": 2, "alpha": 4, "decompose_both": True, "decompose_factor": 4}),
    ("unet", {"target_modules": UNET_MODULES}, {}),
    ("unet", {"target_modules": UNET_MODULES}, {"r": 2, "use_effective_conv2d": True}),
    ("dit", {"target_modules": DIT_MODULES}, {"r": 1, "decompose_both": True}),
]


@pytest.mark.parametrize(("case", "where", "options"), PEFT_CASES, ids=lambda v: str(v))
def test_outputs_and_counts_equal_peft(case, where, options):
    assert_equals_peft(case, "lokr", {**where, **options}, peft.LoKrConfig(**where, **options))


@pytest.mark.parametrize(
    ("case", "where", "options"), [PEFT_CASES[1], PEFT_CASES[3]], ids=["vit-decompose-both", "unet-effective-conv"]
)
def test_initial_draws_equal_peft(case, where, options):
    assert_initial_draws_equal_peft(case, "lokr", {**where, **options}, peft.LoKrConfig(**where, **options))


def test_rank_and_module_dropout_draw_what_peft_draws():
    options = {"rank_dropout": 0.3, "module_dropout": 0.3, "rank_dropout_scale": True}
    assert_training_forward_equals_peft("lokr", options, peft.LoKrConfig(target_modules=VIT_MODULES, **options))


@pytest.mark.slow
def test_vitb16_counts():
    # whole qkv (2304 = 48 x 48, 768 = 24 x 32): W1 48 x 24, W2 (48 x 8)(8 x 32)
    # Q or V (768 = 24 x 32 both ways): W1 24 x 24, W2 (32 x 8)(8 x 32)
    assert_vitb16_counts("lokr", {}, peft.LoKrConfig(target_modules=["qkv"]), 12 * 1_792, 12 * 2 * 1_088)


MERGE_CASES = [
    ("vit", {}),  # Q and V slices of timm's fused qkv
    ("vit", {"targets": ["q", "k", "v", "o", "fc1", "fc2"], "decompose_both": True, "r": 1}),
    ("clip_vision", {"targets": ["q", "v", "o", "fc1"]}),  # nn.MultiheadAttention in weight space
    ("clip_text", {"tower": "text", "target_modules": ["attn"]}),
    ("unet", {"targets": ["q", "k", "conv1", "conv2"], "use_effective_conv2d": True, "r": 2}),
    ("dit", {"targets": ["q", "v", "fc1"], "decompose_factor": 4}),
    ("generic", {"target_modules": ["0", "2", "5"]}),
]


@pytest.mark.parametrize(("case", "options"), MERGE_CASES, ids=lambda v: str(v))
def test_merges_exactly_and_detaches(case, options):
    assert_merges_exactly_and_detaches(case, "lokr", options)


@pytest.mark.parametrize(
    ("case", "options"),
    [("vit", {"target_modules": VIT_MODULES, "r": 2}), ("unet", {"target_modules": UNET_MODULES})],
    ids=["vit", "unet"],
)
def test_peft_folder_loads_with_the_same_outputs(case, options, tmp_path):
    assert_peft_folder_loads(case, "lokr", options, tmp_path, "LOKR")


@pytest.mark.slow
def test_reloads_in_a_new_process(tmp_path):
    assert_reloads_in_a_new_process("unet", "lokr", {"targets": ["q", "conv1"], "use_effective_conv2d": True}, tmp_path)


def test_composes_with_fact_and_lora():
    """FacT hooks the same fused qkv LoKr wraps (its increment beside LoKr's delta); LoRA on another projection."""
    assert_composes([("lokr", {"targets": ["q", "v"]}), ("fact", {"dim": 3}), ("lora", {"targets": ["fc2"]})])


def test_short_training_lowers_the_loss():
    assert_training_lowers_the_loss("lokr", {"targets": ["q", "v", "fc1"], "r": 2, "decompose_both": True})


def test_bad_input_is_one_line():
    assert_one_line(ConfigError, "lokr target 'fc3' does not exist", "lokr", targets=["fc3"])
    assert_one_line(ConfigError, "option 'decompose_factor' must be at least -1", "lokr", decompose_factor=-2)
    assert_one_line(ConfigError, "option 'rank_dropout' must be below 1", "lokr", rank_dropout=1.0)
