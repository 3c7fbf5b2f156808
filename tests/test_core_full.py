"""Full fine-tuning holds no second copy of the model unless asked: the memory after attach is the plain model's."""

from __future__ import annotations

import logging

import torch
from tiny_models import _images, tiny_vit

import visionpeft as vp
from visionpeft.adapter import methods_of


def _tensors(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model and its adapter state hold (parameters, buffers, kept originals)."""
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    for method in methods_of(model):
        held.update({t.data_ptr(): t.numel() * t.element_size() for t in method._originals.values()})
    return sum(held.values())


def test_full_keeps_no_copy_by_default_and_detach_says_it_keeps_the_trained_weights(caplog):
    plain = _tensors(tiny_vit())
    model = vp.attach(tiny_vit(), "full")
    assert _tensors(model) == plain
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(1.0)  # "trained"
    trained = model.blocks[0].mlp.fc1.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        vp.detach(model)
    assert "kept no copy of the pretrained weights" in caplog.text
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, trained, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored as they were


def test_full_with_keep_original_restores_the_pretrained_model():
    reference = tiny_vit()(_images())
    model = vp.attach(tiny_vit(), "full", keep_original=True)
    assert _tensors(model) > _tensors(tiny_vit())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    vp.detach(model)
    torch.testing.assert_close(model(_images()), reference, rtol=0, atol=0)
