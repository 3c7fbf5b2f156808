"""tools/generate.py: broken or hostile adapter files and bad arguments are one line each, checked up front."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.cli.common import run
from visionpeft.cli.generate import GAP, main, sample
from visionpeft.data.image_grid import image_grid, scale_for


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    lora = tiny_sd_pipeline(tmp / "tok")
    vp.attach(lora, "lora", r=2, targets=["q", "v"])
    vp.save_adapter(lora, tmp / "lora", format="diffusers")
    return tmp


def _generate(pipe_dir, capsys, *args, out=None):
    """(exit code, stderr lines other than the progress bars of diffusers' and transformers' loaders)."""
    out = out if out is not None else pipe_dir / "grid.png"
    code = run(
        main,
        [
            "--model",
            str(pipe_dir / "pipe"),
            "--prompt",
            "x",
            "--seeds",
            "0",
            "--steps",
            "1",
            "--size",
            "16",
            "--out",
            str(out),
            *map(str, args),
        ],
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = (line.replace("\x1b[A", "").strip() for line in re.split(r"[\r\n]+", err))
    return code, [line for line in lines if line and not re.search(r"\d+%\|", line)]


def test_the_exported_lora_still_loads(pipe_dir, capsys, tmp_path):
    code, err = _generate(pipe_dir, capsys, "--adapter", pipe_dir / "lora", out=tmp_path / "g.png")
    assert code == 0 and err == [] and (tmp_path / "g.png").is_file()


def test_corrupt_and_truncated_lora_files_are_named(pipe_dir, capsys, tmp_path):
    good = (pipe_dir / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "pytorch_lora_weights.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for file in (tmp_path / "cut" / "pytorch_lora_weights.safetensors", tmp_path / "junk.safetensors"):
        code, err = _generate(pipe_dir, capsys, "--adapter", file.parent if file.parent.name == "cut" else file)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {file} is not a readable weights file ("), err


def test_a_weights_file_that_does_not_fit_the_pipeline_is_named(pipe_dir, capsys, tmp_path):
    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<a>": torch.zeros(1, 7), "<b>": torch.zeros(1, 7)}, file)  # two tokens, wrong width: not loadable
    code, err = _generate(pipe_dir, capsys, "--adapter", file)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {file} cannot be loaded as a textual inversion into this pipeline: "), err


class _Payload:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_bin_is_refused_without_running_it(pipe_dir, capsys, tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    file = tmp_path / "pytorch_lora_weights.bin"
    file.write_bytes(pickle.dumps({"lora": payload}))
    code, err = _generate(pipe_dir, capsys, "--adapter", file)
    assert err == [f"error: {file} holds objects other than tensors; refusing to unpickle it"] and code == 2
    assert not payload.marker.exists()


def test_arguments_are_checked_before_sampling(pipe_dir, capsys, tmp_path):
    code, err = _generate(pipe_dir, capsys, "--size", "7")
    assert code == 2 and err == ["error: --size 7 is not a multiple of the VAE's factor 2; try --size 6"]
    (tmp_path / "file.txt").write_text("")
    code, err = _generate(pipe_dir, capsys, out=tmp_path / "file.txt" / "grid.png")
    assert (
        code == 2
        and len(err) == 1
        and err[0].startswith(f"error: --out {tmp_path / 'file.txt' / 'grid.png'}: cannot create its folder")
    ), err
    code, err = _generate(pipe_dir, capsys, out=tmp_path)
    assert code == 2 and err == [f"error: --out {tmp_path} is a folder; give a file name such as {tmp_path}/grid.png"]
    code, err = _generate(pipe_dir, capsys, out=tmp_path / "grid.pngg")
    assert code == 2 and err == [f"error: --out {tmp_path}/grid.pngg: '.pngg' is not an image format; use .png or .jpg"]
    for flag in ("--steps", "--size"):
        with pytest.raises(SystemExit) as info:
            main(["--model", "m", "--prompt", "x", flag, "0"])
        assert info.value.code == 2
        assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err


def test_an_unknown_or_absent_device_is_one_line_before_the_pipeline_loads(pipe_dir, capsys, monkeypatch):
    """tools/generate.py --device tpu9 (no such device), cuda on a machine without one, or meta: one line, checked
    before the pipeline loads."""
    loaded = []
    monkeypatch.setattr("visionpeft.backbones.diffusers_loading.load_pipeline", lambda *a: loaded.append(a))
    code, err = _generate(pipe_dir, capsys, "--device", "tpu9")
    assert code == 2 and err == ["error: --device tpu9 is not a device name (cpu, cuda, cuda:1, mps, ...)"]
    if not torch.cuda.is_available():
        code, err = _generate(pipe_dir, capsys, "--device", "cuda")
        assert (
            code == 2 and len(err) == 1 and err[0].startswith("error: --device cuda is not available on this machine")
        )
    code, err = _generate(pipe_dir, capsys, "--device", "meta")
    assert code == 2 and err == ["error: --device meta holds no data; images need a real device (cpu, cuda, ...)"]
    assert loaded == []


def test_all_seeds_of_a_prompt_in_one_call_give_each_seed_s_own_image(pipe_dir):
    # the batched call draws the images one call per seed gives (as generate did before it batched)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir / "pipe")
    pipe.set_progress_bar_config(disable=True)
    options = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 16, "width": 16, "output_type": "np"}
    seeds = [3, 0, 7]
    one_by_one = [pipe("x", generator=torch.Generator().manual_seed(seed), **options).images[0] for seed in seeds]
    batched = sample(pipe, "x", seeds, {**options, "negative_prompt": None}, {}, None)
    in_twos = sample(pipe, "x", seeds, options, {}, 2)
    assert len(batched) == len(in_twos) == 3
    for alone, together, pairs in zip(one_by_one, batched, in_twos):
        torch.testing.assert_close(torch.from_numpy(together), torch.from_numpy(alone), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(pairs), torch.from_numpy(alone), rtol=0, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # the seeds differ


def test_the_grid_enlarges_small_cells_with_gaps_between():
    from PIL import Image

    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    grid = np.asarray(image_grid([[red, blue], [blue]], scale=scale_for(16), gap=GAP, margin=GAP))
    cell = 128
    assert grid.shape == (2 * cell + 3 * GAP, 2 * cell + 3 * GAP, 3)
    assert (grid[GAP : GAP + cell, GAP : GAP + cell] == (255, 0, 0)).all()  # nearest: one flat colour, no blur
    assert (grid[:, GAP + cell : 2 * GAP + cell] == 255).all()  # a white column between the two cells
    assert (grid[2 * GAP + cell :, 2 * GAP + cell :] == 255).all()  # the short row leaves its cell white
    assert scale_for(512) == 1 and scale_for(32) == 4
    with pytest.raises(ValueError, match="share one size"):
        image_grid([[red, Image.new("RGB", (8, 8))]])
