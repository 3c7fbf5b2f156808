"""The flow-matching objective of Stable Diffusion 3 and Flux, as diffusers' DreamBooth-LoRA scripts compute it
(``examples/dreambooth/train_dreambooth_lora_flux.py`` lines 1741-1835 and ``train_dreambooth_lora_sd3.py`` lines
1772-1843 at 58eb52c):

latents normalised with the VAE's shift and scale; ``u`` from ``diffusers.training_utils.
compute_density_for_timestep_sampling`` (``logit_normal`` / ``mode`` / uniform); the timestep ``timesteps[int(u T)]``
of the training scheduler (a fresh ``FlowMatchEulerDiscreteScheduler`` of the pipeline's config, the scripts'
``noise_scheduler_copy``) and its sigma; ``noisy = (1 - sigma) x0 + sigma noise``; the family's transformer call
(:mod:`.flow_conditioning`); target ``noise - x0`` (with ``precondition_outputs``: prediction ``* -sigma + noisy`` and
target ``x0``); weights from ``compute_loss_weighting_for_sd3`` (``sigma_sqrt`` / ``cosmap`` / none) inside the
per-sample mean of the squared error. Both library functions are called, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.masks import latent_mask
from .diffusion_inputs import encode_prompts, latent_distribution
from .flow_conditioning import FlowKnobs


def flow_training_scheduler(pipeline):
    """A fresh flow-matching scheduler of the pipeline's config: its ``timesteps`` / ``sigmas`` are the full training
    schedule whatever sampling did to the pipeline's own."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)


@dataclass
class FlowNoised:
    """One batch taken along the straight path from the latents to the noise."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    noisy: torch.Tensor


def flow_noise(
    latents: torch.Tensor, scheduler, knobs: FlowKnobs, generator: torch.Generator | None = None
) -> FlowNoised:
    """Noise, timesteps (the knobs' density), their sigmas (batch, 1, 1, 1) and the noisy latents; draws noise then
    ``u`` from ``generator``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=knobs.weighting_scheme,
        batch_size=latents.shape[0],
        logit_mean=knobs.logit_mean,
        logit_std=knobs.logit_std,
        mode_scale=knobs.mode_scale,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return FlowNoised(latents, noise, timesteps, sigmas, (1.0 - sigmas) * latents + sigmas * noise)


def flow_matching_loss(
    parts,
    pixel_values: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flow-matching loss of one batch (see the module docstring); ``parts`` is a
    :class:`~.diffusion.DiffusionParts` whose prompt encoder is a flow family's. Per-sample losses with
    ``reduction="none"`` (prior preservation splits them); a loss ``mask`` multiplies the element-wise loss at the
    latent size, as :func:`~.diffusion.diffusion_loss` does."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    family = parts.prompts
    knobs = family.knobs
    with torch.no_grad():
        distribution = latent_distribution(parts.vae, pixel_values, parts.latent_cache)
        latents = family.normalize(distribution.sample(generator)).float()
    batch = flow_noise(latents, parts.scheduler, knobs, generator)
    encoded = encode_prompts(parts, prompts)
    prediction = family.predict(parts.unet, batch.noisy, batch.timesteps, encoded).float()
    target = batch.noise - batch.latents
    if knobs.precondition_outputs:
        prediction = prediction * (-batch.sigmas) + batch.noisy
        target = batch.latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=knobs.weighting_scheme, sigmas=batch.sigmas)
    loss = weighting.float() * (prediction - target.float()) ** 2
    if mask is not None:
        loss = loss * latent_mask(mask.to(loss.device), loss.shape[-2:])
    per_sample = loss.reshape(loss.shape[0], -1).mean(dim=1)
    return per_sample if reduction == "none" else per_sample.mean()
