"""What a method may ask of a backbone: the patch grid of the actual input, patch-grid features of any block
(prompt tokens removed), and named stage modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip, tiny_clip_timm, tiny_dit, tiny_unet, tiny_vit

import visionpeft as vp
from visionpeft.adapter import backbone_of
from visionpeft.errors import ConfigError


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _block_outputs(blocks, run, batch_first=True):
    """Runs ``run()`` and returns every block's output as (batch, tokens, dim)."""
    outputs = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return {i: o if batch_first else o.transpose(0, 1) for i, o in outputs.items()}


def _as_map(tokens, h, w):
    """The last h * w tokens of (batch, tokens, dim) as a (batch, dim, h, w) map, row-major."""
    return tokens[:, -h * w :].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _residual_terms(method: str, branch: str, **options):
    """Per sample of a 64-image batch through block 1 of a tiny ViT (drop path 0.5 there) with ``method``: the
    branch's own term f, the method's term g (both from an eval pass) and the train-mode sum added to the stream."""
    model = vp.attach(tiny_vit(drop_path_rate=0.5), method, dropout=0.0, **options)  # rates 0 and 0.5
    _perturb(model)
    block, images = model.blocks[1], torch.randn(64, 3, 32, 32)
    if branch == "mlp":  # the MLP's input must not depend on the attention's drop path
        block.drop_path1 = torch.nn.Identity()
    inner, residual = (block.attn, block.drop_path1) if branch == "attn" else (block.mlp, block.drop_path2)
    assert residual.drop_prob == 0.5
    seen = {}
    handles = [
        inner.register_forward_hook(lambda m, a, o: seen.update(f=o)),
        residual.register_forward_hook(lambda m, a, o: seen.update(total=o)),
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        model(images)  # eval: no drop path
        f, g = seen["f"], seen["total"] - seen["f"]
        model.train()(images)  # block 0 has rate 0, so block 1 sees the same input
    for handle in handles:
        handle.remove()
    return f, g, seen["total"]


def _kept(term: torch.Tensor, total: torch.Tensor, candidates) -> list[tuple[bool, bool]]:
    """Which (f kept, g kept) combination of ``candidates`` explains each sample of ``total``."""
    found = []
    for i in range(total.shape[0]):
        match = [k for k, value in candidates.items() if torch.allclose(total[i], value[i], atol=1e-5)]
        assert len(match) == 1, f"sample {i} is no combination of the terms"
        found.append(match[0])
    return found


def test_convpass_bypass_gets_a_drop_path_mask_of_its_own():
    # the official block: x + dp(attn(norm1(x))) + dp(bypass(norm1(x))) * s, two independent masks at rate p
    f, g, total = _residual_terms("convpass", "attn")
    assert g.abs().mean() > 1e-3
    keep = 2.0  # 1 / (1 - p)
    cases = {(True, True): keep * (f + g), (True, False): keep * f, (False, True): keep * g, (False, False): 0 * f}
    found = set(_kept(f, total, cases))
    assert {(True, False), (False, True)} <= found  # a mask shared with the branch would give neither


def test_adaptformer_adapter_adds_past_the_drop_path_without_one():
    # the official block: x = x + dp(mlp(norm2(x))) + adapt_x, the adapter never dropped
    f, g, total = _residual_terms("adaptformer", "mlp", bottleneck=4)
    assert g.abs().mean() > 1e-3
    found = set(_kept(f, total, {(True, True): 2.0 * f + g, (False, True): g}))
    assert found == {(True, True), (False, True)}


def test_convpass_uses_the_grid_of_a_non_square_input():
    model = vp.attach(tiny_vit(dynamic_img_size=True), "convpass", dropout=0.0)
    _perturb(model)
    block = model.blocks[0]
    seen = {}
    handles = [
        block.attn.register_forward_hook(lambda m, a, o: seen.update(x=a[0])),
        block.drop_path1.register_forward_hook(lambda m, a, o: seen.update(out=o)),
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 64))  # a 4 x 8 patch grid: 32 tokens, no square grid fits
    for handle in handles:
        handle.remove()
    assert backbone_of(model).towers["vision"].tokens.input_grid == (4, 8)
    x = seen["x"]
    bypass = next(m for n, m in block.named_children() if n.startswith("vp_convpass"))  # the attention's bypass
    with torch.no_grad():
        hidden = _quick_gelu(bypass.down(x))
        cls = hidden[:, :1] @ bypass.conv.weight[:, :, 1, 1].t() + bypass.conv.bias
        grid = hidden[:, 1:].reshape(2, 4, 8, -1).permute(0, 3, 1, 2)  # tokens are row-major over (h, w)
        conv = F.conv2d(grid, bypass.conv.weight, bypass.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(2, 32, -1)
        expected = block.attn.forward(x) + bypass.up(_quick_gelu(torch.cat([cls, conv], 1)))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)
    vp.detach(model)
    assert not block.attn._forward_pre_hooks and not block.drop_path1._forward_hooks
    assert not model.patch_embed._forward_pre_hooks


@pytest.mark.parametrize("size", [(32, 32), (48, 80)])
def test_timm_features_on_the_grid_of_the_input(size):
    model = tiny_vit(dynamic_img_size=True)
    x = torch.randn(2, 3, *size)
    h, w = size[0] // 8, size[1] // 8
    with torch.no_grad():
        maps = vp.features(model, x, [0, -1])
    outputs = _block_outputs(model.blocks, lambda: model.forward_features(x))
    assert [m.shape for m in maps] == [(2, 32, h, w)] * 2
    torch.testing.assert_close(maps[0], _as_map(outputs[0], h, w), rtol=0, atol=0)
    torch.testing.assert_close(maps[1], _as_map(outputs[1], h, w), rtol=0, atol=0)


def test_vpt_deep_features_equal_the_hand_sliced_block_outputs():
    model = vp.attach(tiny_vit(reg_tokens=2), "vpt", num_tokens=3, deep=True)
    _perturb(model)
    x = torch.randn(2, 3, 32, 32)
    outputs = _block_outputs(model.blocks, lambda: model(x))
    assert outputs[0].shape[1] == 3 + 3 + 16  # class + 2 registers, 3 prompts, 4 x 4 patches
    with torch.no_grad():
        first, last = vp.features(model, x, [0, 1])
    torch.testing.assert_close(first, outputs[0][:, 6:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(last, outputs[1][:, 3:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2), rtol=0, atol=0)


def test_features_stop_after_the_deepest_block():
    model = tiny_vit(depth=3)
    calls = []
    model.blocks[2].register_forward_hook(lambda *a: calls.append(2))
    vp.features(model, torch.randn(1, 3, 32, 32), [1])
    assert calls == []
    with pytest.raises(ConfigError, match="block index 3 is out of range"):
        vp.features(model, torch.randn(1, 3, 32, 32), [3])


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_features_with_and_without_methods(batch_first):
    model = tiny_clip(batch_first=batch_first)
    x = torch.randn(2, 3, 32, 32)
    blocks = model.visual.transformer.resblocks
    plain = _block_outputs(blocks, lambda: model.encode_image(x), batch_first)
    with torch.no_grad():
        (first,) = vp.features(model, x, [-2])
    torch.testing.assert_close(first, _as_map(plain[0], 4, 4), rtol=0, atol=0)
    vp.attach(model, [("vpt", {"num_tokens": 2, "deep": True}), ("convpass", {})])
    _perturb(model)
    adapted = _block_outputs(blocks, lambda: model.encode_image(x), batch_first)
    with torch.no_grad():
        maps = vp.features(model, x, [0, 1])
    torch.testing.assert_close(maps[0], adapted[0][:, 3:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(maps[1], _as_map(adapted[1], 4, 4), rtol=0, atol=0)


@pytest.mark.slow
def test_open_clip_timm_trunk_features():
    model = tiny_clip_timm()
    x = torch.randn(1, 3, 224, 224)
    outputs = _block_outputs(model.visual.trunk.blocks, lambda: model.encode_image(x))
    with torch.no_grad():
        (last,) = vp.features(model, x, [-1])
    assert last.shape == (1, 192, 14, 14)
    torch.testing.assert_close(last, _as_map(outputs[len(outputs) - 1], 14, 14), rtol=0, atol=0)


@pytest.mark.slow
def test_stage_modules_of_unet_and_dit():
    unet = tiny_unet()
    stages = backbone_of(unet).towers["unet"].stages
    assert list(stages) == ["model", "conv_in", "time_embedding", "down.0", "down.1", "mid", "up.0", "up.1", "conv_out"]
    assert stages["model"] is unet
    assert stages["mid"] is unet.mid_block and stages["up.1"] is unet.up_blocks[1]
    dit = backbone_of(tiny_dit()).towers["dit"].stages
    assert {"pos_embed", "proj_out_1", "proj_out_2"} <= set(dit)
    assert set(backbone_of(tiny_vit()).towers["vision"].stages) == {"embed", "pre_norm", "norm"}  # MaPLe's join
