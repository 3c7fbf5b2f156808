"""A merged re-parameterisable method leaves exactly the plain model behind: the same modules, no hook, and every
tensor with the plain model's shape, stride and dtype, so merged inference runs the plain model's kernels
(docs/benchmarks.md, the [zoo] merged-inference table)."""

from __future__ import annotations

import pytest
from tiny_models import tiny_vit

import visionpeft as vp


def structure(model):
    modules = [
        (name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()
    ]
    tensors = [(name, tuple(t.shape), t.stride(), t.dtype) for name, t in model.state_dict().items()]
    return modules, tensors


@pytest.mark.parametrize(
    "method, options",
    [("ssf", {}), ("fact", {"variant": "tt", "dim": 4}), ("fact", {"variant": "tk", "dim": 4}), ("repadapter", {})],
)
def test_merged_model_is_the_plain_model(method, options):
    plain = structure(tiny_vit())
    merged = vp.merge(vp.attach(tiny_vit(), method, **options))
    assert structure(merged) == plain
