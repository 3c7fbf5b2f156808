"""The inputs of a denoising step that runs may cache: the VAE's latent distributions of images and the encoded
prompts. Shared by the DDPM loss (:mod:`.diffusion`) and the flow-matching loss (:mod:`.flow_matching`)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .prompt_encoders import EncodedPrompts


def latent_distribution(vae: nn.Module, pixel_values: torch.Tensor, cache: dict[str, torch.Tensor] | None = None):
    """The VAE's latent distribution of the images; with a ``cache``, only images never seen before are encoded."""
    if cache is None:
        return vae.encode(pixel_values.to(vae.dtype)).latent_dist
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # the shape is part of the key: images of two buckets may hold the same bytes
    keys = [
        hashlib.sha1(str(tuple(row.shape)).encode() + row.detach().cpu().numpy().tobytes()).hexdigest()
        for row in pixel_values
    ]
    missing = list({key: i for i, key in enumerate(keys) if key not in cache}.values())
    if missing:
        moments = vae.encode(pixel_values[missing].to(vae.dtype)).latent_dist.parameters
        cache.update({keys[i]: row for i, row in zip(missing, moments)})
    return DiagonalGaussianDistribution(torch.stack([cache[key] for key in keys]))


def encode_prompts(parts, prompts: list[str]) -> EncodedPrompts:
    """The encoded ``prompts`` (:class:`~.prompt_encoders.EncodedPrompts`), from the cache when the text side is
    frozen (``parts``: a :class:`~.diffusion.DiffusionParts`; see its ``from_pipeline``)."""
    key = tuple(prompts)
    if parts.prompt_cache is not None and key in parts.prompt_cache:
        return parts.prompt_cache[key]
    encoded = parts.prompts.encode(list(prompts))
    if parts.prompt_cache is not None and torch.is_grad_enabled() and not encoded.requires_grad:
        parts.prompt_cache[key] = encoded  # computed with gradients on, yet nothing trainable fed it: it is fixed
    return encoded
