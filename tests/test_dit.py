"""DiT in diffusers: the per-block copies of the timestep / class embedder are trained as the original DiT's one
module, the paper-size parameter count, and the merged model saves and loads as plain diffusers weights."""

from __future__ import annotations

import torch
from tiny_models import CASES, tiny_dit

import visionpeft as vp


def _embedders(model):
    return [block.norm1.emb for block in model.transformer_blocks]


def test_difffit_on_dit_xl2_counts_one_condition_module():
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):  # DiT-XL/2 at 256 px: 28 blocks of width 1152, patch 2, 1000 classes
        model = DiTTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
    d, blocks = 1152, 28
    per_block = 4 * d + 4 * d + d + 6 * d + 2 * d  # q/k/v/out, fc1, fc2, adaLN biases; two branch scales
    shared = 2 * d + 1001 * d  # timestep-MLP biases and the class table (1000 classes + the null class)
    outside = d + 2 * d + 2 * 2 * 8  # patch-embedding bias, final adaLN bias, final projection bias
    counts = vp.count_parameters(vp.attach(model, "difffit"))
    assert counts["trainable"] == blocks * per_block + shared + outside == 1_707_296
    assert counts["total"] == 674_899_232  # the original DiT-XL/2 (diffusers' 28 embedder copies counted once)


def test_shared_while_attached_and_separate_again_after():
    model = tiny_dit()
    with torch.no_grad():
        reference = CASES["dit"].run(model)
    vp.attach(model, "difffit")
    assert all(e is _embedders(model)[0] for e in _embedders(model))
    tables = [n for n, _ in vp.trainable_parameters(model) if "class_embedder" in n]
    assert tables == ["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    with torch.no_grad():
        model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.add_(0.1)
        trained = CASES["dit"].run(model)
    assert not torch.allclose(trained, reference)  # one edit reaches every block and the final layer
    vp.merge(model)
    first, second = _embedders(model)[:2]
    assert first is not second and torch.equal(
        first.class_embedder.embedding_table.weight, second.class_embedder.embedding_table.weight
    )
    with torch.no_grad():
        torch.testing.assert_close(CASES["dit"].run(model), trained, rtol=1e-5, atol=1e-5)


def test_merged_dit_saves_with_save_pretrained_and_reloads(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = vp.attach(tiny_dit(), "difffit")
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(0.05)
        trained = CASES["dit"].run(model)
    vp.save_adapter(model, tmp_path / "adapter")
    fresh = vp.load_adapter(tiny_dit(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(CASES["dit"].run(fresh), trained, rtol=0, atol=0)
    vp.merge(model).save_pretrained(tmp_path / "merged")
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(CASES["dit"].run(reloaded), trained, rtol=1e-5, atol=1e-5)


def test_embedders_that_differ_are_left_separate():
    model = tiny_dit()
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    vp.attach(model, "difffit")
    first, second = _embedders(model)
    assert first is not second  # sharing them would change the outputs
    tables = [n for n, _ in vp.trainable_parameters(model) if "class_embedder" in n]
    assert len(tables) == 2
