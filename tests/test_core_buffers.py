"""Buffers of trained modules: a head's BatchNorm statistics are saved, loaded and restored like its weights."""

from __future__ import annotations

import torch
from tiny_models import _images, tiny_vit
from torch import nn

import visionpeft as vp
from visionpeft.checkpoint.folder import adapter_state_dict

BN_NAMES = ["head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"]


def bn_head_vit(seed: int = 0) -> nn.Module:
    model = tiny_vit(seed)
    torch.manual_seed(seed + 1)
    model.head = nn.Sequential(nn.BatchNorm1d(32), nn.Linear(32, 10)).eval()
    return model


class Wrapper(nn.Module):
    """Holds the adapted model as a submodule, as a training wrapper does."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_head_batchnorm_statistics_round_trip(tmp_path):
    model = vp.attach(bn_head_vit(), "lora", r=2)
    assert model.head._vp_head
    assert [n for n, _ in vp.trainable_buffers(model)] == BN_NAMES
    assert [n for n, _ in vp.trainable_buffers(Wrapper(model))] == [f"net.{n}" for n in BN_NAMES]
    vp.set_train_mode(model, True)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(model):
            p.add_(0.05)
        model(_images() * 3 + 1)
    bn = model.head[0]
    assert int(bn.num_batches_tracked) == 1 and not torch.allclose(bn.running_var, torch.ones(32))
    assert set(BN_NAMES) <= set(adapter_state_dict(model))
    model.eval()
    with torch.no_grad():
        trained = model(_images())
    vp.save_adapter(model, tmp_path)
    fresh = vp.load_adapter(bn_head_vit(), tmp_path).eval()
    assert int(fresh.head[0].num_batches_tracked) == 1
    with torch.no_grad():
        torch.testing.assert_close(fresh(_images()), trained, rtol=0, atol=0)

    vp.detach(model)  # the statistics are restored with the weights; the mark goes
    original = bn_head_vit().head[0]
    assert torch.equal(bn.running_var, original.running_var) and int(bn.num_batches_tracked) == 0
    assert not hasattr(model.head, "_vp_head") and vp.trainable_buffers(model) == []


def test_methods_without_buffers_leave_only_the_heads():
    assert vp.trainable_buffers(vp.attach(tiny_vit(), "adaptformer", bottleneck=4)) == []
    names = [n for n, _ in vp.trainable_buffers(vp.attach(bn_head_vit(), "vpt", num_tokens=2))]
    assert names == BN_NAMES
