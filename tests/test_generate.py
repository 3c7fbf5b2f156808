"""tools/generate.py: a prompt x seed grid with stacked adapters; clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.cli.generate import GAP
from visionpeft.data.image_grid import scale_for

TOOL = Path(__file__).resolve().parents[1] / "tools" / "generate.py"


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_grid_with_textual_inversion_and_lora(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "pipe")
    ti = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(ti, "textual_inversion", token="<cat>", initializer="cat")
    vp.save_adapter(ti, tmp_path / "ti")  # visionpeft format
    lora = tiny_sd_pipeline(tmp_path / "tok")
    vp.attach(lora, "lora", r=2, targets=["q", "v"])
    with torch.no_grad():
        for _, p in vp.trainable_parameters(lora):
            p.add_(0.1)
    vp.save_adapter(lora, tmp_path / "lora", format="diffusers")
    result = _run(
        "--model",
        tmp_path / "pipe",
        "--adapter",
        tmp_path / "ti",
        "--adapter",
        tmp_path / "lora",
        "--prompt",
        "a photo of <cat>",
        "--prompt",
        "<cat> on a beach",
        "--seeds",
        0,
        1,
        2,
        "--steps",
        2,
        "--size",
        16,
        "--out",
        tmp_path / "grid.png",
    )
    assert result.returncode == 0, result.stderr
    assert "adapter" in result.stdout and "lora" in result.stdout
    cell = 16 * scale_for(16)  # 16 px samples drawn at 128 px, white lines between them
    assert cell == 128 and Image.open(tmp_path / "grid.png").size == (3 * cell + 4 * GAP, 2 * cell + 3 * GAP)


@pytest.mark.slow
def test_generate_bad_input_is_one_line(tmp_path):
    result = _run("--model", tmp_path / "nowhere", "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: pipeline folder {tmp_path / 'nowhere'} does not exist"]
    (tmp_path / "empty").mkdir()
    result = _run("--model", tmp_path / "empty", "--prompt", "x")
    assert result.returncode == 2
    expected = f"error: {tmp_path / 'empty'} is not a diffusers pipeline folder (no model_index.json)"
    assert result.stderr.strip().splitlines() == [expected]
