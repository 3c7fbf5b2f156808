"""A control run with several controls, each on a condition column of its own (``data.conditioning_columns``, in
the method list's order): the data gives one image per column, each control reads its own in training and
validation, the run saves both; a count of columns that fits no control list is one line before anything loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _run_args import train_args
from PIL import Image
from tiny_models import perturb, tiny_sd_pipeline

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.cli.common import run  # noqa: E402
from visionpeft.data.control_pairs import ControlPairs, condition_transform
from visionpeft.data.fill50k import make_fill50k
from visionpeft.errors import DataError

TWO = "[{name: controlnet, hint_channels: [16, 32]}, {name: t2i_adapter, downscale_factor: 2}]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pipeline folder and fill50k pairs with a second condition column, ``shade``: the target in grey."""
    tmp = tmp_path_factory.mktemp("control_columns")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    make_fill50k(tmp / "fill", n=6, size=16, seed=0)
    (tmp / "fill" / "shade").mkdir()
    lines = [json.loads(line) for line in (tmp / "fill" / "metadata.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        Image.open(tmp / "fill" / line["image"]).convert("L").convert("RGB").save(tmp / "fill" / "shade" / f"{i}.png")
        line["shade"] = f"shade/{i}.png"
    (tmp / "fill" / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp


def test_each_column_gives_its_own_condition_image(setup):
    pairs = ControlPairs(setup / "fill", 16, columns=["conditioning_image", "shade"])
    outline, shade = pairs[2]["conditioning_pixel_values"]
    transform = condition_transform(16)
    torch.testing.assert_close(outline, transform(Image.open(setup / "fill" / "source" / "2.png").convert("RGB")))
    torch.testing.assert_close(shade, transform(Image.open(setup / "fill" / "shade" / "2.png").convert("RGB")))
    single = ControlPairs(setup / "fill", 16)[2]["conditioning_pixel_values"]  # no columns: the one tensor, as before
    torch.testing.assert_close(single, outline)
    with pytest.raises(DataError, match=r"metadata.jsonl line 1 has no depth$"):
        ControlPairs(setup / "fill", 16, columns=["conditioning_image", "depth"])


def test_a_condition_column_of_another_size_is_one_line(setup, tmp_path):
    folder = tmp_path / "fill"
    make_fill50k(folder, n=1, size=16, seed=0)
    Image.new("RGB", (8, 8)).save(folder / "small.png")
    line = json.loads((folder / "metadata.jsonl").read_text())
    (folder / "metadata.jsonl").write_text(json.dumps({**line, "shade": "small.png"}) + "\n")
    with pytest.raises(DataError, match=r"^condition image .*small.png is 8x8 pixels but its target .* is 16x16"):
        ControlPairs(folder, 16, columns=["conditioning_image", "shade"])


def test_the_denoiser_hands_each_control_its_column(setup, monkeypatch):
    """The training step's ``vp.conditioning`` gets {controlnet: first column, controlnet_1: second} (keys of the
    attached controls in attach order), and its loss is the one computed with that dict by hand."""
    import visionpeft.trainers.control as control
    from visionpeft.backbones import pipeline_modules
    from visionpeft.trainers.diffusion import diffusion_loss

    pipe = tiny_sd_pipeline(setup / "tok")
    perturb(vp.attach(pipe, [("controlnet", {"hint_channels": [16, 32]})] * 2), std=0.3)
    denoiser = control.ControlDenoiser(pipeline_modules(pipe), pipe)
    pairs = ControlPairs(setup / "fill", 16, columns=["conditioning_image", "shade"])
    batch = torch.utils.data.default_collate([pairs[0], pairs[1]])
    given = []
    real = control.conditioning

    def recording(model, **inputs):
        given.append(inputs["control_image"])
        return real(model, **inputs)

    monkeypatch.setattr(control, "conditioning", recording)
    torch.manual_seed(0)
    loss = denoiser(batch)
    outline, shade = batch["conditioning_pixel_values"]
    assert list(given[0]) == ["controlnet", "controlnet_1"]
    assert given[0]["controlnet"] is outline and given[0]["controlnet_1"] is shade
    torch.manual_seed(0)
    with vp.conditioning(pipe, control_image={"controlnet": outline, "controlnet_1": shade}):
        expected = diffusion_loss(denoiser.parts, batch["pixel_values"], list(batch["prompt"]))
    torch.manual_seed(0)
    with vp.conditioning(pipe, control_image={"controlnet": shade, "controlnet_1": outline}):
        swapped = diffusion_loss(denoiser.parts, batch["pixel_values"], list(batch["prompt"]))
    assert loss.item() == expected.item() and abs(loss.item() - swapped.item()) > 1e-6


def _train(setup, name, *overrides):
    args = train_args(
        "control/controlnet_sd15_fill",
        setup / "runs",
        name,
        f"model.name={setup / 'pipe'}",
        f"data.root={setup / 'fill'}",
        "optim.steps=4",
        "optim.lr=1e-3",
        "train.eval_every=4",
        "train.validation_steps=2",
        "train.validation_pairs=2",
        f"method={TWO}",
        *overrides,
    )
    return run(tool.main, args)


def test_a_run_with_two_controls_on_two_columns_trains_and_saves_both(setup):
    from diffusers import ControlNetModel, T2IAdapter

    run_dir = _two_controls_run(setup)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "train/loss" in r]) == 4
    assert any(key.endswith("controlnet/residual_norm/mid") for r in records for key in r)
    grid = Image.open(run_dir / "validation" / "001.png")
    assert grid.size == (4 * 16, 2 * 16)  # outline | shade | sample | target, one row per validation pair
    assert ControlNetModel.from_pretrained(run_dir / "controlnet").controlnet_down_blocks[0].weight.abs().sum() > 0
    assert T2IAdapter.from_pretrained(run_dir / "t2i_adapter").config.downscale_factor == 2
    pipe = vp.load_adapter(tiny_sd_pipeline(setup / "tok"), run_dir / "adapter")
    assert [m.key for m in methods_of(pipe)] == ["controlnet", "t2i_adapter"]


def test_more_condition_columns_than_controls_is_one_line_before_the_run(setup, capsys):
    three = "data.conditioning_columns=[conditioning_image, shade, shade]"
    assert _train(setup, "three", three) == 2
    assert capsys.readouterr().err.strip() == (
        "error: data.conditioning_columns names 3 condition columns for 2 controls (controlnet, t2i_adapter): give "
        "one column per control, in the method list's order, or one for all"
    )
    assert _train(setup, "canny", "data.conditioning_columns=[shade]", "data.conditioning=canny") == 2
    assert capsys.readouterr().err.strip() == (
        "error: data.conditioning_columns reads condition images from the data; data.conditioning=canny computes one "
        "from each image: use one of the two"
    )
    assert not (setup / "runs" / "three").exists() and not (setup / "runs" / "canny").exists()


def test_one_column_goes_to_every_control(setup):
    pairs = ControlPairs(setup / "fill", 16, columns=["shade"])
    shade = np.asarray(Image.open(setup / "fill" / "shade" / "0.png").convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(pairs[0]["conditioning_pixel_values"], torch.from_numpy(shade).permute(2, 0, 1))


def _two_controls_run(setup):
    """The run of two controls on two columns (trained once per test worker)."""
    run_dir = setup / "runs" / "two"
    if not (run_dir / "adapter").exists():
        assert _train(setup, "two", "data.conditioning_columns=[conditioning_image, shade]") == 0
    return run_dir


def test_predict_gives_each_control_its_own_image_in_the_config_s_order(setup, tmp_path, capsys):
    """``a.png,b.png`` sends a.png to the first control (the ControlNet) and b.png to the second (the T2I-Adapter),
    as the trainer's own sampler does with the list; swapped, the image differs; one image goes to both."""
    from visionpeft.cli.predict import main as predict_main
    from visionpeft.trainers.control_eval import _sampler
    from visionpeft.trainers.saved_run import adapter_dir, load_run

    run_dir = _two_controls_run(setup)
    outline, shade = tmp_path / "outline.png", tmp_path / "shade.png"
    Image.open(setup / "fill" / "source" / "0.png").save(outline)
    Image.open(setup / "fill" / "shade" / "0.png").save(shade)
    out = tmp_path / "out"
    inputs = [f"{outline},{shade}", f"{shade},{outline}", str(shade)]
    args = [str(run_dir), *inputs, "--prompt", "red circle", "--seeds", "3", "--out", str(out), "--cpu"]
    assert run(predict_main, args) == 0
    drawn = {name: np.asarray(Image.open(out / f"{name}_seed3.png")) for name in ("outline+shade", "shade+outline")}
    assert np.abs(drawn["outline+shade"].astype(int) - drawn["shade+outline"]).max() > 0
    assert (out / "shade_seed3.png").is_file()
    config, _ = load_run(run_dir, "predict")
    validation, accelerator = _sampler(config, adapter_dir(run_dir, None), None, True, False)
    transform = condition_transform(16)
    pair = [transform(Image.open(path).convert("RGB")) for path in (outline, shade)]
    expected = np.asarray(validation.sample(accelerator, pair, "red circle", 3))
    np.testing.assert_array_equal(drawn["outline+shade"], expected)

    capsys.readouterr()
    bad = [str(run_dir), f"{outline},{shade},{shade}", "--prompt", "x", "--out", str(tmp_path / "bad"), "--cpu"]
    assert run(predict_main, bad) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: input '{outline},{shade},{shade}' names 3 images for the run's 2 control(s) (controlnet, "
        "t2i_adapter): give one image for every control, or one per control joined by commas"
    )
    assert not (tmp_path / "bad").exists()
