"""IP-Adapter beyond the method: the run's export loads in diffusers' own `load_ip_adapter` in a new process and draws
visionpeft's latents; tools/train.py (task ip_adapter) trains on captioned images and leaves that export; the drops
follow tutorial_train.py; bad settings are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import train as tool  # noqa: E402
from _classify_utils import ROOT
from _run_args import train_args
from PIL import Image
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.cli.common import run
from visionpeft.config import load_config
from visionpeft.data.image_prompts import PromptDrops
from visionpeft.demo.tiny_image_encoder import from_open_clip, tiny_image_encoder
from visionpeft.errors import ConfigError

SAMPLE = """
import sys, numpy as np, torch
from PIL import Image
from diffusers import StableDiffusionPipeline
torch.set_num_threads(int(sys.argv[5]))  # the test's own count: another reduction order differs in the last bits
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.load_ip_adapter(sys.argv[2], subfolder="ip_adapter", weight_name="ip_adapter.safetensors",
                     low_cpu_mem_usage=False)  # strict loading: a missing or unexpected key fails
reference = Image.open(sys.argv[3])
def draw(scale):
    pipe.set_ip_adapter_scale(scale)
    return pipe("a photo", ip_adapter_image=reference, num_inference_steps=2, height=16, width=16,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images.numpy()
np.save(sys.argv[4], np.stack([draw(1.0), draw(0.0)]))
"""


def _reference(path):
    pixels = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return Image.open(path)


@pytest.mark.slow
def test_diffusers_load_ip_adapter_draws_visionpeft_latents_in_a_new_process(tmp_path):
    """The export (weights + the encoder in ip_adapter/image_encoder/, load_ip_adapter's default place), loaded by
    diffusers with no visionpeft import, gives the latents visionpeft draws (<= 1e-5); set_ip_adapter_scale(0) the
    base pipeline's."""
    from visionpeft.backbones.diffusers_loading import load_pipeline
    from visionpeft.trainers.ip_adapter import image_embeds, image_processor

    base = tmp_path / "base"
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(base)
    encoder = tiny_image_encoder(image_size=16, projection_dim=12)
    args = dict(num_inference_steps=2, height=16, width=16, output_type="latent")
    plain = load_pipeline(str(base))("a photo", generator=torch.Generator().manual_seed(0), **args).images
    pipe = vp.attach(load_pipeline(str(base)), "ip_adapter", image_embed_dim=12)
    with torch.no_grad():
        for _, p in vp.trainable_parameters(pipe):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reference = _reference(tmp_path / "ref.png")
    embeds = image_embeds(encoder, image_processor(pipe, encoder)(images=reference, return_tensors="pt").pixel_values)
    with vp.conditioning(pipe, ip_image_embeds=embeds):
        ours = pipe("a photo", generator=torch.Generator().manual_seed(0), **args).images
    assert not torch.allclose(ours, plain, atol=1e-3)
    vp.save_adapter(pipe, tmp_path / "run", format="diffusers")
    encoder.save_pretrained(tmp_path / "run" / "ip_adapter" / "image_encoder")
    script = [sys.executable, "-c", SAMPLE, str(base), str(tmp_path / "run"), str(tmp_path / "ref.png")]
    threads = str(torch.get_num_threads())
    result = subprocess.run([*script, str(tmp_path / "theirs.npy"), threads], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = np.load(tmp_path / "theirs.npy")
    np.testing.assert_allclose(theirs[0], ours.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(theirs[1], plain.numpy(), rtol=0, atol=1e-5)


def test_the_drops_follow_tutorial_train():
    """tutorial_train.py lines 62-70: one uniform draw; below i: the image; below i + t: the caption; below i + t +
    ti: both."""
    generator = torch.Generator().manual_seed(0)
    draws = [PromptDrops(0.1, 0.2, 0.3).draw(generator) for _ in range(20000)]
    shares = {kind: draws.count(kind) / len(draws) for kind in set(draws)}
    expected = {(True, False): 0.1, (False, True): 0.2, (True, True): 0.3, (False, False): 0.4}
    assert shares.keys() == expected.keys()
    assert all(abs(shares[k] - v) < 0.015 for k, v in expected.items())
    assert PromptDrops(0, 0, 0).draw(generator) == (False, False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ip_adapter")
    tiny_sd_pipeline(tmp / "tok").save_pretrained(tmp / "pipe")
    tiny_image_encoder(image_size=16, projection_dim=12).save_pretrained(tmp / "encoder")
    (tmp / "photos").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 200 - 40 * i, 90)).save(tmp / "photos" / f"{i}.png")
        (tmp / "photos" / f"{i}.txt").write_text(f"a square of colour {i}")
    return tmp


def _args(setup, name, *overrides):
    return train_args(
        "control/ip_adapter_sd15",
        setup / "runs",
        name,
        f"model.name={setup / 'pipe'}",
        f"model.image_encoder={setup / 'encoder'}",
        "model.image_encoder_subfolder=null",
        f"data.root={setup / 'photos'}",
        "optim.steps=4",
        "train.eval_every=4",
        "train.validation_steps=2",
        *overrides,
    )


@pytest.mark.slow
def test_a_run_trains_validates_and_leaves_what_load_ip_adapter_reads(setup):
    from diffusers import StableDiffusionPipeline

    assert run(tool.main, _args(setup, "run")) == 0
    run_dir = setup / "runs" / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "train/loss" in r]) == 4
    assert [p.name for p in (run_dir / "validation").glob("*.png")] == ["001.png"]
    saved = json.loads((run_dir / "adapter" / "visionpeft_config.json").read_text())
    assert "ip_adapter" in json.dumps(saved) and '"image_embed_dim": 12' in json.dumps(saved)
    pipe = StableDiffusionPipeline.from_pretrained(setup / "pipe")
    pipe.load_ip_adapter(run_dir, subfolder="ip_adapter", weight_name="ip_adapter.safetensors")
    assert pipe.image_encoder.config.projection_dim == 12 and pipe.unet.encoder_hid_proj is not None


def test_bad_settings_are_one_line(setup):
    from visionpeft.trainers.ip_adapter import IPAdapterTrainer

    config = load_config(ROOT / "configs/control/ip_adapter_sd15.yaml", ["data.drop_image=0.5", "data.drop_text=0.6"])
    with pytest.raises(ConfigError, match=r"^data.drop_image \+ drop_text \+ drop_both is 1.15; they are shares"):
        IPAdapterTrainer().build(config, None, setup / "unused")
    overrides = [f"model.name={setup / 'pipe'}", f"model.image_encoder={setup / 'encoder'}"]
    overrides += ["model.image_encoder_subfolder=null", "method={name: ip_adapter, image_embed_dim: 7}"]
    config = load_config(ROOT / "configs/control/ip_adapter_sd15.yaml", [*overrides, f"data.root={setup / 'photos'}"])
    with pytest.raises(ConfigError) as err:
        IPAdapterTrainer().build(config, None, setup / "unused")
    assert str(err.value) == (
        "method 'ip_adapter' option image_embed_dim is 7, but the image encoder's embeddings are 12 wide; leave it "
        "out (the task fills it in)"
    )
    config = load_config(ROOT / "configs/control/ip_adapter_sd15.yaml", overrides[:3])
    with pytest.raises(ConfigError, match="^data.root is required with data.source folder"):
        IPAdapterTrainer().build(config, None, setup / "unused")
    with pytest.raises(
        ConfigError, match="^method 'ip_adapter' needs image_embed_dim, which the control task does not provide$"
    ):
        load_config(ROOT / "configs/control/controlnet_sd15_fill.yaml", ["method=ip_adapter"])


def test_the_tiny_config_uses_the_embedded_pipeline_and_encoder():
    config = load_config(ROOT / "configs/control/ip_adapter_tiny_sd.yaml")
    assert config.data.source == "captioned_mix" and config.model.name.endswith("checkpoints/tiny_sd")
    from visionpeft.backbones.diffusers_loading import load_image_encoder

    encoder = load_image_encoder(config.model.image_encoder, config.model.image_encoder_subfolder)
    converted = from_open_clip(ROOT / "checkpoints" / "tiny_clip")
    assert encoder.state_dict().keys() == converted.state_dict().keys()
    assert all(torch.equal(a, converted.state_dict()[k]) for k, a in encoder.state_dict().items())


def test_the_converted_tiny_clip_tower_embeds_images_as_open_clip_does():
    """The shipped IP-Adapter demo encoder is the tiny CLIP's image tower: its ``image_embeds`` equal open_clip's
    ``encode_image`` of the same pixels, and its penultimate states (IP-Adapter-plus) those of open_clip's blocks."""
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{ROOT / 'checkpoints' / 'tiny_clip'}")
    model = model.float().eval()
    encoder = from_open_clip(ROOT / "checkpoints" / "tiny_clip")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder(pixels, output_hidden_states=True)
        torch.testing.assert_close(ours.image_embeds, model.encode_image(pixels), atol=1e-5, rtol=1e-5)
        visual = model.visual
        tokens = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(len(pixels), 1, -1)
        tokens = visual.ln_pre(torch.cat([cls, tokens], 1) + visual.positional_embedding)
        for block in visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        torch.testing.assert_close(ours.hidden_states[-2], tokens, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.image_embeds[0], ours.image_embeds[1])
