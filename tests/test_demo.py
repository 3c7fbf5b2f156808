"""The embedded offline demo: the committed tiny ViT, the mini tasks, and the README's main command."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from _classify_utils import ROOT

from visionpeft.config import load_config
from visionpeft.data.fractal import FractalDB
from visionpeft.data.mini import digits, faces, textures
from visionpeft.trainers.classification import run

CHECKPOINT = ROOT / "checkpoints" / "tiny_vit_fractal.safetensors"
CARD = ROOT / "checkpoints" / "tiny_vit_fractal.md"


def test_committed_checkpoint_matches_its_model_card():
    digest = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    assert re.search(r"sha256 `([0-9a-f]{64})`", CARD.read_text()).group(1) == digest
    assert CHECKPOINT.stat().st_size < 8 * 2**20


@pytest.mark.parametrize("builder", [digits, textures, faces])
def test_mini_task_splits_are_fixed_and_disjoint(builder):
    splits = {s: builder(s) for s in ("train", "val", "test")}
    again = builder("train")
    assert np.array_equal(splits["train"].images, again.images)
    keys = {s: {d.images[i].tobytes() for i in range(len(d))} for s, d in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert set(splits["test"].targets) == set(range(len(splits["train"].classes)))


def test_fractals_are_deterministic_and_distinct():
    a, b = FractalDB(categories=3, instances=2), FractalDB(categories=3, instances=2)
    assert np.array_equal(np.asarray(a[4][0]), np.asarray(b[4][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[2][0]))


def _demo(tmp_path, name, *overrides):
    config = load_config(ROOT / "configs" / "demo" / "vpt_tiny_digits.yaml",
                         [f"model.checkpoint={CHECKPOINT}", f"train.output_dir={tmp_path}", f"train.run_name={name}",
                          *overrides])  # fmt: skip
    return run(config, tmp_path / name)["test"]["top1"]


def test_demo_beats_chance_and_pretraining_beats_scratch(tmp_path):
    short = ["optim.epochs=2", "data.name=textures"]
    pretrained = _demo(tmp_path, "pretrained", *short, "method=full", "optim.lr=0.0005")
    scratch = _demo(tmp_path, "scratch", *short, "method=full", "optim.lr=0.0005", "model.checkpoint=null",
                    "model.pretrained=false")  # fmt: skip
    assert pretrained > 2 / 6  # six textures: chance is 1/6
    assert pretrained > scratch


def test_readme_main_command_on_a_short_schedule(tmp_path):
    assert _demo(tmp_path, "vpt", "optim.epochs=2") > 0.3  # ten digits: chance is 0.1
