"""tools/generate.py --ip-adapter RUN --ip-image ref.png: the image prompt of every sample, beside a LoRA and a
control (a T2I-Adapter); bad input is one line each, checked before sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.cli.common import run
from visionpeft.cli.generate import main
from visionpeft.demo.tiny_image_encoder import tiny_image_encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_ip")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    ip = vp.attach(tiny_sd_pipeline(tmp / "tok"), "ip_adapter", image_embed_dim=12)
    lora = vp.attach(tiny_sd_pipeline(tmp / "tok"), "lora", r=2, targets=["q", "v"])
    control = vp.attach(tiny_sd_pipeline(tmp / "tok"), "t2i_adapter", downscale_factor=2)
    with torch.no_grad():
        for model in (ip, lora, control):
            for _, p in vp.trainable_parameters(model):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for model, name in ((ip, "ip_run"), (lora, "lora"), (control, "control")):
        vp.save_adapter(model, tmp / name, format="diffusers")
    tiny_image_encoder(image_size=16, projection_dim=12).save_pretrained(
        tmp / "ip_run" / "ip_adapter" / "image_encoder"
    )
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "ref.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp / "edges.png")
    return tmp


def _generate(setup, capsys, *args, out="grid.png"):
    base = ["--model", str(setup / "pipe"), "--prompt", "x", "--seeds", "0", "1", "--steps", "2", "--device", "cpu"]
    code = run(main, [*base, "--out", str(setup / out), *map(str, args)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def _grid(setup, name):
    return np.asarray(Image.open(setup / name), dtype=np.int16)


@pytest.mark.slow
def test_the_image_prompt_steers_samples_beside_a_lora_and_a_control(setup, capsys):
    others = ["--adapter", setup / "lora", "--control", setup / "control" / "t2i_adapter"]
    others += ["--control-image", setup / "edges.png"]
    assert _generate(setup, capsys, *others, out="plain.png")[0] == 0
    with_ip = ["--ip-adapter", setup / "ip_run", "--ip-image", setup / "ref.png"]
    assert _generate(setup, capsys, *others, *with_ip, out="ip.png")[0] == 0
    assert _generate(setup, capsys, *others, *with_ip, "--ip-scale", "0", out="ip0.png")[0] == 0
    assert np.abs(_grid(setup, "ip.png") - _grid(setup, "plain.png")).max() > 8
    np.testing.assert_array_equal(_grid(setup, "ip0.png"), _grid(setup, "plain.png"))  # scale 0: no image prompt


@pytest.mark.slow
def test_a_released_layout_file_with_its_encoder_loads_too(setup, capsys):
    file = setup / "ip_run" / "ip_adapter" / "ip_adapter.safetensors"
    encoder = setup / "ip_run" / "ip_adapter" / "image_encoder"
    args = ["--ip-adapter", file, "--ip-image-encoder", encoder, "--ip-image", setup / "ref.png"]
    assert _generate(setup, capsys, *args, out="file.png")[0] == 0


def test_bad_image_prompts_are_one_line(setup, capsys):
    (setup / "broken.png").write_text("not an image")
    run_args = ["--ip-adapter", setup / "ip_run"]
    cases = {
        ("--ip-image", setup / "ref.png"): "error: --ip-image is the image prompt of an IP-Adapter: give --ip-adapter "
        "RUN too",
        tuple(run_args): "error: --ip-adapter needs --ip-image (the image prompt)",
        (*run_args, "--ip-image", setup / "broken.png"): f"error: {setup / 'broken.png'} is not a readable image",
        (*run_args, "--ip-image", setup / "missing.png"): f"error: {setup / 'missing.png'}",
        ("--ip-adapter", setup / "lora", "--ip-image", setup / "ref.png"): f"error: no IP-Adapter at {setup / 'lora'}",
    }
    for args, start in cases.items():
        code, lines = _generate(setup, capsys, *args, out="bad.png")
        assert code == 2 and len(lines) == 1 and lines[0].startswith(start), (args, lines)


def test_an_ip_adapter_of_another_cross_attention_width_is_one_line(setup, capsys):
    tensors = load_file(setup / "ip_run" / "ip_adapter" / "ip_adapter.safetensors")
    tensors["image_proj.proj.weight"] = torch.zeros(4 * 768, 12)  # an SD 1.5 IP-Adapter's projection
    (setup / "wide").mkdir()
    save_file(tensors, setup / "wide" / "ip_adapter.safetensors")
    encoder = setup / "ip_run" / "ip_adapter" / "image_encoder"
    args = ["--ip-adapter", setup / "wide", "--ip-image-encoder", encoder, "--ip-image", setup / "ref.png"]
    code, lines = _generate(setup, capsys, *args, out="bad.png")
    assert code == 2 and lines == [
        f"error: {setup / 'wide' / 'ip_adapter.safetensors'} is an IP-Adapter for cross-attention width 768; this "
        "pipeline's U-Net has width 16 (another base model)"
    ]
    code, lines = _generate(setup, capsys, "--ip-adapter", setup / "wide", "--ip-image", setup / "ref.png", out="b.png")
    assert code == 2 and lines[0].startswith("error: ") and "is an IP-Adapter for cross-attention width 768" in lines[0]
