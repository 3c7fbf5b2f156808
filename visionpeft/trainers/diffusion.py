"""The denoising objective of Stable Diffusion fine-tuning, as diffusers' official training examples compute it.

One function, :func:`diffusion_loss`, serves textual inversion, DreamBooth-LoRA and DiffFit: encode the images
with the VAE, add noise at random timesteps, predict it with the U-Net conditioned on the prompts, and take the
(optionally min-SNR weighted) mean squared error against the scheduler's target.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiffusionParts:
    """The pieces of a Stable Diffusion pipeline a training step uses."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    #: prompt batch -> hidden states, kept while nothing on the text side trains (None: no caching)
    prompt_cache: dict[tuple[str, ...], torch.Tensor] | None = None
    #: image content hash -> the VAE's latent distribution parameters (None: no caching)
    latent_cache: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_pipeline(cls, pipeline, cache_prompts: bool = False, cache_latents: bool = False) -> DiffusionParts:
        """The parts of ``pipeline``.

        Args:
            cache_prompts: Keep the text encoder's output per prompt batch whenever it cannot change (diffusers'
                ``--pre_compute_text_embeddings``, found rather than configured: a frozen text encoder and fixed
                prompts, as in DreamBooth-LoRA, encode once; textual inversion never caches).
            cache_latents: Encode each distinct image once and keep the VAE's latent distribution (for image sets
                without random augmentation); latents are still sampled from it every step.
        """
        return cls(
            pipeline.unet,
            pipeline.vae,
            pipeline.text_encoder,
            pipeline.tokenizer,
            training_scheduler(pipeline),
            {} if cache_prompts else None,
            {} if cache_latents else None,
        )


def training_scheduler(pipeline):
    """A DDPM scheduler with the pipeline's noise schedule: training always uses the DDPM forward process,
    whatever sampler the pipeline ships with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


@dataclass
class Noised:
    """One batch taken through the forward process."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def latent_distribution(vae: nn.Module, pixel_values: torch.Tensor, cache: dict[str, torch.Tensor] | None = None):
    """The VAE's latent distribution of the images; with a ``cache``, only images never seen before are encoded."""
    if cache is None:
        return vae.encode(pixel_values.to(vae.dtype)).latent_dist
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    keys = [hashlib.sha1(row.detach().cpu().numpy().tobytes()).hexdigest() for row in pixel_values]
    missing = list({key: i for i, key in enumerate(keys) if key not in cache}.values())
    if missing:
        moments = vae.encode(pixel_values[missing].to(vae.dtype)).latent_dist.parameters
        cache.update({keys[i]: row for i, row in zip(missing, moments)})
    return DiagonalGaussianDistribution(torch.stack([cache[key] for key in keys]))


def noise_latents(
    vae: nn.Module,
    scheduler,
    pixel_values: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    latent_cache: dict | None = None,
    timestep_sampling: str = "uniform",
) -> Noised:
    """VAE latents of the images (scaled by the VAE's factor), noise (optionally offset), uniform timesteps."""
    device = pixel_values.device
    with torch.no_grad():
        distribution = latent_distribution(vae, pixel_values, latent_cache)
        latents = distribution.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device, dtype=latents.dtype
        )
    steps = scheduler.config.num_train_timesteps
    timesteps = sample_timesteps(latents.shape[0], steps, timestep_sampling, generator).to(device)
    return Noised(latents, noise, timesteps, scheduler.add_noise(latents, noise, timesteps))


def sample_timesteps(count: int, steps: int, kind: str = "uniform", generator: torch.Generator | None = None):
    """Training timesteps: ``uniform`` over ``[0, steps)``, or ``cubic`` (T2I-Adapter's sampling, ``(1 - u^3) T``,
    weighted towards the noisy early steps where the structure of the image is decided)."""
    if kind == "uniform":
        return torch.randint(0, steps, (count,), generator=generator, device="cpu")
    if kind == "cubic":
        u = torch.rand((count,), generator=generator, device="cpu")
        return ((1 - u**3) * steps).long().clamp(0, steps - 1)
    raise ValueError(f"unknown timestep sampling {kind!r}")


def expand_placeholders(prompts: list[str], tokenizer) -> list[str]:
    """Writes multi-vector textual-inversion tokens out (``<t>`` -> ``<t> <t>_1 <t>_2``) with diffusers' own
    ``maybe_convert_prompt`` (what its pipelines do at inference), so training sees the prompts inference sees."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), tokenizer)


def encode_prompts(parts: DiffusionParts, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for ``prompts`` (padded to the tokenizer's model_max_length), from the cache when
    the text side is frozen (see :meth:`DiffusionParts.from_pipeline`)."""
    key = tuple(prompts)
    if parts.prompt_cache is not None and key in parts.prompt_cache:
        return parts.prompt_cache[key]
    hidden = _encode(parts, prompts)
    if parts.prompt_cache is not None and torch.is_grad_enabled() and not hidden.requires_grad:
        parts.prompt_cache[key] = hidden  # computed with gradients on, yet nothing trainable fed it: it is fixed
    return hidden


def _encode(parts: DiffusionParts, prompts: list[str]) -> torch.Tensor:
    tokenizer = parts.tokenizer
    ids = tokenizer(
        expand_placeholders(prompts, tokenizer),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(next(parts.text_encoder.parameters()).device)
    return parts.text_encoder(ids)[0]


def diffusion_loss(
    parts: DiffusionParts,
    pixel_values: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    reduction: str = "mean",
    timestep_sampling: str = "uniform",
) -> torch.Tensor:
    """The denoising loss of one batch.

    Args:
        parts: U-Net, VAE, text encoder, tokenizer and a DDPM noise scheduler.
        pixel_values: Images in [-1, 1], (batch, 3, H, W).
        prompts: One prompt per image.
        generator: Random source for latents, noise and timesteps (reproducible runs).
        noise_offset: Offset noise scale (Guttenberg 2023), 0 to disable.
        snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023; 5.0 recommended), None to disable.
        reduction: ``mean`` over the batch or ``none`` for per-sample losses (prior preservation splits them).
        timestep_sampling: ``uniform`` or ``cubic`` (see :func:`sample_timesteps`).
    """
    scheduler = parts.scheduler
    batch = noise_latents(
        parts.vae, scheduler, pixel_values, generator, noise_offset, parts.latent_cache, timestep_sampling
    )
    hidden = encode_prompts(parts, prompts)
    prediction = parts.unet(batch.noisy, batch.timesteps, hidden.to(parts.unet.dtype)).sample.float()
    if scheduler.config.prediction_type == "epsilon":
        target = batch.noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        raise ValueError(f"unsupported prediction type {scheduler.config.prediction_type}")
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, batch.timesteps)
        weight = torch.clamp(snr, max=snr_gamma) / snr
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        per_sample = per_sample * weight
    return per_sample if reduction == "none" else per_sample.mean()
