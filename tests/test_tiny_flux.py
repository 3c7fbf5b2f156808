"""The embedded tiny Flux-layout pipeline: its parts, the pretraining path on a tiny config, and the shipped
folder (loads with ``FluxPipeline.from_pretrained`` alone, draws 32 px with its own scheduler, card and record
consistent with its config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionpeft.demo.tiny_flux_parts import T5_WORDS, caption_words, rope_axes, sampling_options, t5_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "checkpoints" / "tiny_flux"
CONFIG = ROOT / "configs" / "pretrain" / "tiny_flux.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

#: draws two 32 px images with diffusers alone and the sampling keywords the card gives
GENERATE = """
import json, sys
import torch
from diffusers import FluxPipeline
pipe = FluxPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
out = pipe(["a handwritten digit three"] * 2, num_inference_steps=4, height=32, width=32, max_sequence_length=16,
           negative_prompt=["", ""], true_cfg_scale=3.0, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
print(json.dumps({"mean": float(out.mean()), "shape": list(out.shape), "scheduler": type(pipe.scheduler).__name__,
                  "visionpeft": any(m.startswith("visionpeft") for m in sys.modules)}))
"""


def test_caption_tokenizer_gives_every_caption_word_one_token(tmp_path):
    words = caption_words()
    assert {"handwritten", "seven", "brick", "sks", "background"} <= set(words)
    tokenizer = t5_tokenizer(tmp_path / "t5", 16, words)
    ids = tokenizer("a handwritten digit seven", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[4] == tokenizer.eos_token_id == 1 and ids[5:] == [0] * 11
    assert tokenizer("zebra").input_ids[-1] == 1  # unknown words fall back to letters, not one <unk>
    # the test pipelines' default tokenizer is unchanged: trained on T5_WORDS
    default = t5_tokenizer(tmp_path / "default")
    assert default.model_max_length == 512 and len(default) == 37  # its pieces: letters and fragments of T5_WORDS
    assert "sks" in T5_WORDS and len(default("a photo of sks dog").input_ids) > 6


def test_rope_axes_are_even_and_fill_the_head():
    for head in (8, 16, 32, 64, 128):
        axes = rope_axes(head)
        assert sum(axes) == head and all(a % 2 == 0 for a in axes)
    assert rope_axes(128) == (16, 56, 56)  # FLUX.1's


def test_pretrain_path_writes_a_folder_flux_loads_and_samples_at_32_px(tmp_path, monkeypatch):
    """The flux family of ``pretrain_text_to_image`` on a tiny config: two steps, then the export that ships."""
    from diffusers import FluxPipeline

    from visionpeft.config import load_config
    from visionpeft.demo.pretrain_text_to_image import run
    from visionpeft.demo.tiny_flux_card import export_flux_pipeline

    monkeypatch.chdir(ROOT)
    overrides = [
        "model.double_layers=1",
        "model.single_layers=1",
        "model.heads=2",
        "model.head_dim=8",
        "model.t5_width=16",
        "model.t5_layers=1",
        "model.t5_heads=2",
        "model.t5_feed_forward=32",
        "data.batch_size=4",
        "data.options={max_per_subject: 4, per_texture: 8, per_photo: 8, circles: 8}",
        "optim.steps=2",
        "optim.warmup_steps=0",
        "train.log_every=1",
        "train.eval_every=2",
        "train.validation_images=1",
        "train.validation_steps=2",
        f"train.output_dir={tmp_path}",
        "train.run_name=flux",
    ]
    config = load_config(CONFIG, overrides)
    results = run(config, tmp_path / "flux")
    assert tmp_path / "flux" / "pipeline" in results["outputs"]
    assert "digit 7" not in results["subjects"] and "texture brick" not in results["subjects"]
    (tmp_path / "flux" / "wall_minutes.json").write_text(json.dumps({"minutes": 0.1, "threads": 1}))
    target = export_flux_pipeline(config, tmp_path / "flux", tmp_path / "out", "python tools/pretrain.py x")
    pipe = FluxPipeline.from_pretrained(target, torch_dtype=torch.float32)
    assert pipe.transformer.config.guidance_embeds is False and pipe.transformer.config.num_layers == 1
    assert pipe.vae.config.shift_factor is not None and pipe.tokenizer_2.model_max_length == 16
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a handwritten digit three",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **sampling_options(16, 3.0),
    ).images
    assert out.shape == (1, 32, 32, 3)
    record = json.loads((target / "training.json").read_text())
    assert record["family"] == "flux" and record["stages"][0]["steps"] == 2
    assert record["held_out"] == ["digit 7", "texture brick"]
    assert (target / "README.md").read_text().startswith("# tiny_flux")


def test_flux_family_refuses_a_missing_base_and_a_mistyped_key(tmp_path):
    from visionpeft.config import load_config
    from visionpeft.demo.pretrain_flux import build_flux_pipeline
    from visionpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'model.family'"):
        load_config(CONFIG, ["model.familly=flux"])
    config = load_config(CONFIG, [f"model.base={tmp_path}"])
    with pytest.raises(ConfigError, match="model.base"):
        build_flux_pipeline(config, torch.zeros(1, 3, 32, 32), tmp_path / "t5")


def test_shipped_pipeline_loads_with_diffusers_alone_and_matches_its_card():
    from visionpeft.config import load_config

    done = subprocess.run(
        [sys.executable, "-c", GENERATE, str(PIPELINE)], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    drawn = json.loads(done.stdout.strip().splitlines()[-1])
    assert drawn["visionpeft"] is False and drawn["shape"] == [2, 32, 32, 3]
    assert drawn["scheduler"] == "FlowMatchEulerDiscreteScheduler" and 0.0 < drawn["mean"] < 1.0
    config = load_config(CONFIG)
    index = json.loads((PIPELINE / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    transformer = json.loads((PIPELINE / "transformer" / "config.json").read_text())
    assert transformer["num_layers"] == config.model.double_layers
    assert transformer["num_single_layers"] == config.model.single_layers
    assert transformer["num_attention_heads"] == config.model.heads
    assert transformer["attention_head_dim"] == config.model.head_dim
    assert transformer["guidance_embeds"] is False
    record = json.loads((PIPELINE / "training.json").read_text())
    stage = record["stages"][0]
    assert stage["steps"] == config.optim.steps and stage["lr"] == config.optim.lr
    assert record["held_out"] == sorted(config.data.exclude)
    assert record["base"]["held_out"] == sorted(config.data.exclude)  # the reused parts never saw them either
    assert record["minutes"] < 90  # the issue's budget
    card = (PIPELINE / "README.md").read_text()
    assert f"{stage['steps']} steps" in card and f"{record['minutes']:.1f} minutes" in card
    assert (PIPELINE / "samples.png").is_file()
    assert sum(f.stat().st_size for f in PIPELINE.rglob("*") if f.is_file()) < 40 * 2**20


def test_gallery_is_what_the_command_writes_from_its_json_and_meets_the_issue_targets(tmp_path):
    """``gallery/diffusion/tiny_flux``: README.md is ``write_readme`` of its results.json; the judge sees the
    pretrained digits in >= 70% of samples, and DreamBooth-LoRA / DiffFit take the held-out 7 from near 0 to >= 70%
    (mean over the 3 seeds)."""
    import shutil
    import statistics

    from benchmarks.diffusion_demo import write_readme

    gallery = ROOT / "gallery" / "diffusion" / "tiny_flux"
    results = json.loads((gallery / "results.json").read_text())
    shutil.copyfile(gallery / "results.json", tmp_path / "results.json")
    write_readme(results, tmp_path)
    assert (tmp_path / "README.md").read_text() == (gallery / "README.md").read_text()
    assert results["family"] == "flux" and results["seeds"] == [0, 1, 2]
    rates = results["base"]["rates"]
    pretrained = [r["rate"] for r in rates.values() if r["subject"].startswith("digit") and not r["held_out"]]
    assert len(pretrained) == 9 and statistics.mean(pretrained) >= 0.7
    assert rates["a handwritten digit seven"]["rate"] <= 0.1
    for method in ("dreambooth_lora", "difffit"):
        runs = results["personalization"][method]
        assert len(runs) == 3
        assert statistics.mean(r["before"] for r in runs) <= 0.1
        assert statistics.mean(r["after"] for r in runs) >= 0.7


def test_generate_draws_the_shipped_pipeline_as_its_card_does(tmp_path, capsys):
    """``tools/generate.py --model checkpoints/tiny_flux --true-cfg 3``: 32 px (its VAE's sample_size, not Flux's
    256 px default for this VAE), T5 at the tokenizer's 16 tokens, true CFG against "": each grid cell is the image
    FluxPipeline draws with the card's keywords for that seed; --true-cfg on a U-Net pipeline is one line."""
    import generate as generate_tool
    import numpy as np
    from diffusers import FluxPipeline
    from PIL import Image

    from visionpeft.cli.common import run

    argv = ["--model", str(PIPELINE), "--prompt", "a handwritten digit three", "--seeds", "0", "1", "--steps", "4"]
    assert run(generate_tool.main, [*argv, "--true-cfg", "3", "--out", str(tmp_path / "grid.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    cells = [grid[4 : 4 + 128 : 4, x : x + 128 : 4] for x in (4, 4 + 128 + 4)]  # 4x enlarged, 4 px gaps
    pipe = FluxPipeline.from_pretrained(PIPELINE, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for seed, cell in zip((0, 1), cells):
        expected = pipe(
            "a handwritten digit three",
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(seed),
            **sampling_options(16, 3.0),
        ).images[0]
        assert np.abs(cell.astype(int) - np.asarray(expected).astype(int)).max() <= 1
    capsys.readouterr()
    tiny_sd = ["--model", str(ROOT / "checkpoints" / "tiny_sd"), "--prompt", "x", "--seeds", "0", "--steps", "1"]
    assert run(generate_tool.main, [*tiny_sd, "--true-cfg", "3", "--out", str(tmp_path / "sd.png")]) == 2
    assert "has no true_cfg_scale" in capsys.readouterr().err
