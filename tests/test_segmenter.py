"""The segmenter task model: heads x backbones, the token contract, sliding-window inference, merge, save/load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_clip, tiny_vit
from torch import nn

import visionpeft as vp
from visionpeft.checkpoint.folder import CONFIG_NAME, WEIGHTS_NAME
from visionpeft.errors import ConfigError, IncompatibleMethodError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"channels": 16}  # conv-head width: keeps SETR-PUP / UperNet tiny


def vit(**kw):
    return tiny_vit(**{"depth": 4, "dynamic_img_size": True, **kw})


BACKBONES = {"vit": (vit, (32, 48)), "vit_reg": (lambda: vit(reg_tokens=2), (40, 32)), "clip": (tiny_clip, (32, 32))}


def _images(size, n=2, seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("head", vp.segmentation.HEADS)
def test_every_head_on_every_backbone_gives_logits_at_the_input_size(backbone, head):
    make, size = BACKBONES[backbone]
    seg = vp.segmentation.build(make(), head=head, num_classes=5, aux=head == "setr_pup", **SMALL)
    vp.attach(seg, "lora", r=2)
    seg.train()
    logits, aux = seg(_images(size), with_aux=True)
    assert logits.shape == (2, 5, *size)
    assert [a.shape for a in aux] == ([(2, 5, *size)] * 3 if head == "setr_pup" else [])
    groups = vp.count_parameters(seg)["by_group"]
    assert groups["head"] == sum(p.numel() for p in seg.head.parameters()) > 0
    assert ("aux_head" in groups) == (head == "setr_pup")
    (logits.sum() + sum(a.sum() for a in aux)).backward()
    assert all(p.grad is not None for p in seg.head.parameters())


def _head_inputs(seg, images):
    seen = []
    handle = seg.head.register_forward_pre_hook(lambda m, args: seen.append([t.detach() for t in args[0]]))
    try:
        seg(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_the_head_reads_patch_tokens_only_on_the_crop_grid(backbone):
    """Class, register and VPT prompt tokens are gone: the head's maps equal a manual reshape of the block output."""
    make, size = BACKBONES[backbone]
    seg = vp.segmentation.build(make(), head="linear4", num_classes=3).eval()
    vp.attach(seg, "vpt", num_tokens=5, deep=True)
    prefix = {"vit": 1, "vit_reg": 3, "clip": 1}[backbone] + 5
    blocks = vp.adapter.backbone_of(seg).tower(None).blocks
    outputs = {}
    handles = [
        b.module.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o), prepend=True)
        for i, b in enumerate(blocks)
    ]  # prepend: the raw output, before VPT's own hooks
    images = _images(size)
    maps = _head_inputs(seg, images)
    for h in handles:
        h.remove()
    grid = (size[0] // 8, size[1] // 8)
    for i, got in zip(seg.indices, maps):
        tokens = outputs[i]
        assert tokens.shape[1] == prefix + grid[0] * grid[1]
        manual = tokens[:, prefix:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, manual, rtol=0, atol=0)


def test_non_square_crops_and_default_blocks():
    seg = vp.segmentation.build(vit(), head="upernet", num_classes=4, **SMALL).eval()
    assert seg.indices == [0, 1, 2, 3]
    maps = _head_inputs(seg, _images((24, 64)))
    assert [tuple(m.shape[-2:]) for m in maps] == [(3, 8)] * 4
    assert seg(_images((24, 64))).shape == (2, 4, 24, 64)
    images = _images((30, 45))  # not a multiple of the 8 px patch: padded to 32 x 48, logits cut back
    maps = _head_inputs(seg, images)
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 6)] * 4
    logits = seg(images)
    assert logits.shape == (2, 4, 30, 45)
    padded = torch.nn.functional.pad(images, (0, 3, 0, 2))
    torch.testing.assert_close(logits, seg(padded)[..., :30, :45])
    assert vp.segmentation.default_indices("upernet", 12) == [2, 5, 8, 11]
    assert vp.segmentation.default_indices("linear4", 12) == [8, 9, 10, 11]
    assert vp.segmentation.build(vit(depth=6), head="linear").indices == [5]


class Pointwise(nn.Module):
    """A translation-equivariant toy: every pixel's logits depend on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("size", [(37, 53), (20, 30), (64, 64)])
def test_slide_inference_is_stride_invariant_on_an_equivariant_model(size):
    model, images = Pointwise(), _images(size)
    whole = model(images)
    for crop, stride in [((32, 32), (21, 21)), ((32, 32), (32, 32)), ((16, 24), (5, 7)), ((32, 32), (1, 31))]:
        slide = vp.segmentation.slide_logits(model, images, crop, stride, max_batch=5)
        torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)


def test_slide_equals_whole_when_the_crop_covers_the_image():
    seg = vp.segmentation.build(vit(), head="setr_pup", num_classes=3, **SMALL).eval()
    images = _images((32, 48))
    whole = vp.segmentation.predict_logits(seg, images, "whole")
    slide = vp.segmentation.predict_logits(seg, images, "slide", crop=(32, 48), stride=(8, 8))
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    windows = vp.segmentation.window_grid(512, 683, (512, 512), (341, 341))
    assert windows == [(0, 512, 0, 512), (0, 512, 171, 683)]  # the last column is clamped to the border
    coarse = vp.segmentation.predict_logits(seg, images, "slide", crop=(32, 32), stride=(16, 16))
    assert not torch.allclose(coarse, whole, atol=1e-3)  # a smaller window does see less context


def _trained_batchnorm(seg):
    """Gives the head's BatchNorm running statistics that differ from their initial values."""
    with torch.no_grad():
        for module in seg.head.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)


def test_lora_merge_leaves_the_logits_unchanged():
    seg = vp.segmentation.build(vit(), head="linear4", num_classes=3).eval()
    vp.attach(seg, "lora", r=4)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(seg):
            p.add_(0.1 * torch.randn_like(p))
    images = _images((32, 40))
    before = seg(images)
    vp.merge(seg)
    assert vp.attached_methods(seg) == []
    torch.testing.assert_close(seg(images), before, rtol=1e-5, atol=1e-5)


RELOAD = """
import sys, torch, visionpeft as vp
sys.path.insert(0, {tests!r})
from tiny_models import tiny_vit
model = tiny_vit(depth=4, dynamic_img_size=True)
torch.manual_seed(123)  # the head starts from other weights than the saved one
seg = vp.segmentation.build(model, head="setr_pup", num_classes=3, aux=True, channels=16).eval()
vp.load_adapter(seg, {adapter!r})
images = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
torch.save(seg(images), {out!r})
"""


@pytest.mark.slow
def test_adapter_and_head_round_trip_in_a_new_process(tmp_path):
    seg = vp.segmentation.build(
        vit(),
        head="setr_pup",
        num_classes=3,
        aux=True,
        classes=["a", "b", "c"],
        palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]],
        **SMALL,
    ).eval()
    vp.attach(seg, "adaptformer", bottleneck=4)
    _trained_batchnorm(seg)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(seg):
            p.add_(0.05 * torch.randn_like(p))
    expected = seg(_images((32, 40)))
    vp.save_adapter(seg, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert "head.stages.0.0.1.running_mean" in saved and any(k.startswith("aux_head.") for k in saved)
    task = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["task"]
    assert task["id2label"] == {"0": "a", "1": "b", "2": "c"} and task["head"] == "setr_pup"
    script = RELOAD.format(tests=str(ROOT / "tests"), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "out.pt"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    # the child runs with torch's default thread count, the test worker with one: reductions may differ by ~1e-7
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown segmentation head 'uper'.*did you mean 'upernet'"):
        vp.segmentation.build(vit(), head="uper")
    with pytest.raises(ConfigError, match="reads 4 block"):
        vp.segmentation.build(vit(), head="upernet", indices=[1, 3])
    with pytest.raises(ConfigError, match="out of range"):
        vp.segmentation.build(vit(), head="linear", indices=[7])
    with pytest.raises(ConfigError, match="auxiliary heads belong to setr_pup"):
        vp.segmentation.build(vit(), head="linear", aux=True)
    with pytest.raises(ConfigError, match="2 class names given for num_classes=3"):
        vp.segmentation.build(vit(), head="linear", num_classes=3, classes=["a", "b"])
    with pytest.raises(IncompatibleMethodError, match="attach methods to the segmenter"):
        vp.segmentation.build(vp.attach(vit(), "lora"), head="linear")


def test_head_sizes_match_the_published_ones():
    """ViT-L/16 SETR-PUP with its three auxiliary heads: the VPT paper's head-only run trains 13.2 M parameters;
    DINOv2's linear head on ViT-B (768 channels, 150 classes): 0.12 M."""
    from visionpeft.tasks.seg_heads import build_aux_heads, build_head

    def count(module):
        return sum(p.numel() for p in module.parameters())

    setr = count(build_head("setr_pup", 1024, 150, 1, 16)) + count(build_aux_heads(1024, 150, 3, 16))
    assert 12.9e6 < setr < 13.3e6
    assert round(count(build_head("linear", 768, 150, 1, 16)) / 1e6, 2) == 0.12
