"""The denoising objective of Stable Diffusion fine-tuning, as diffusers' official training examples compute it.

One function, :func:`diffusion_loss`, serves textual inversion, DreamBooth-LoRA and DiffFit: encode the images
with the VAE, add noise at random timesteps, predict it with the U-Net conditioned on the prompts, and take the mean
squared error against the scheduler's target (epsilon or v). The objective's knobs (loss weighting and type, noise,
timestep bias, prediction type: :class:`~visionpeft.config.diffusion_objective.DiffusionObjective`) change it as
:mod:`.diffusion_objective` says; with all of them off it is the plain recipe, draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config.diffusion_objective import DiffusionObjective
from ..data.masks import latent_mask
from .diffusion_inputs import encode_prompts, latent_distribution
from .diffusion_objective import (
    biased_timesteps,
    loss_weights,
    offset_noise,
    per_sample_loss,
    perturbed_noise,
    pyramid_noise,
    scheduler_overrides,
)
from .flow_conditioning import FluxPromptEncoder, SD3PromptEncoder
from .prompt_encoders import EncodedPrompts, PromptEncoder
from .sdxl_conditioning import SDXLPromptEncoder

#: The prompt encoders by pipeline family, tried in order (the first whose ``matches`` accepts the pipeline).
PROMPT_ENCODERS: tuple[type[PromptEncoder], ...] = (
    FluxPromptEncoder,
    SD3PromptEncoder,
    SDXLPromptEncoder,
    PromptEncoder,
)


def prompt_encoder(pipeline, objective: DiffusionObjective | None = None) -> PromptEncoder:
    """The prompt encoder of ``pipeline``'s family (:data:`PROMPT_ENCODERS`); a flow family's takes its knobs from
    ``objective``."""
    for encoder in PROMPT_ENCODERS:
        if encoder.matches(pipeline):
            return encoder(pipeline, objective)
    raise ValueError(f"no prompt encoder for a {type(pipeline).__name__}")


def denoiser_of(pipeline):
    """The pipeline's denoising network: its U-Net, or its transformer (SD3, Flux)."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else pipeline.transformer


@dataclass
class DiffusionParts:
    """The pieces of a Stable Diffusion pipeline a training step uses."""

    #: the denoiser: a U-Net, or a flow family's transformer
    unet: nn.Module
    vae: nn.Module
    #: the family's text side: prompts -> states and the U-Net's further inputs (:mod:`.prompt_encoders`)
    prompts: PromptEncoder
    scheduler: object
    #: prompt batch -> encoded prompts, kept while nothing on the text side trains (None: no caching)
    prompt_cache: dict[tuple[str, ...], EncodedPrompts] | None = None
    #: image content hash -> the VAE's latent distribution parameters (None: no caching)
    latent_cache: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_pipeline(
        cls,
        pipeline,
        cache_prompts: bool = False,
        cache_latents: bool = False,
        objective: DiffusionObjective | None = None,
    ) -> DiffusionParts:
        """The parts of ``pipeline``.

        Args:
            cache_prompts: Keep the encoded prompts per prompt batch whenever they cannot change (diffusers'
                ``--pre_compute_text_embeddings``, found rather than configured: frozen text encoders and fixed
                prompts, as in DreamBooth-LoRA, encode once; textual inversion never caches).
            cache_latents: Encode each distinct image once and keep the VAE's latent distribution (for image sets
                without random augmentation); latents are still sampled from it every step.
            objective: Its prediction knobs set the training scheduler's prediction type and zero terminal SNR; a
                flow family's encoder takes the flow knobs from it.
        """
        prompts = prompt_encoder(pipeline, objective)
        if prompts.loss_kind == "flow":
            from .flow_matching import flow_training_scheduler

            scheduler = flow_training_scheduler(pipeline)
        else:
            scheduler = training_scheduler(pipeline, objective)
        return cls(
            denoiser_of(pipeline),
            pipeline.vae,
            prompts,
            scheduler,
            {} if cache_prompts else None,
            {} if cache_latents else None,
        )


def frozen_modules(pipeline, text_encoders: list[str], parts: DiffusionParts) -> list[nn.Module]:
    """The modules of a diffusion run whose frozen weights mixed precision stores in half precision: the denoiser,
    the named text encoders, and the VAE unless the family keeps it in fp32 (SDXL's own VAE, whose config says
    ``force_upcast``; SD3's), as diffusers' scripts keep it."""
    vae = [] if parts.prompts.vae_in_fp32(pipeline.vae) else [pipeline.vae]
    return [denoiser_of(pipeline), *(getattr(pipeline, name) for name in text_encoders), *vae]


def training_scheduler(pipeline, objective: DiffusionObjective | None = None):
    """A DDPM scheduler with the pipeline's noise schedule: training always uses the DDPM forward process,
    whatever sampler the pipeline ships with; the objective's ``prediction_type`` / ``rescale_zero_terminal_snr``
    go into its config (diffusers' ``rescale_betas_zero_snr``)."""
    return training_scheduler_from(pipeline.scheduler.config, objective)


def training_scheduler_from(config, objective: DiffusionObjective | None = None):
    """The DDPM scheduler of a scheduler ``config`` with the objective's changes (see :func:`training_scheduler`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config, **scheduler_overrides(objective))


@dataclass
class Noised:
    """One batch taken through the forward process."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def noise_latents(
    vae: nn.Module,
    scheduler,
    pixel_values: torch.Tensor,
    generator: torch.Generator | None = None,
    objective: DiffusionObjective | None = None,
    latent_cache: dict | None = None,
    timestep_sampling: str = "uniform",
) -> Noised:
    """VAE latents of the images (scaled by the VAE's factor), noise, timesteps and the noisy latents; the
    objective's noise knobs (offset, pyramid noise, timestep bias, input perturbation) apply in that order, each
    drawing from ``generator`` only when it is on."""
    device = pixel_values.device
    with torch.no_grad():
        distribution = latent_distribution(vae, pixel_values, latent_cache)
        latents = distribution.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    knobs = objective or DiffusionObjective()
    if knobs.noise_offset:
        noise = offset_noise(noise, knobs.noise_offset, generator)
    if knobs.multires_noise_iterations:
        noise = pyramid_noise(noise, knobs.multires_noise_iterations, knobs.multires_noise_discount, generator)
    steps = scheduler.config.num_train_timesteps
    if knobs.timestep_bias_strategy != "none":
        timesteps = biased_timesteps(knobs, latents.shape[0], steps, generator).to(device)
    else:
        timesteps = sample_timesteps(latents.shape[0], steps, timestep_sampling, generator).to(device)
    inputs = perturbed_noise(noise, knobs.input_perturbation, generator) if knobs.input_perturbation else noise
    return Noised(latents, noise, timesteps, scheduler.add_noise(latents, inputs, timesteps))


def sample_timesteps(count: int, steps: int, kind: str = "uniform", generator: torch.Generator | None = None):
    """Training timesteps: ``uniform`` over ``[0, steps)``, or ``cubic`` (T2I-Adapter's sampling, ``(1 - u^3) T``,
    weighted towards the noisy early steps where the structure of the image is decided)."""
    if kind == "uniform":
        return torch.randint(0, steps, (count,), generator=generator, device="cpu")
    if kind == "cubic":
        u = torch.rand((count,), generator=generator, device="cpu")
        return ((1 - u**3) * steps).long().clamp(0, steps - 1)
    raise ValueError(f"unknown timestep sampling {kind!r}")


def diffusion_loss(
    parts: DiffusionParts,
    pixel_values: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator | None = None,
    objective: DiffusionObjective | None = None,
    reduction: str = "mean",
    timestep_sampling: str = "uniform",
    mask: torch.Tensor | None = None,
    conditions: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The denoising loss of one batch.

    Args:
        parts: U-Net, VAE, the family's prompt encoder and a DDPM noise scheduler (its ``prediction_type`` picks the
            target: the noise, or the scheduler's ``get_velocity``).
        pixel_values: Images in [-1, 1], (batch, 3, H, W).
        prompts: One prompt per image.
        generator: Random source for latents, noise and timesteps (reproducible runs).
        objective: The loss / noise knobs (None: all off): see :mod:`.diffusion_objective`.
        reduction: ``mean`` over the batch or ``none`` for per-sample losses (prior preservation splits them).
        timestep_sampling: ``uniform`` or ``cubic`` (see :func:`sample_timesteps`).
        mask: Loss masks (batch, 1, H, W) in [0, 1] at the image size: resized to the latents
            (:func:`~visionpeft.data.masks.latent_mask`), they multiply the element-wise loss (sd-scripts'
            masked loss).
        conditions: Per-item data conditions the family's U-Net takes (SDXL: ``original_size``,
            ``crop_top_left``, ``target_size``, (batch, 2) each; None: every image uncropped at its own size).

    A flow family's parts (SD3, Flux: ``parts.prompts.loss_kind == "flow"``) get the flow-matching loss of
    :mod:`.flow_matching` instead, with the same batch, generator, reduction and mask.
    """
    if parts.prompts.loss_kind == "flow":
        from .flow_matching import flow_matching_loss

        return flow_matching_loss(parts, pixel_values, prompts, generator, reduction, mask)
    scheduler = parts.scheduler
    batch = noise_latents(
        parts.vae, scheduler, pixel_values, generator, objective, parts.latent_cache, timestep_sampling
    )
    encoded = encode_prompts(parts, prompts)
    extra = parts.prompts.denoiser_inputs(encoded, conditions, tuple(pixel_values.shape[-2:]))
    hidden = encoded.hidden.to(parts.unet.dtype)
    prediction = parts.unet(batch.noisy, batch.timesteps, hidden, **extra).sample.float()
    if scheduler.config.prediction_type == "epsilon":
        target = batch.noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        raise ValueError(f"unsupported prediction type {scheduler.config.prediction_type}")
    weights = None if mask is None else latent_mask(mask.to(prediction.device), prediction.shape[-2:])
    per_sample = per_sample_loss(prediction, target.float(), objective, scheduler, batch.timesteps, weights)
    weight = loss_weights(objective, scheduler, batch.timesteps)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample if reduction == "none" else per_sample.mean()
