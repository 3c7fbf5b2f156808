"""The text encoder runs once per prompt batch while nothing on the text side trains (DreamBooth-LoRA on the U-Net),
and every step when it does (textual inversion); the cached states equal fresh ones."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_sd_pipeline

import visionpeft as vp
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss


@pytest.mark.parametrize(
    ("method", "options", "encodes"),
    [("lora", {"r": 2, "targets": ["q", "v"]}, 1), ("textual_inversion", {"token": "<x>", "initializer": "dog"}, 3)],
)
def test_prompt_states_are_encoded_once_while_the_text_side_is_frozen(tmp_path, method, options, encodes):
    pipe = vp.attach(tiny_sd_pipeline(tmp_path / "tok"), method, **options)
    parts = DiffusionParts.from_pipeline(pipe, cache_prompts=True)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    prompts = ["a photo of <x>"] * 2 if method == "textual_inversion" else ["a photo of sks dog"] * 2
    losses = [diffusion_loss(parts, pixels, prompts, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for loss in losses:
        loss.backward()
    assert len(calls) == encodes
    fresh = DiffusionParts.from_pipeline(pipe)
    reference = diffusion_loss(fresh, pixels, prompts, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(losses[-1], reference, rtol=0, atol=0)


def test_with_cached_latents_each_image_is_encoded_once(tmp_path):
    """``train.cache_latents``: the VAE encoder sees each distinct image once however often it recurs, and the
    latent distribution it returns is the one a fresh encoding gives."""
    from visionpeft.trainers.diffusion import latent_distribution

    pipe = tiny_sd_pipeline(tmp_path / "tok")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = [images[[0, 1]], images[[1, 2]], images[[2, 0]], images[[0, 0]]]
    with torch.no_grad():
        references = [pipe.vae.encode(batch).latent_dist for batch in batches]
        seen = []
        pipe.vae.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        cache = {}
        for batch, reference in zip(batches, references):
            cached = latent_distribution(pipe.vae, batch, cache)
            torch.testing.assert_close(cached.mean, reference.mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cached.std, reference.std, rtol=1e-5, atol=1e-6)
    assert sum(seen) == 3
