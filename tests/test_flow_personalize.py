"""tools/train.py's Flux and SD3 recipes on tiny random-weight pipelines: each trains through the personalization
trainer, the saved files load through diffusers' own loaders (in a new process) with visionpeft's outputs, and bad
input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import train as tool  # noqa: E402
from _run_args import train_args
from PIL import Image
from safetensors.torch import load_file
from tiny_flow_models import sample_flow_images, tiny_flux_pipeline, tiny_sd3_pipeline

import visionpeft as vp
from visionpeft.backbones.diffusers_loading import load_pipeline
from visionpeft.cli import generate
from visionpeft.cli.common import run  # noqa: E402

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow_personalize")
    tiny_flux_pipeline(tmp / "tok").save_pretrained(tmp / "flux")
    tiny_flux_pipeline(tmp / "tok", guidance=False).save_pretrained(tmp / "schnell")
    tiny_sd3_pipeline(tmp / "tok").save_pretrained(tmp / "sd3")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(2):
        array = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
        array[6:14, 6:14, 0] = 230
        Image.fromarray(array).save(tmp / "images" / f"{i}.png")
    return tmp


def _args(tmp, config_name, model, run_name, *overrides):
    return train_args(
        f"personalize/{config_name}",
        tmp / "runs",
        run_name,
        f"model.name={tmp / model}",
        f"data.images={tmp / 'images'}",
        "data.repeats=2",
        "optim.max_sequence_length=16",
        "train.validation_prompts=[]",
        *overrides,
    )


def _train(tmp, config_name, model, run_name, *overrides):
    assert run(tool.main, _args(tmp, config_name, model, run_name, *overrides)) == 0
    run_dir = tmp / "runs" / run_name
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 3 and all(np.isfinite(losses))
    return run_dir


LOAD_AND_SAMPLE = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.load_lora_weights(sys.argv[2])
pipe.set_progress_bar_config(disable=True)
images = pipe("a photo of sks dog", num_inference_steps=2, height=16, width=16, output_type="np",
              max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
np.save(sys.argv[3], images)
"""


def _theirs(tmp, model, lora_path, out):
    """Samples of the base pipeline after diffusers' own ``load_lora_weights`` (in a new process)."""
    args = [sys.executable, "-c", LOAD_AND_SAMPLE, str(tmp / model), str(lora_path), str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return np.load(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config_name, model, groups",
    [
        ("dreambooth_lora_flux", "flux", {"transformer", "text_encoder"}),
        ("dreambooth_lora_sd3", "sd3", {"transformer", "text_encoder", "text_encoder_2"}),
    ],
)
def test_dreambooth_lora_flow_runs_load_in_diffusers_in_a_new_process(setup, capsys, config_name, model, groups):
    run_dir = _train(setup, config_name, model, f"lora_{model}", "train_text_encoder=true", "optim.lr=1e-2")
    assert f"wrote {run_dir / 'diffusers'}" in capsys.readouterr().out
    ours = vp.load_adapter(load_pipeline(str(setup / model)), run_dir / "adapter")
    expected = sample_flow_images(ours, PROMPT)
    assert np.abs(expected - sample_flow_images(load_pipeline(str(setup / model)), PROMPT)).max() > 1e-4  # trained
    keys = load_file(run_dir / "diffusers" / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == groups
    theirs = _theirs(setup, model, run_dir / "diffusers", setup / f"{model}.npy")
    assert np.abs(theirs - expected).max() < 1e-5
    card = (run_dir / "README.md").read_text()
    assert str(setup / model) in card
    # tools/generate.py on the run's folder (the pipeline's own guidance scale)
    out = setup / f"grid_{model}.png"
    args = ["--model", str(setup / model), "--adapter", str(run_dir), "--prompt", PROMPT, "--seeds", "0", "1"]
    assert run(generate.main, [*args, "--steps", "2", "--size", "16", "--device", "cpu", "--out", str(out)]) == 0
    assert f"wrote {out} (1 prompts x 2 seeds" in capsys.readouterr().out and Image.open(out).size[0] > 2 * 16


@pytest.mark.slow
def test_difffit_flux_run_writes_a_merged_transformer(setup):
    from diffusers import FluxTransformer2DModel

    run_dir = _train(setup, "dreambooth_lora_flux", "flux", "difffit_flux", "method=difffit", "optim.lr=1e-3")
    ours = vp.load_adapter(load_pipeline(str(setup / "flux")), run_dir / "adapter")
    theirs = load_pipeline(str(setup / "flux"))
    theirs.transformer = FluxTransformer2DModel.from_pretrained(run_dir / "merged" / "transformer")
    assert np.abs(sample_flow_images(theirs, PROMPT) - sample_flow_images(ours, PROMPT)).max() < 1e-5


def _error(setup, capsys, *args) -> str:
    assert run(tool.main, list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_flow_input_is_one_line(setup, capsys, tmp_path):
    # an SD3 recipe on a Flux folder: refused from model_index.json, before anything loads
    err = _error(setup, capsys, *_args(setup, "dreambooth_lora_sd3", "flux", "wrong_family"))
    assert "model.family=sd3: this recipe is for Stable Diffusion 3 pipelines" in err and "(Flux)" in err
    # a size that is no whole number of 2 x 2 latent patches (the tiny VAE scales by 2: multiples of 4)
    err = _error(setup, capsys, *_args(setup, "dreambooth_lora_flux", "flux", "size", "data.size=18"))
    assert "data.size (18) is not a multiple of 4" in err and "2 x 2 latent patches" in err
    # a guidance scale for a transformer without a guidance embedding (FLUX.1-schnell's layout)
    err = _error(setup, capsys, *_args(setup, "dreambooth_lora_flux", "schnell", "guidance"))
    assert "optim.guidance_scale=1.0" in err and "has no guidance embedding" in err
    # a Flux folder without T5
    pipe = load_pipeline(str(setup / "flux"))
    pipe.text_encoder_2 = pipe.tokenizer_2 = None
    pipe.register_modules(text_encoder_2=None, tokenizer_2=None)
    pipe.save_pretrained(tmp_path / "no_t5")
    capsys.readouterr()  # diffusers' notes on the components it did not save
    err = _error(setup, capsys, *_args(setup, "dreambooth_lora_flux", tmp_path / "no_t5", "no_t5"))
    assert "has no T5 text encoder (text_encoder_2 / tokenizer_2 in its model_index.json)" in err
    # generate: a side that is no whole number of latent patches
    args = ["--model", str(setup / "flux"), "--prompt", PROMPT, "--size", "18", "--device", "cpu"]
    assert run(generate.main, [*args, "--out", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --size 18 is not a multiple of the VAE's factor times the transformer's 2 x 2 latent patches 4; "
        "try --size 16"
    )
    # DDPM knobs on a flow model
    err = _error(setup, capsys, *_args(setup, "dreambooth_lora_sd3", "sd3", "snr", "optim.snr_gamma=5"))
    assert "optim.snr_gamma=5.0: min-SNR" in err
    assert not (setup / "runs" / "snr").exists()
