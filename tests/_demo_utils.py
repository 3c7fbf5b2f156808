"""Helpers for the embedded-demo tests: the committed tiny ViT, its model card, and short demo runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "tiny_vit_fractal.safetensors"
CARD = ROOT / "checkpoints" / "tiny_vit_fractal.md"
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "tiny_vit_fractal.yaml"
MAIN_CONFIG = ROOT / "configs" / "demo" / "vpt_tiny_digits.yaml"


def card_field(pattern: str) -> str:
    """The first group of ``pattern`` in the model card (fails loudly when the card lost the field)."""
    match = re.search(pattern, CARD.read_text())
    assert match, f"model card has no field matching {pattern!r}"
    return match.group(1)


def train_demo(tmp_path: Path, name: str, *overrides: str, config: Path = MAIN_CONFIG) -> float:
    """Trains a demo config (output under ``tmp_path``) and returns its test top-1."""
    from visionpeft.config import load_config
    from visionpeft.trainers.classification import run

    cfg = load_config(
        config,
        [f"model.checkpoint={CHECKPOINT}", f"train.output_dir={tmp_path}", f"train.run_name={name}", *overrides],
    )
    return run(cfg, tmp_path / name)["test"]["top1"]
