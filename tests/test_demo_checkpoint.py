"""The committed tiny ViT: its file is the one its model card describes, and it does what the card says."""

from __future__ import annotations

import hashlib

import pytest
import torch
from _demo_utils import CARD, CHECKPOINT, PRETRAIN_CONFIG, card_field

from visionpeft.config import load_config
from visionpeft.trainers.classification import build_experiment


def test_committed_checkpoint_matches_its_model_card():
    assert hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() == card_field(r"sha256 `([0-9a-f]{64})`")
    assert CHECKPOINT.stat().st_size < 8 * 2**20
    assert "python tools/pretrain.py configs/pretrain/tiny_vit_fractal.yaml" in CARD.read_text()


@pytest.mark.slow
@torch.no_grad()
def test_checkpoint_reproduces_the_accuracy_on_its_own_task_stated_in_the_card():
    config = load_config(PRETRAIN_CONFIG, [f"model.checkpoint={CHECKPOINT}"])
    exp = build_experiment(config)
    model = exp.model.eval()
    loader = torch.utils.data.DataLoader(exp.val, batch_size=250)
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    stated = float(card_field(r"([0-9.]+)%\s*\n- \*\*Training time"))
    assert abs(100 * correct / len(exp.val) - stated) <= 0.5  # fp16 weights vs the fp32 model that was scored
