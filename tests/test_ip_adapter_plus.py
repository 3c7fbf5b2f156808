"""`ip_adapter` with ``variant: plus`` (IP-Adapter-plus): diffusers' IPAdapterPlusImageProjection over the image
encoder's penultimate patch features computes the official Resampler on the exported tensors; the export is what
diffusers' loader reads as plus (no missing key) and draws visionpeft's latents; the SD 1.5 count from the official
shapes; the task trains it on black-image drops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import perturb, tiny_sd_pipeline, tiny_unet

import visionpeft as vp
from visionpeft.adapter import methods_of
from visionpeft.demo.tiny_image_encoder import tiny_image_encoder
from visionpeft.errors import ConfigError, DataError
from visionpeft.methods.ip_adapter import released_layout_options

DIM = 32  # the tiny image encoder's hidden_size: the width of its patch features
PATCHES = 5  # 16 px in 8 px patches, and the class token
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
STEPS = torch.tensor([10, 500])
STATES = torch.randn(2, PATCHES, DIM, generator=torch.Generator().manual_seed(2))
PLUS = {"image_embed_dim": DIM, "variant": "plus"}


def _run(unet, embeds=STATES):
    with vp.conditioning(unet, ip_image_embeds=embeds):
        return unet(LATENTS, STEPS, encoder_hidden_states=TEXT).sample


def _official_resampler_count(embedding_dim, dim, output_dim, depth=4, dim_head=64, heads=12, queries=16, mult=4):
    """Parameters of tencent-ailab/IP-Adapter ``ip_adapter/resampler.py`` ``Resampler.__init__`` (lines 82-125):
    ``latents`` (1, queries, dim), ``proj_in`` / ``proj_out`` with biases, ``norm_out``, and per layer a
    ``PerceiverAttention`` (lines 35-47: two LayerNorms, bias-free ``to_q``, ``to_kv``, ``to_out``) and a
    ``FeedForward`` (lines 13-20: LayerNorm, two bias-free Linears)."""
    inner, hidden = dim_head * heads, int(dim * mult)
    attention = 2 * 2 * dim + dim * inner + dim * 2 * inner + inner * dim
    feed_forward = 2 * dim + dim * hidden + hidden * dim
    ends = queries * dim + (embedding_dim * dim + dim) + (dim * output_dim + output_dim) + 2 * output_dim
    return ends + depth * (attention + feed_forward)


def test_on_the_sd15_unet_plus_trains_the_official_49m():
    """tutorial_train_plus.py lines 308-317 on SD 1.5 (cross-attention 768) with h94's ViT-H/14 encoder (hidden
    1280): Resampler 29,918,208 + to_k_ip / to_v_ip 19,169,280 (as the plain IP-Adapter) = 49,087,488."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
        )
    adapted = vp.attach(unet, "ip_adapter", image_embed_dim=1280, variant="plus")
    resampler = _official_resampler_count(1280, 768, 768)
    assert resampler == 29_918_208
    assert (
        vp.count_parameters(adapted)["by_group"] == {"ip_adapter": resampler + 19_169_280} == {"ip_adapter": 49_087_488}
    )
    tensors = methods_of(adapted)[-1].diffusers_tensors()
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("image_proj.")) == resampler
    assert tensors["image_proj.layers.3.0.to_kv.weight"].shape == (2 * 768, 768)
    assert released_layout_options(tensors) == {
        "variant": "plus",
        "image_embed_dim": 1280,
        "num_tokens": 16,
        "resampler_width": 768,
        "resampler_heads": 12,
        "cross_attention_dim": 768,
    }


def _official_resampler(tensors: dict[str, torch.Tensor], x: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """``Resampler.forward`` (resampler.py lines 127-147, no positional embedding, no mean-pooled latents) with
    ``PerceiverAttention.forward`` (lines 49-78: norm1 on the features, norm2 on the latents, keys / values of both,
    each of q and k scaled by dim_head ** -0.25) and ``FeedForward`` (lines 13-20), on tensors of the released
    names."""
    F = torch.nn.functional
    t = {k.removeprefix("image_proj."): v for k, v in tensors.items() if k.startswith("image_proj.")}

    def norm(v, name):
        return F.layer_norm(v, v.shape[-1:], t[f"{name}.weight"], t[f"{name}.bias"])

    def split(v):  # (b, n, heads * 64) -> (b, heads, n, 64)
        return v.view(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)

    latents = t["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, t["proj_in.weight"], t["proj_in.bias"])
    for i in range(4):
        p = f"layers.{i}"
        features, queries = norm(x, f"{p}.0.norm1"), norm(latents, f"{p}.0.norm2")
        q = split(F.linear(queries, t[f"{p}.0.to_q.weight"]))
        k, v = (split(h) for h in F.linear(torch.cat([features, queries], 1), t[f"{p}.0.to_kv.weight"]).chunk(2, -1))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)
        latents = F.linear(out, t[f"{p}.0.to_out.weight"]) + latents
        hidden = F.gelu(F.linear(norm(latents, f"{p}.1.0"), t[f"{p}.1.1.weight"]))
        latents = F.linear(hidden, t[f"{p}.1.3.weight"]) + latents
    return norm(F.linear(latents, t["proj_out.weight"], t["proj_out.bias"]), "norm_out")


def test_the_projection_is_diffusers_and_computes_the_official_resampler_on_the_exported_tensors():
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    unet = perturb(vp.attach(tiny_unet(), "ip_adapter", **PLUS), std=0.1)
    method = methods_of(unet)[-1]
    assert isinstance(unet.ip_image_proj, IPAdapterPlusImageProjection) and method.num_tokens == 16
    assert all(p.num_tokens == [16] for p in method.processors.values())
    with torch.no_grad():
        expected = _official_resampler(method.diffusers_tensors(), STATES)
        torch.testing.assert_close(unet.ip_image_proj(STATES), expected, rtol=1e-5, atol=1e-5)


def test_diffusers_loader_reads_the_export_as_plus_with_every_key_and_computes_the_same(tmp_path):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    unet = perturb(vp.attach(tiny_unet(), "ip_adapter", **PLUS), std=0.1)
    state = {group: {} for group in ("image_proj", "ip_adapter")}
    for key, value in methods_of(unet)[-1].diffusers_tensors().items():
        group, _, rest = key.partition(".")
        state[group][rest] = value.clone()
    theirs = tiny_unet()
    theirs._load_ip_adapter_weights([state], low_cpu_mem_usage=False)  # strict: a missing key fails
    assert isinstance(theirs.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection)
    with torch.no_grad():
        expected = theirs(LATENTS, STEPS, TEXT, added_cond_kwargs={"image_embeds": [STATES[:, None]]}).sample
        torch.testing.assert_close(_run(unet), expected, rtol=1e-5, atol=1e-5)
        negative = torch.randn(1, PATCHES, DIM, generator=torch.Generator().manual_seed(5))
        guided = torch.cat([negative, STATES[:1]])[:, None]  # guidance's unconditional half: the given negative
        expected = theirs(LATENTS, STEPS, TEXT, added_cond_kwargs={"image_embeds": [guided]}).sample
        torch.testing.assert_close(_run(unet, (negative, STATES[:1])), expected, rtol=1e-5, atol=1e-5)


def test_save_load_and_the_released_plus_layout_read_back(tmp_path):
    unet = perturb(vp.attach(tiny_unet(), "ip_adapter", **PLUS), std=0.1)
    expected = _run(unet)
    vp.save_adapter(unet, tmp_path / "vp")
    torch.testing.assert_close(_run(vp.load_adapter(tiny_unet(), tmp_path / "vp")), expected, rtol=0, atol=0)
    fresh = vp.attach(tiny_unet(), "ip_adapter", **PLUS)
    methods_of(fresh)[-1].load_diffusers_tensors(methods_of(unet)[-1].diffusers_tensors(), "the file")
    torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=0)


def test_bad_plus_inputs_are_one_line():
    with pytest.raises(ConfigError, match=r"^method 'ip_adapter' variant plain has 4 image tokens and no Resampler"):
        vp.attach(tiny_unet(), "ip_adapter", image_embed_dim=DIM, num_tokens=16)
    unet = vp.attach(tiny_unet(), "ip_adapter", **PLUS)
    with pytest.raises(DataError) as err:
        _run(unet, torch.randn(2, DIM))
    assert str(err.value) == (
        "the ip_image_embeds have shape (2, 32); this IP-Adapter needs (batch, patches, 32) or (batch, images, "
        "patches, 32): the image encoder's penultimate hidden states"
    )


@pytest.mark.slow
def test_load_ip_adapter_on_the_export_draws_what_generate_draws(tmp_path, capsys):
    """The run-style export (weights + encoder) through diffusers' ``pipe.load_ip_adapter`` (strict, plus recognised)
    and ``ip_adapter_image``, against generate's path (``attach_released`` + ``reference_embeds``: the black image's
    states as the unconditional half, as diffusers' ``encode_image``): the same latents (<= 1e-5)."""
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones.diffusers_loading import load_pipeline
    from visionpeft.cli.generate import IMAGE_PROMPT, sample
    from visionpeft.trainers.ip_adapter import attach_released, reference_embeds

    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "base")
    trained = perturb(vp.attach(tiny_sd_pipeline(tmp_path / "tok"), "ip_adapter", **PLUS), std=0.1)
    vp.save_adapter(trained, tmp_path / "run", format="diffusers")
    tiny_image_encoder(image_size=16, projection_dim=12).save_pretrained(
        tmp_path / "run" / "ip_adapter" / "image_encoder"
    )
    pixels = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ref.png")
    reference = Image.open(tmp_path / "ref.png")
    options = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "latent", "guidance_scale": 7.5}

    pipe = load_pipeline(str(tmp_path / "base"))
    loaded, encoder = attach_released(pipe, tmp_path / "run")
    assert methods_of(pipe)[-1].config.variant == "plus"
    inputs = {IMAGE_PROMPT: reference_embeds(pipe, encoder, reference)}
    ours = torch.stack(sample(pipe, "a photo", [0, 1], {"negative_prompt": None, **options}, inputs, None))

    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    folder = {"subfolder": "ip_adapter", "weight_name": "ip_adapter.safetensors", "low_cpu_mem_usage": False}
    theirs.load_ip_adapter(str(tmp_path / "run"), **folder)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    drawn = theirs("a photo", ip_adapter_image=reference, num_images_per_prompt=2, generator=generators, **options)
    assert torch.abs(ours - drawn.images).max() <= 1e-5
    theirs.set_ip_adapter_scale(0.0)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    base = theirs("a photo", ip_adapter_image=reference, num_images_per_prompt=2, generator=generators, **options)
    assert torch.abs(ours - base.images).max() > 1e-3  # the image prompt shows


def test_a_dropped_image_is_a_black_image_before_the_encoder(tmp_path, monkeypatch):
    """tutorial_train_plus.py lines 395-403: a dropped image prompt is ``zeros_like(clip_image)`` through the encoder,
    whose penultimate hidden states the Resampler reads."""
    import visionpeft.trainers.ip_adapter as task
    from visionpeft.backbones import pipeline_modules

    pipe = vp.attach(tiny_sd_pipeline(tmp_path / "tok"), "ip_adapter", **PLUS)
    encoder = tiny_image_encoder(image_size=16, projection_dim=12)
    denoiser = task.ImagePromptDenoiser(pipeline_modules(pipe), pipe, encoder, None)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    given, real = [], task.conditioning
    monkeypatch.setattr(task, "conditioning", lambda model, **inputs: given.append(inputs) or real(model, **inputs))
    batch = {"clip_pixel_values": pixels, "drop_image": [True, False], "pixel_values": torch.zeros(2, 3, 16, 16)}
    assert torch.isfinite(denoiser({**batch, "prompt": ["a", "b"]}))
    with torch.no_grad():
        states = encoder(torch.cat([torch.zeros_like(pixels[:1]), pixels[1:]]), output_hidden_states=True)
    torch.testing.assert_close(given[0]["ip_image_embeds"], states.hidden_states[-2], rtol=0, atol=0)


@pytest.mark.slow
def test_a_plus_run_trains_and_leaves_what_load_ip_adapter_reads_as_plus(tmp_path):
    import train as tool  # noqa: E402
    from diffusers import StableDiffusionPipeline
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from visionpeft.cli.common import run

    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    tiny_image_encoder(image_size=16, projection_dim=12).save_pretrained(tmp_path / "encoder")
    (tmp_path / "photos").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 200 - 40 * i, 90)).save(tmp_path / "photos" / f"{i}.png")
        (tmp_path / "photos" / f"{i}.txt").write_text(f"a square of colour {i}")
    args = ["configs/control/ip_adapter_sd15.yaml", f"model.name={tmp_path / 'pipe'}"]
    args += [f"model.image_encoder={tmp_path / 'encoder'}", "model.image_encoder_subfolder=null"]
    args += [f"data.root={tmp_path / 'photos'}", "data.size=16", "data.batch_size=2", "data.drop_image=0.5"]
    args += ["optim.steps=2", "train.mixed_precision=no", "train.eval_every=2", "train.validation_steps=2"]
    args += [
        f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=plus",
        "--cpu",
        "method={name: ip_adapter, variant: plus}",
    ]
    assert run(tool.main, args) == 0
    run_dir = tmp_path / "runs" / "plus"
    assert (run_dir / "validation" / "001.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.load_ip_adapter(run_dir, subfolder="ip_adapter", weight_name="ip_adapter.safetensors", low_cpu_mem_usage=False)
    assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection)
    assert pipe.unet.encoder_hid_proj.image_projection_layers[0].proj_in.in_features == DIM  # the hidden states
