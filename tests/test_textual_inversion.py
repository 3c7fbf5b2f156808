"""Textual inversion on a tiny Stable Diffusion pipeline: only the new rows train; diffusers loads the file."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_images, tiny_sd_pipeline

import visionpeft as vp
from visionpeft.errors import ConfigError, IncompatibleMethodError
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss, encode_prompts

_sample = sample_images


@pytest.mark.slow
def test_textual_inversion_trains_new_rows_only_and_diffusers_loads_it(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    vp.attach(pipe, "textual_inversion", token="<my-cat>", initializer="cat", num_vectors=2)
    assert vp.count_parameters(pipe)["trainable"] == 2 * 16
    cat_id = pipe.tokenizer.encode("cat", add_special_tokens=False)[0]
    parts = DiffusionParts.from_pipeline(pipe)
    with torch.no_grad():  # the placeholder starts as the initializer word (both vectors)
        ours = encode_prompts(parts, ["a <my-cat>"]).hidden[0, 2:4]
        parts_init = pipe.text_encoder.get_input_embeddings()
        assert torch.equal(parts_init.new, table[cat_id].repeat(2, 1))
        assert ours.shape == (2, 16)

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a photo of a <my-cat>"] * 3
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(pipe)], lr=5e-2)
    losses = []
    for step in range(30):
        g = torch.Generator().manual_seed(step % 3)  # a fixed set of noise draws, so the trend is visible
        loss = diffusion_loss(parts, images, prompts, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().base.weight, table)  # every old row bit-identical

    ours = _sample(pipe, "a photo of a <my-cat>")
    assert vp.can_export(pipe, "diffusers") and not vp.can_export(pipe, "peft")
    vp.save_adapter(pipe, tmp_path / "ti", format="diffusers")
    fresh = tiny_sd_pipeline(tmp_path / "tok")
    fresh.load_textual_inversion(tmp_path / "ti" / "learned_embeds.safetensors")
    assert abs(_sample(fresh, "a photo of a <my-cat>") - ours).max() < 1e-5

    vp.save_adapter(pipe, tmp_path / "vp")
    again = vp.load_adapter(tiny_sd_pipeline(tmp_path / "tok"), tmp_path / "vp")
    assert abs(_sample(again, "a photo of a <my-cat>") - ours).max() < 1e-6

    before = _sample(tiny_sd_pipeline(tmp_path / "tok"), "a photo of a cat")
    vp.detach(pipe)
    assert "<my-cat>" not in pipe.tokenizer.get_vocab()
    assert abs(_sample(pipe, "a photo of a cat") - before).max() == 0


def test_textual_inversion_errors(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    with pytest.raises(ConfigError, match="must be a single token"):
        vp.attach(pipe, "textual_inversion", initializer="fire truck on the road")
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        vp.attach(pipe, "textual_inversion", token="cat</w>")
    with pytest.raises(IncompatibleMethodError, match="needs a Stable Diffusion pipeline"):
        vp.attach(pipe.unet, "textual_inversion", tower="unet")
    assert not vp.attached_methods(pipe)


def test_the_new_rows_are_looked_up_without_touching_the_whole_table():
    """Same values and gradients as a lookup in the concatenated table, but the autograd graph holds no
    table-sized step: no concatenation of the table, and the only embedding backward is over the new rows."""
    from torch import nn

    from visionpeft.methods.textual_inversion import NewTokenEmbedding

    base = nn.Embedding(1000, 16).requires_grad_(False)
    layer = NewTokenEmbedding(base, torch.randn(3, 16))
    ids = torch.tensor([[5, 1000, 7, 1002], [1001, 999, 0, 1000]])
    out = layer(ids)
    reference_rows = layer.new.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.embedding(ids, torch.cat([base.weight, reference_rows]))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = sorted(type(node).__name__ for node in nodes)
    assert "CatBackward0" not in names and names.count("EmbeddingBackward0") == 1, names
    out.square().sum().backward()
    reference.square().sum().backward()
    torch.testing.assert_close(layer.new.grad, reference_rows.grad, rtol=0, atol=0)
