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
