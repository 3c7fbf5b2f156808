"""Trainable-parameter counts equal each paper's closed form, on full-size ViT-B/16 (built on the meta device)."""

from __future__ import annotations

import pytest
import timm
import torch

import visionpeft as vp

D, DEPTH, HIDDEN = 768, 12, 3072


@pytest.fixture(scope="module")
def vitb_factory():
    def make():
        with torch.device("meta"):
            return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)

    return make


PAPER_COUNTS = [
    # REFERENCES.md, "Exact parameter counts for ViT-B/16 (closed form, head excluded)"
    ("lora", {"r": 8, "targets": ["q", "v"]}, DEPTH * 2 * (D * 8 + 8 * D)),  # 294,912
    ("adaptformer", {"bottleneck": 8}, DEPTH * (D * 8 + 8 + 8 * D + D)),  # 156,768
    ("convpass", {"dim": 8}, DEPTH * 2 * (D * 8 + 8 + 8 * 8 * 9 + 8 + 8 * D + D)),  # 327,552
    ("vpt", {"num_tokens": 10, "deep": True}, DEPTH * 10 * D),  # 92,160
    ("vpt", {"num_tokens": 10}, 10 * D),  # 7,680
    # BitFit: qkv, proj, fc1, fc2 and both LayerNorm biases per block, the patch embedding and final norm biases
    ("bitfit", {}, DEPTH * (3 * D + D + HIDDEN + D + 2 * D) + D + D),  # 102,912
    # DiffFit: biases + LayerNorm weights and biases + one gamma per residual branch
    ("difffit", {}, DEPTH * (3 * D + D + HIDDEN + D + 4 * D + 2 * D) + D + 2 * D),  # 140,544
    ("ln_tune", {}, DEPTH * 2 * 2 * D + 2 * D),  # 38,400: both norms per block and the final norm
    # SSF: a scale and a shift after qkv, proj, fc1, fc2 and both LayerNorms per block, the patch embedding and the
    # final norm (PETL_Vision's inserted_parameters)
    ("ssf", {}, DEPTH * 2 * (3 * D + D + HIDDEN + D + 2 * D) + 2 * D + 2 * D),  # 205,824
    # (IA)^3: the keys, the values and the MLP's inner activation (fc2's input) of every block (the paper's choice)
    ("ia3", {}, DEPTH * (D + D + HIDDEN)),  # 55,296
    ("linear", {}, 0),
]


@pytest.mark.parametrize(("method", "options", "expected"), PAPER_COUNTS, ids=[f"{m}-{e}" for m, _, e in PAPER_COUNTS])
def test_paper_parameter_counts(vitb_factory, method, options, expected):
    model = vp.attach(vitb_factory(), method, **options)
    counts = vp.count_parameters(model)
    assert counts["by_group"][method] == expected
    assert counts["by_group"]["head"] == D * 100 + 100
    assert counts["trainable"] == expected + D * 100 + 100


def test_published_totals(vitb_factory):
    assert PAPER_COUNTS[0][2] == 294_912 and PAPER_COUNTS[1][2] == 156_768 and PAPER_COUNTS[2][2] == 327_552
    assert PAPER_COUNTS[3][2] == 92_160 and PAPER_COUNTS[5][2] == 102_912 and PAPER_COUNTS[6][2] == 140_544
    full = vp.count_parameters(vp.attach(vitb_factory(), "full"))
    assert full["by_group"]["full"] == 85_798_656  # ViT-B/16 without its head: the 85.8 M of the VTAB tables


def test_hybrid_counts_add_up(vitb_factory):
    model = vp.attach(vitb_factory(), [("vpt", {"num_tokens": 10, "deep": True}), ("lora", {"r": 8})])
    counts = vp.count_parameters(model)
    assert counts["by_group"] == {"vpt": 92_160, "lora": 294_912, "head": 76_900}
    assert counts["trainable"] == 92_160 + 294_912 + 76_900


def test_controlnet_on_the_sd15_unet_trains_the_published_361m():
    """ControlNet for SD 1.5 (the encoder copy, hint encoder and zero convs): 361,279,120 parameters, as
    diffusers' ControlNetModel.from_unet builds it (1.45 GB in fp32, the size of the released SD 1.5 ControlNets)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
        )
    assert vp.count_parameters(vp.attach(unet, "controlnet"))["by_group"] == {"controlnet": 361_279_120}
