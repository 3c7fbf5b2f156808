"""BOFT: equal to PEFT 0.21's BOFT layers (butterfly permutations, counts, outputs, the dropout's draws, PEFT's
folder) on timm ViT, a diffusers U-Net (Linear and Conv2d) and DiT, with one or more butterfly factors; exact merge
and detach on every family; reload in a new process, composition, training, bad input in one line.

PEFT computes more than one butterfly factor only through its CUDA block-diagonal extension (without it, it quietly
uses one factor), so those comparisons give PEFT a torch stand-in with the extension's contract."""

from __future__ import annotations

import peft
import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from lycoris_checks import (
    DIT_MODULES,
    UNET_MODULES,
    VIT_MODULES,
    assert_composes,
    assert_equals_peft,
    assert_merges_exactly_and_detaches,
    assert_one_line,
    assert_peft_folder_loads,
    assert_reloads_in_a_new_process,
    assert_training_forward_equals_peft,
    assert_training_lowers_the_loss,
    assert_vitb16_counts,
)

from visionpeft.errors import ConfigError
from visionpeft.layers.boft import butterfly_permutation

# PEFT tries to build its CUDA extension for every BOFT layer and says so when it cannot (no CUDA here)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Failed to load the CUDA extension", "ignore:Setting boft_n_butterfly_factor to 1"
)


class TorchBlockDiagonal:
    """PEFT's ``fbd_cuda`` extension in torch: ``forward((N, D, b, b)) -> [(N, D b, D b)]`` block diagonals."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture
def peft_butterflies(monkeypatch):
    """PEFT with its block-diagonal extension available (the stand-in), so it builds every butterfly factor."""
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", TorchBlockDiagonal())


@pytest.mark.parametrize(
    ("size", "block_size", "factors"), [(32, 4, 2), (32, 2, 3), (64, 4, 4), (48, 4, 2), (96, 6, 2)]
)
def test_butterfly_permutations_are_pefts(size, block_size, factors):
    count = size // block_size
    for level in range(1, factors):
        expected = peft_boft.BOFTLayer.block_butterfly_perm(None, size, count // 2**level, block_size // 2, factors - 1)
        assert torch.equal(butterfly_permutation(size, block_size, level), expected)


PEFT_CASES = [
    ("vit", {"target_modules": VIT_MODULES}, {}),
    ("vit", {"target_modules": VIT_MODULES}, {"boft_block_size": 0, "boft_block_num": 8}),
    ("unet", {"target_modules": UNET_MODULES}, {}),
    ("dit", {"target_modules": DIT_MODULES}, {"boft_block_size": 0, "boft_block_num": 2}),
]


@pytest.mark.parametrize(("case", "where", "options"), PEFT_CASES, ids=lambda v: str(v))
def test_outputs_and_counts_equal_peft(case, where, options):
    assert_equals_peft(case, "boft", {**where, **options}, peft.BOFTConfig(**where, **options))


BUTTERFLY_CASES = [
    ("vit", {"target_modules": VIT_MODULES}, {"boft_n_butterfly_factor": 2}),
    ("vit", {"target_modules": VIT_MODULES}, {"boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    (
        "vit",
        {"target_modules": ["qkv", "fc2"]},
        {"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3},
    ),
    ("unet", {"target_modules": ["conv1", "to_q"]}, {"boft_n_butterfly_factor": 2}),
]


@pytest.mark.parametrize(("case", "where", "options"), BUTTERFLY_CASES, ids=lambda v: str(v))
def test_several_butterfly_factors_equal_peft(peft_butterflies, case, where, options):
    assert_equals_peft(case, "boft", {**where, **options}, peft.BOFTConfig(**where, **options))


@pytest.mark.parametrize("factors", [1, 2])
def test_dropout_draws_what_peft_draws(peft_butterflies, factors):
    options = {"boft_dropout": 0.5, "boft_n_butterfly_factor": factors}
    assert_training_forward_equals_peft("boft", options, peft.BOFTConfig(target_modules=VIT_MODULES, **options))


@pytest.mark.slow
def test_vitb16_counts():
    # 768 / 4 = 192 blocks of 4 x 4 per adapted slice or module, and one scale per output row
    expected_qkv, expected_qv = 12 * (192 * 16 + 2304), 12 * 2 * (192 * 16 + 768)
    assert_vitb16_counts("boft", {}, peft.BOFTConfig(target_modules=["qkv"]), expected_qkv, expected_qv)


MERGE_CASES = [
    ("vit", {}),  # Q and V slices of timm's fused qkv
    ("vit", {"targets": ["q", "k", "v", "o", "fc1", "fc2"], "boft_n_butterfly_factor": 3, "boft_block_size": 2}),
    ("clip_vision", {"targets": ["q", "v", "o", "fc1"]}),  # nn.MultiheadAttention in weight space
    ("clip_text", {"tower": "text", "target_modules": ["attn"], "boft_n_butterfly_factor": 2}),
    ("unet", {"targets": ["q", "k", "conv1", "conv2"]}),
    ("dit", {"targets": ["q", "v", "fc1"], "boft_block_size": 0, "boft_block_num": 4}),
    ("generic", {"target_modules": ["0", "2", "5"], "boft_block_size": 0, "boft_block_num": 1}),
]


@pytest.mark.parametrize(("case", "options"), MERGE_CASES, ids=lambda v: str(v))
def test_merges_exactly_and_detaches(case, options):
    assert_merges_exactly_and_detaches(case, "boft", options)


def test_peft_folder_loads_with_the_same_outputs(tmp_path):
    assert_peft_folder_loads("unet", "boft", {"target_modules": UNET_MODULES}, tmp_path, "BOFT")


def test_peft_folder_of_several_factors_loads_where_peft_builds_them(peft_butterflies, tmp_path):
    options = {"target_modules": VIT_MODULES, "boft_n_butterfly_factor": 2}
    assert_peft_folder_loads("vit", "boft", options, tmp_path, "BOFT")


@pytest.mark.slow
def test_reloads_in_a_new_process(tmp_path):
    options = {"targets": ["q", "v", "fc2"], "boft_n_butterfly_factor": 2}
    assert_reloads_in_a_new_process("vit", "boft", options, tmp_path)


def test_composes_and_merges_with_methods_on_the_same_layers():
    assert_composes([("ssf", {}), ("boft", {"target_modules": ["qkv", "fc1"]}), ("fact", {"dim": 3})])
    assert_composes([("boft", {}), ("lora", {"targets": ["fc2"]}), ("ssf", {})])


def test_short_training_lowers_the_loss():
    assert_training_lowers_the_loss("boft", {"targets": ["q", "v", "fc1"], "boft_n_butterfly_factor": 2})


def test_bad_input_is_one_line():
    assert_one_line(
        ConfigError, "boft_block_size 5 does not divide the input size 32 of blocks.0.attn.q", "boft", boft_block_size=5
    )
    assert_one_line(ConfigError, "exactly one of boft_block_size (4) and boft_block_num (8)", "boft", boft_block_num=8)
    assert_one_line(
        ConfigError,
        "needs boft_block_num to be a multiple of 4, got 2",
        "boft",
        boft_block_size=0,
        boft_block_num=2,
        boft_n_butterfly_factor=3,
    )
    assert_one_line(ConfigError, "needs an input size that is a multiple of 64", "boft", boft_n_butterfly_factor=5)
    assert_one_line(
        ConfigError, "needs an even block count and size", "boft", boft_block_size=1, boft_n_butterfly_factor=2
    )
