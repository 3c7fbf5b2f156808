"""tools/train.py (task control) on a tiny Stable Diffusion pipeline and generated fill50k pairs: the run trains,
validates with grids and the fill IoU, and leaves a controlnet/ folder diffusers loads; bad data is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _classify_utils import ROOT
from _run_args import train_args
from tiny_models import tiny_sd_pipeline

from visionpeft.cli.common import run  # noqa: E402
from visionpeft.data.fill50k import make_fill50k


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    make_fill50k(tmp / "fill", n=6, size=16, seed=0)
    return tmp


def _train(setup, config, name, *overrides):
    args = train_args(
        f"control/{config}",
        setup / "runs",
        name,
        f"model.name={setup / 'pipe'}",
        f"data.root={setup / 'fill'}",
        "optim.steps=6",
        "optim.lr=1e-3",
        "train.eval_every=3",
        "train.validation_steps=2",
        "method.hint_channels=[16, 32]",
        *overrides,
    )
    return run(tool.main, args)


@pytest.mark.parametrize("config", ["controlnet_sd15_fill", "controlnet_lora_sd15_fill"])
def test_a_control_run_validates_and_leaves_a_controlnet_diffusers_loads(setup, config, capsys):
    from diffusers import ControlNetModel

    assert _train(setup, config, config) == 0
    run_dir = setup / "runs" / config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "train/loss" in r]) == 6
    assert [r["step"] for r in records if "eval/fill_iou" in r] == [3, 6]
    last_iou = [r["eval/fill_iou"] for r in records if "eval/fill_iou" in r][-1]
    # the end-of-run summary prints the task's score, not only metrics.jsonl
    assert f"score: fill_iou {last_iou:.4g} (last evaluation, step 6;" in capsys.readouterr().out
    norms = [r for r in records if any(k.endswith("residual_norm/mid") for k in r)]
    assert len(norms) == 2 and all(v > 0 for r in norms for k, v in r.items() if "residual_norm" in k)
    assert sorted(p.name for p in (run_dir / "validation").glob("*.png")) == ["001.png", "002.png"]
    loaded = ControlNetModel.from_pretrained(run_dir / "controlnet")
    assert sum(p.numel() for p in loaded.parameters()) > 0
    zero_conv = loaded.controlnet_down_blocks[0].weight
    assert zero_conv.abs().sum() > 0  # trained away from zero, and written as such
    assert not torch.isnan(zero_conv).any()


def test_bad_control_data_is_one_line_before_training(setup, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"image": "a.png", "conditioning_image": "b.png"}\n')
    assert _train(setup, "controlnet_sd15_fill", "bad", f"data.root={bad}") == 2
    assert capsys.readouterr().err.strip() == f"error: {bad / 'metadata.jsonl'} line 1 has no text"
    (bad / "metadata.jsonl").write_text('{"image": "a.png", "conditioning_image": "b.png", "text": "x"}\n')
    assert _train(setup, "controlnet_sd15_fill", "bad", f"data.root={bad}") == 2
    assert capsys.readouterr().err.strip() == f"error: {bad / 'metadata.jsonl'} line 1: {bad / 'a.png'} does not exist"
    assert not (setup / "runs" / "bad").exists()


def test_a_control_method_in_a_classification_run_is_refused(capsys):
    args = [str(ROOT / "configs" / "demo" / "vpt_tiny_digits.yaml"), "method=controlnet", "--dry-run"]
    assert run(tool.main, args) == 2
    assert capsys.readouterr().err.strip() == (
        "error: method 'controlnet' needs a per-call control_image, which the classification task does not provide"
    )


def test_cubic_timesteps_lean_to_the_noisy_end_and_the_t2i_recipe_uses_them(setup):
    from visionpeft.config import load_config
    from visionpeft.trainers.diffusion import sample_timesteps

    uniform = sample_timesteps(20000, 1000, "uniform", torch.Generator().manual_seed(0)).float()
    cubic = sample_timesteps(20000, 1000, "cubic", torch.Generator().manual_seed(0)).float()
    assert abs(uniform.mean().item() - 499.5) < 10 and abs(cubic.mean().item() - 749.5) < 10  # E[1 - u^3] = 3/4
    assert cubic.min() >= 0 and cubic.max() <= 999
    assert load_config(ROOT / "configs" / "control" / "t2i_adapter_sd15_fill.yaml").train.timesteps == "cubic"


def test_a_t2i_adapter_run_trains_with_cubic_timesteps(setup):
    args = train_args(
        "control/t2i_adapter_sd15_fill",
        setup / "runs",
        "t2i",
        f"model.name={setup / 'pipe'}",
        f"data.root={setup / 'fill'}",
        "optim.steps=4",
        "optim.lr=1e-3",
        "train.eval_every=4",
        "train.validation_steps=2",
        "method={name: t2i_adapter, downscale_factor: 2}",
    )  # the tiny pipeline's VAE downsamples by 2
    assert run(tool.main, args) == 0
    lines = (setup / "runs" / "t2i" / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if "train/loss" in x]) == 4 and any("eval/fill_iou" in x for x in lines)
    from diffusers import T2IAdapter  # the run's t2i_adapter/ is what diffusers' adapter pipeline loads

    assert T2IAdapter.from_pretrained(setup / "runs" / "t2i" / "t2i_adapter").config.downscale_factor == 2


def test_canny_conditions_from_captioned_images(setup, tmp_path):
    """data.conditioning=canny on a folder of images with .txt captions: edges made on the fly (white on black,
    fixed thresholds for validation, drawn ones in training); a missing caption is one line."""
    from PIL import Image

    from visionpeft.data.control_pairs import ControlPairs
    from visionpeft.errors import DataError

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):  # a dark square on a light ground: edges any threshold finds
        image = Image.new("RGB", (16, 16), (230, 230, 230))
        image.paste((20, 20, 20), (4 + i, 4, 12, 12))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a dark square")
    shown = ControlPairs(folder, 16, condition="canny", train=False)
    item = shown[0]
    edges = item["conditioning_pixel_values"]
    assert edges.shape == (3, 16, 16) and set(edges.unique().tolist()) <= {0.0, 1.0} and edges.sum() > 0
    torch.testing.assert_close(shown[0]["conditioning_pixel_values"], edges)  # validation: the same every time
    (folder / "0.txt").unlink()
    with pytest.raises(DataError, match=r"0.png has no caption file 0.txt"):
        ControlPairs(folder, 16, condition="canny")


def test_generate_draws_with_the_run_s_controlnet_folder_or_its_adapter(setup, tmp_path, capsys):
    """tools/generate.py --control RUN/controlnet --control-image: the diffusers folder and the visionpeft adapter of
    the same run draw the same grid; a control without its image is one line."""
    import generate as generate_tool
    from PIL import Image

    if not (setup / "runs" / "controlnet_sd15_fill" / "controlnet").exists():
        assert _train(setup, "controlnet_sd15_fill", "controlnet_sd15_fill") == 0
    run_dir = setup / "runs" / "controlnet_sd15_fill"
    base = [
        "--model",
        str(setup / "pipe"),
        "--prompt",
        "red circle with blue background",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--size",
        "16",
        "--control-image",
        str(setup / "fill" / "source" / "0.png"),
    ]
    assert (
        run(generate_tool.main, [*base, "--control", str(run_dir / "controlnet"), "--out", str(tmp_path / "a.png")])
        == 0
    )
    assert (
        run(generate_tool.main, [*base, "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "b.png")]) == 0
    )
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "b.png"))
    np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    args = [
        "--model",
        str(setup / "pipe"),
        "--prompt",
        "x",
        "--adapter",
        str(run_dir / "adapter"),
        "--out",
        str(tmp_path / "c.png"),
    ]
    assert run(generate_tool.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the loaded adapters read control_image (controlnet): give --control-image"
    )
