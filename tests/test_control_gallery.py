"""The control galleries (``python tools/benchmark.py control-demo`` / ``ip-adapter-demo``) are what their commands
write from their JSON, and the shipped ControlNet (``checkpoints/tiny_sd_controlnet``) loads with diffusers alone and
steers the embedded pipeline: on held-out pairs its samples follow the outline where the base pipeline's do not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "gallery" / "control"
SHIPPED = ROOT / "checkpoints" / "tiny_sd_controlnet"


def test_the_control_gallery_is_what_the_command_writes_from_its_json(tmp_path):
    from benchmarks.control_demo import METHODS, write_readme

    results = json.loads((GALLERY / "results.json").read_text())
    assert list(results["methods"]) == list(METHODS)  # every method has its row
    write_readme(results, tmp_path)
    assert (tmp_path / "README.md").read_text() == (GALLERY / "README.md").read_text()
    assert all((GALLERY / f"samples_{method}.png").is_file() for method in METHODS)
    # the samples decode with the shipped fine-tuned decoder, and the README quotes that decoder's own record
    decoder = json.loads((ROOT / results["vae"]["folder"] / "training.json").read_text())
    assert (results["vae"]["ceiling"], results["vae"]["tuned"]) == (
        decoder["before"]["fill_iou"],
        decoder["after"]["fill_iou"],
    )
    assert f"--vae {results['vae']['folder']}" in results["command"]


def test_the_ip_adapter_gallery_is_what_the_command_writes_from_its_json(tmp_path):
    from benchmarks.ip_adapter_demo import VARIANTS, write_readme

    folder = GALLERY / "ip_adapter"
    results = json.loads((folder / "results.json").read_text())
    assert list(results["variants"]) == list(VARIANTS)
    assert all(len(row["rates"]) == len(results["seeds"]) == 3 for row in results["variants"].values())
    write_readme(results, tmp_path)
    assert (tmp_path / "README.md").read_text() == (folder / "README.md").read_text()


def test_the_shipped_controlnet_loads_alone_and_its_card_quotes_the_gallery():
    from diffusers import ControlNetModel

    from visionpeft.backbones.diffusers_loading import dtype_keyword

    controlnet = ControlNetModel.from_pretrained(SHIPPED, **dtype_keyword(torch.float32))
    row = json.loads((GALLERY / "results.json").read_text())["methods"]["controlnet"]
    assert sum(p.numel() for p in controlnet.parameters()) == row["trainable"]
    card = (SHIPPED / "README.md").read_text()
    assert f"fill IoU {row['fill']:.3f}" in card and f"shape IoU {row['shape']:.3f}" in card
    assert re.search(r"`python tools/benchmark\.py control-demo [^`]*--ship checkpoints/tiny_sd_controlnet", card)


def test_the_shipped_controlnet_puts_the_disc_where_the_outline_is():
    """Eight pairs of a generator seed the ControlNet never trained on, each sampled with and without it (same
    prompt and seed): the controlled samples' shape IoU beats the base pipeline's on average and on most pairs."""
    import tempfile

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from visionpeft.backbones.diffusers_loading import dtype_keyword
    from visionpeft.data.fill50k import make_fill50k, shape_iou
    from visionpeft.demo.captioned_mix import CIRCLE_COLOURS

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_fill50k(Path(tmp) / "pairs", n=8, size=32, seed=7, palette=CIRCLE_COLOURS)
        records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        outlines = [Image.open(folder / r["conditioning_image"]).convert("RGB") for r in records]
    dtype = dtype_keyword(torch.float32)
    base = StableDiffusionPipeline.from_pretrained(ROOT / "checkpoints" / "tiny_sd", **dtype)
    controlnet = ControlNetModel.from_pretrained(SHIPPED, **dtype)
    controlled = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    for pipe in (base, controlled):
        pipe.set_progress_bar_config(disable=True)
    scores = {"base": [], "controlled": []}
    for index, (record, outline) in enumerate(zip(records, outlines)):
        options = {"num_inference_steps": 10, "guidance_scale": 3.0, "height": 32, "width": 32}
        generator = torch.Generator().manual_seed(index)
        scores["base"].append(shape_iou(base(record["text"], generator=generator, **options).images[0], record))
        generator = torch.Generator().manual_seed(index)
        image = controlled(record["text"], image=outline, generator=generator, **options).images[0]
        scores["controlled"].append(shape_iou(image, record))
    assert np.mean(scores["controlled"]) > np.mean(scores["base"]) + 0.15, scores
    assert sum(c > b for c, b in zip(scores["controlled"], scores["base"])) >= 6, scores
