"""tools/finetune_vae_decoder.py (``visionpeft/demo/vae_decoder.py``): a VAE's decoder fine-tuned alone keeps the
encoder bit for bit, so the pipeline's latents (and its U-Net) stay valid; the folder drops into the pipeline with
diffusers alone and into ``generate --vae``; bad input is one line; the shipped ``checkpoints/tiny_sd_vae_ft`` decodes
tiny_sd's latents with truer colours, as its card says."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import finetune_vae_decoder as tool  # noqa: E402
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tiny_models import tiny_sd_pipeline, tiny_vae

from visionpeft.cli.common import run
from visionpeft.data.fill50k import make_fill50k

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny_sd_vae_ft"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae_decoder")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    make_fill50k(tmp / "fill", n=24, size=16, seed=0)
    return tmp


def _targets(setup) -> np.ndarray:
    return np.stack([np.asarray(Image.open(setup / "fill" / "target" / f"{i}.png")) for i in range(24)])


def test_decoder_only_training_keeps_the_latents_and_lowers_the_reconstruction_error(setup, tmp_path):
    from visionpeft.demo.tiny_sd_parts import reconstruction_mse, to_pixels, train_vae

    torch.manual_seed(0)
    vae = tiny_vae()
    reference = copy.deepcopy(vae).eval()
    images = _targets(setup)
    before = reconstruction_mse(vae, to_pixels(images))
    stage = OmegaConf.create({"steps": 60, "lr": 3e-3, "batch_size": 8, "kl_weight": 0.0})
    record = train_vae(vae, images, stage, 0, tmp_path, decoder_only=True)
    for name, tensor in reference.state_dict().items():
        same = torch.equal(tensor, vae.state_dict()[name])
        assert same == name.startswith(("encoder.", "quant_conv.")), name  # the encoder alone is untouched
    with torch.no_grad():
        x = to_pixels(images[:4])
        torch.testing.assert_close(vae.encode(x).latent_dist.mode(), reference.encode(x).latent_dist.mode())
    assert vae.config.scaling_factor == reference.config.scaling_factor  # the latents' scale is the pipeline's
    assert record["decoder_only"] and record["mse_before"] == pytest.approx(before)
    assert record["reconstruction_mse"] < 0.8 * before


def test_the_tool_writes_a_vae_folder_the_pipeline_and_generate_take(setup, tmp_path):
    import generate as generate_tool

    out = tmp_path / "vae_ft"
    argv = ["--pipeline", str(setup / "pipe"), "--images", str(setup / "fill" / "target"), "--out", str(out)]
    assert run(tool.main, [*argv, "--steps", "30", "--batch-size", "8", "--lr", "3e-3"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "training.json",
        "README.md",
        "reconstructions.png",
    }
    record = json.loads((out / "training.json").read_text())
    assert record["decoder_only"] and record["steps"] == 30 and "24 images of" in record["data"]
    assert f"{record['reconstruction_mse']:.4f}" in (out / "README.md").read_text()
    # diffusers alone, in a new process, puts it into the pipeline: the decoder is the saved one, the encoder the
    # pipeline's own
    script = (
        "import sys, torch; from diffusers import AutoencoderKL, StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], vae=AutoencoderKL.from_pretrained(sys.argv[2]))\n"
        "own = AutoencoderKL.from_pretrained(sys.argv[1], subfolder='vae')\n"
        "assert torch.equal(pipe.vae.encoder.conv_in.weight, own.encoder.conv_in.weight)\n"
        "assert not torch.equal(pipe.vae.decoder.conv_out.weight, own.decoder.conv_out.weight)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "image = pipe('red circle', num_inference_steps=2, height=16, width=16).images[0]\n"
        "print('drew', image.size)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(setup / "pipe"), str(out)], capture_output=True, text=True
    )
    assert loaded.returncode == 0 and "drew (16, 16)" in loaded.stdout, loaded.stderr[-2000:]
    grid = ["--model", str(setup / "pipe"), "--prompt", "red circle", "--seeds", "0", "--steps", "2", "--size", "16"]
    assert run(generate_tool.main, [*grid, "--out", str(tmp_path / "own.png")]) == 0
    assert run(generate_tool.main, [*grid, "--vae", str(out), "--out", str(tmp_path / "tuned.png")]) == 0
    own, tuned = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("own", "tuned"))
    assert own.shape == tuned.shape and not np.array_equal(own, tuned)  # the same latents, decoded otherwise


def test_bad_input_is_one_line_and_nothing_written_is_lost(setup, tmp_path, capsys):
    """``tools/finetune_vae_decoder.py`` refuses a non-empty ``--out`` (without ``--overwrite``: the folder's files are
    kept), a pipeline with no record of its data and no ``--images``, a folder that holds no VAE and a device name
    that is none;
    ``generate --vae`` refuses a VAE of other latents (channels, downsampling, scaling factor) and a folder of another
    model class:
    one line each, no image written."""
    import generate as generate_tool
    from diffusers import AutoencoderKL

    pipe = str(setup / "pipe")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    cases = [
        (tool.main, ["--pipeline", pipe, "--images", str(setup / "fill" / "target"), "--out", str(kept)], "not empty"),
        (tool.main, ["--pipeline", pipe, "--out", str(tmp_path / "a")], "has no training.json"),
        (tool.main, ["--pipeline", str(tmp_path), "--out", str(tmp_path / "b")], "neither a pipeline folder"),
        (tool.main, ["--pipeline", pipe, "--out", str(tmp_path / "c"), "--device", "gpu0"], "not a device name"),
    ]
    wide = AutoencoderKL(
        latent_channels=8,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    wide.save_pretrained(tmp_path / "wide")
    rescaled = tiny_vae()
    rescaled.register_to_config(scaling_factor=1.0)
    rescaled.save_pretrained(tmp_path / "rescaled")
    grid = ["--model", pipe, "--prompt", "x", "--seeds", "0", "--steps", "1", "--size", "16"]
    cases += [
        (generate_tool.main, [*grid, "--vae", str(tmp_path / "wide"), "--out", str(tmp_path / "g.png")], "8 channels"),
        (generate_tool.main, [*grid, "--vae", str(tmp_path / "rescaled"), "--out", str(tmp_path / "g.png")], "scale"),
        (
            generate_tool.main,
            [*grid, "--vae", str(setup / "pipe" / "unet"), "--out", str(tmp_path / "g.png")],
            "holds a UNet2DConditionModel, not an AutoencoderKL",
        ),
    ]
    for main, argv, message in cases:
        capsys.readouterr()
        assert run(main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert (kept / "notes.txt").read_text() == "mine" and not (tmp_path / "g.png").exists()


def test_the_shipped_decoder_shares_tiny_sd_s_latents_and_draws_its_colours_truer():
    # the encoder of checkpoints/tiny_sd_vae_ft is tiny_sd's, bit for bit; its card's fill IoU of reconstructed
    # held-out fill50k targets is what the decoder scores here, far above tiny_sd's own decoder
    from diffusers import AutoencoderKL

    from visionpeft.demo.vae_decoder import fill_colour_fidelity, pipeline_vae

    own = AutoencoderKL.from_pretrained(ROOT / "checkpoints" / "tiny_sd", subfolder="vae", torch_dtype=torch.float32)
    tuned = pipeline_vae(SHIPPED)
    for name, tensor in own.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tensor, tuned.state_dict()[name]), name
    assert tuned.config.scaling_factor == own.config.scaling_factor
    record = json.loads((SHIPPED / "training.json").read_text())
    assert record["decoder_only"] and record["base"] == "checkpoints/tiny_sd"
    assert fill_colour_fidelity(tuned) == pytest.approx(record["after"]["fill_iou"], abs=1e-6)
    assert fill_colour_fidelity(own) == pytest.approx(record["before"]["fill_iou"], abs=1e-6)
    assert record["after"]["fill_iou"] > 4 * record["before"]["fill_iou"]
    assert record["after"]["held_out_mse"] < 0.5 * record["before"]["held_out_mse"]
    card = (SHIPPED / "README.md").read_text()
    assert f"{record['after']['fill_iou']:.3f}" in card and record["command"] in card


def test_a_trainer_s_model_vae_gets_the_same_latent_checks(setup, tmp_path):
    # the trainers' model.vae, the saved-run loader and generate --vae share one replace_vae
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones.diffusers_loading import replace_vae
    from visionpeft.errors import ConfigError

    pipe = StableDiffusionPipeline.from_pretrained(setup / "pipe")
    rescaled = tiny_vae()
    rescaled.register_to_config(scaling_factor=1.0)
    rescaled.save_pretrained(tmp_path / "rescaled")
    with pytest.raises(ConfigError, match=r"^model\.vae .*rescaled: its latent scale"):
        replace_vae(pipe, tmp_path / "rescaled", "model.vae")
    before = pipe.vae
    torch.manual_seed(1)
    other = tiny_vae()  # the same latents, other weights
    other.save_pretrained(tmp_path / "same")
    replace_vae(pipe, tmp_path / "same", "model.vae")
    assert pipe.vae is not before and pipe.vae.dtype == torch.float32
    assert torch.equal(pipe.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
