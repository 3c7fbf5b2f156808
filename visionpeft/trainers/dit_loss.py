"""The training objective of class-conditional DiT, as the official DiT code computes it (and DiffFit keeps).

DiT predicts the noise and, with learned sigma (``out_channels == 2 x latent channels``), an interpolation ``v``
between the posterior variance and beta for each position (Nichol & Dhariwal 2021). Its loss is the noise MSE
plus the variational bound term ``L_vb``, computed with the noise prediction detached so ``L_vb`` only teaches the
variance: the KL between the true posterior q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t) in bits, and at
t = 0 the discretised Gaussian decoder NLL. diffusers' ``DiTPipeline`` samples with the noise half only; the vb term
keeps the variance half (which fine-tuned biases would otherwise drift) consistent with the pretrained model.
The objective's knobs (:mod:`.diffusion_objective`) change the noise and the noise term; the variational bound is
never weighted (as the official Min-SNR code does it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config.diffusion_objective import DiffusionObjective
from .diffusion import noise_latents
from .diffusion_objective import loss_weights, per_sample_loss

_LOG2 = math.log(2.0)


def _at(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return values.to(timesteps.device)[timesteps].float().view(-1, 1, 1, 1)


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor):
    """Log-likelihood of ``x`` in [-1, 1] under a Gaussian discretised into 256 bins (DDPM's decoder)."""
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def variational_bound(scheduler, x_start, x_t, timesteps, eps, var_values) -> torch.Tensor:
    """Per-sample ``L_vb`` in bits for a model with learned-range variance (``var_values`` in [-1, 1])."""
    betas = scheduler.betas.double()
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    posterior_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))  # clipped at t = 0
    coef_x0 = betas * prev.sqrt() / (1.0 - alphas_cumprod)
    coef_xt = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
    true_mean = _at(coef_x0, timesteps) * x_start + _at(coef_xt, timesteps) * x_t
    true_log_var = _at(posterior_log_var, timesteps)
    pred_x0 = (
        _at((1.0 / alphas_cumprod).sqrt(), timesteps) * x_t - _at((1.0 / alphas_cumprod - 1.0).sqrt(), timesteps) * eps
    )
    frac = (var_values + 1.0) / 2.0
    model_log_var = frac * _at(betas.log(), timesteps) + (1.0 - frac) * true_log_var
    model_mean = _at(coef_x0, timesteps) * pred_x0 + _at(coef_xt, timesteps) * x_t
    kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / _LOG2
    nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3)) / _LOG2
    return torch.where(timesteps == 0, nll, kl)


def class_conditional_loss(
    transformer: nn.Module,
    vae: nn.Module,
    scheduler,
    pixel_values: torch.Tensor,
    class_labels: torch.Tensor,
    generator: torch.Generator | None = None,
    learn_sigma: bool = True,
    objective: DiffusionObjective | None = None,
) -> torch.Tensor:
    """Per-sample loss of a class-conditional DiT: noise MSE (+ ``L_vb`` when the model predicts its variance).

    Args:
        transformer: A ``DiTTransformer2DModel`` (or anything with its call signature).
        vae: The pipeline's VAE (frozen).
        scheduler: A DDPM scheduler with the pretraining noise schedule (epsilon prediction).
        pixel_values: Images in [-1, 1].
        class_labels: Label ids; the null class (``num_embeds_ada_norm``) for unconditional samples.
        learn_sigma: Add ``L_vb`` when the output carries the variance channels (DiT's default).
        objective: The loss / noise knobs (None: all off); they change the noise and the noise term, not ``L_vb``.
    """
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"DiT is trained with epsilon prediction, not {scheduler.config.prediction_type}")
    batch = noise_latents(vae, scheduler, pixel_values, generator, objective)
    out = transformer(batch.noisy.to(transformer.dtype), timestep=batch.timesteps, class_labels=class_labels).sample
    out = out.float()
    channels = batch.latents.shape[1]
    eps = out[:, :channels]
    loss = per_sample_loss(eps, batch.noise.float(), objective, scheduler, batch.timesteps)
    weight = loss_weights(objective, scheduler, batch.timesteps)
    if weight is not None:
        loss = loss * weight
    if learn_sigma and out.shape[1] == 2 * channels:
        x_start, x_t = batch.latents.float(), batch.noisy.float()
        loss = loss + variational_bound(scheduler, x_start, x_t, batch.timesteps, eps.detach(), out[:, channels:])
    return loss
