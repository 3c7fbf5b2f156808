"""tools/pretrain.py end to end on a miniature schedule: weights, model card, and the weights feed the demo."""

from __future__ import annotations

import hashlib
import re

import pretrain  # noqa: E402
import torch
from _demo_utils import PRETRAIN_CONFIG, ROOT
from safetensors.torch import load_file

from visionpeft.config import load_config
from visionpeft.trainers.classification import build_experiment


def test_pretrain_writes_fp16_weights_and_a_truthful_card_that_a_demo_config_loads(tmp_path):
    overrides = [
        "data.options={categories: 4, instances: 8, size: 32, seed: 0, val_instances: 2}",
        "model.kwargs.depth=1",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "data.batch_size=16",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=mini_vit",
    ]
    assert pretrain.main([str(PRETRAIN_CONFIG), *overrides, "--out", str(tmp_path)]) == 0
    weights, card = tmp_path / "mini_vit.safetensors", (tmp_path / "mini_vit.md").read_text()
    assert re.search(r"sha256 `([0-9a-f]{64})`", card).group(1) == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "4 FractalDB-style IFS categories x 8 instances" in card and "model.kwargs.depth=1" in card
    state = load_file(weights)
    assert state["head.weight"].shape[0] == 4 and all(t.dtype == torch.float16 for t in state.values())
    demo = load_config(
        ROOT / "configs" / "demo" / "vpt_tiny_digits.yaml", [f"model.checkpoint={weights}", "model.kwargs.depth=1"]
    )
    model = build_experiment(demo).model  # ten-way head replaces the fractal head; the blocks load
    assert model.head.out_features == 10
    assert (model.blocks[0].attn.qkv.weight.half() == state["blocks.0.attn.qkv.weight"]).all()
