"""tools/generate.py with several controls, each with its own condition image: ``--control A --control-image a.png
--control B --control-image b.png`` pairs them in order; more images than controls is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.cli.common import run
from visionpeft.cli.generate import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_controls")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    controls = {
        "cn": vp.attach(tiny_sd_pipeline(tmp / "tok"), "controlnet", hint_channels=[16, 32]),
        "t2i": vp.attach(tiny_sd_pipeline(tmp / "tok"), "t2i_adapter", downscale_factor=2),
        "lora": vp.attach(tiny_sd_pipeline(tmp / "tok"), "lora", r=2, targets=["q", "v"]),
    }
    with torch.no_grad():
        for name, model in controls.items():
            for _, p in vp.trainable_parameters(model):
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            vp.save_adapter(model, tmp / name, format="diffusers")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / f"{name}.png")
    return tmp


def _generate(setup, capsys, *args, out="grid.png"):
    base = ["--model", str(setup / "pipe"), "--prompt", "x", "--seeds", "0", "--steps", "2", "--device", "cpu"]
    code = run(main, [*base, "--out", str(setup / out), *map(str, args)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def _grid(setup, name):
    return np.asarray(Image.open(setup / name), dtype=np.int16)


@pytest.mark.slow
def test_each_control_draws_with_its_own_image_in_the_order_given(setup, capsys):
    cn, t2i = (setup / "cn" / "controlnet", setup / "t2i" / "t2i_adapter")
    a, b = setup / "a.png", setup / "b.png"
    assert (
        _generate(setup, capsys, "--control", cn, "--control-image", a, "--control", t2i, "--control-image", b)[0] == 0
    )
    reordered = ["--control", t2i, "--control-image", b, "--control", cn, "--control-image", a]
    assert _generate(setup, capsys, *reordered, out="reordered.png")[0] == 0
    swapped = ["--control", cn, "--control-image", b, "--control", t2i, "--control-image", a]
    assert _generate(setup, capsys, *swapped, out="swapped.png")[0] == 0
    np.testing.assert_array_equal(_grid(setup, "grid.png"), _grid(setup, "reordered.png"))  # the pairs, not the order
    assert np.abs(_grid(setup, "grid.png") - _grid(setup, "swapped.png")).max() > 0


def test_more_condition_images_than_controls_is_one_line_before_any_model_loads(tmp_path, capsys):
    images = [a for name in ("a", "b", "c") for a in ("--control-image", tmp_path / f"{name}.png")]
    args = ["--model", tmp_path / "no_pipe", "--prompt", "x", "--out", tmp_path / "grid.png", *images]
    code = run(main, [*map(str, args), "--control", str(tmp_path / "A"), "--control", str(tmp_path / "B")])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "error: 3 --control-image for 2 --control: give one image per control, in the --control order, or one for all"
    )


@pytest.mark.slow
def test_more_condition_images_than_loaded_controls_is_one_line(setup, capsys):
    """Two images for a LoRA and one T2I-Adapter: counted once the folders have shown what they are."""
    images = ["--control-image", setup / "a.png", "--control-image", setup / "b.png"]
    code, lines = _generate(
        setup, capsys, "--adapter", setup / "lora", "--control", setup / "t2i" / "t2i_adapter", *images
    )
    assert code == 2 and lines[-1] == (
        "error: 2 --control-image for 1 loaded controls (t2i_adapter): give one image per control, in the --control "
        "order, or one for all"
    )
