"""LayerNorm tuning: exactly the LayerNorms' affine parameters train, in place, and detach / merge / save hold."""

from __future__ import annotations

import pytest
import timm
import torch
from tiny_models import CASES, tiny_vit, training_losses

import visionpeft as vp
from visionpeft.errors import IncompatibleMethodError

D, DEPTH = 768, 12


def test_vit_b16_trains_petl_vision_count():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    counts = vp.count_parameters(vp.attach(model, "ln_tune"))
    assert counts["by_group"]["ln_tune"] == DEPTH * 2 * 2 * D + 2 * D == 38_400  # PETL_Vision's inserted_parameters
    assert counts["trainable"] == 38_400 + D * 100 + 100


def test_only_layer_norm_affine_parameters_and_the_head_train():
    model = vp.attach(tiny_vit(), "ln_tune")
    names = {n for n, _ in vp.trainable_parameters(model)}
    norms = {
        f"{path}.{attr}"
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for attr in ("weight", "bias")
    }
    assert names == norms | {"head.weight", "head.bias"}
    assert "norm.weight" in names  # the final norm too


def test_trained_values_detach_merge_and_load_on_a_fresh_model(tmp_path):
    case = CASES["vit"]
    model = vp.attach(case.factory(), "ln_tune")
    with torch.no_grad():
        reference = case.run(case.factory())
        for _, p in vp.trainable_parameters(model):
            p.add_(0.1)
        trained = case.run(model)
    assert not torch.allclose(trained, reference)
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(case.factory(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.run(fresh), trained, rtol=0, atol=0)
    vp.merge(fresh)
    with torch.no_grad():
        torch.testing.assert_close(case.run(fresh), trained, rtol=0, atol=0)
    vp.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(case.run(model), reference, rtol=0, atol=0)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    model = vp.attach(tiny_vit(), "ln_tune")
    losses = training_losses(model)
    assert losses[-1] < losses[0]


def test_a_model_without_layer_norms_is_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(IncompatibleMethodError, match="ln_tune needs LayerNorms") as err:
        vp.attach(model, "ln_tune")
    assert "\n" not in str(err.value)
    assert not vp.attached_methods(model)
