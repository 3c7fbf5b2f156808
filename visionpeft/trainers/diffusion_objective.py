"""The math of the denoising objective's knobs (:class:`~visionpeft.config.diffusion_objective.DiffusionObjective`).

Each function follows one reference; the library function is called where diffusers ships one
(``diffusers.training_utils.compute_snr``, the schedulers' own ``rescale_betas_zero_snr`` and ``get_velocity``):

- min-SNR-gamma (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon, ``/ (SNR + 1)`` for v-prediction, as
  diffusers' ``examples/text_to_image/train_text_to_image.py`` (lines 1028-1035 at 58eb52c) weights its MSE; on DiT's
  loss only the MSE term is weighted, the variational bound is not (the official Min-SNR code,
  ``guided_diffusion/gaussian_diffusion.py`` lines 946-949 at 5189997).
- debiased estimation: ``1 / sqrt(min(SNR, 1000))``, v-prediction ``1 / (min(SNR, 1000) + 1)``: sd-scripts'
  ``library/custom_train_functions.py`` ``apply_debiased_estimation`` (lines 101-109 at 48d368f).
- pseudo-Huber / smooth-L1 loss and the constant / exponential / SNR schedule of its threshold, one threshold per
  sample from its own timestep: sd-scripts' ``library/train_util.py`` ``get_huber_threshold_if_needed`` and
  ``conditional_loss`` (lines 6110-6165 at 48d368f; without ``--huber_scale``, i.e. 1). diffusers' research example
  ``scheduled_huber_loss_training`` has the same formulas with one timestep for the whole batch.
- noise offset: ``noise + offset * N(0, 1)`` of shape (batch, channels, 1, 1), train_text_to_image.py lines 973-976.
- input perturbation (Ning et al. 2023): the noisy input is made with ``noise + gamma * N(0, 1)`` while the target
  stays ``noise``, train_text_to_image.py lines 978-990.
- multires (pyramid) noise: sd-scripts' ``custom_train_functions.py`` ``pyramid_noise_like`` (lines 458-468), with
  its random scale factors drawn from the run's generator instead of Python's ``random``.
- timestep bias: diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py`` ``generate_timestep_weights``
  (lines 559-597) and ``torch.multinomial`` over those weights (lines 1094-1100).
- prediction type and zero terminal SNR (Lin et al. 2024): the training DDPM scheduler is built with
  ``prediction_type`` / ``rescale_betas_zero_snr`` in its config; the v target is the scheduler's ``get_velocity``;
  sampling uses the same config with ``timestep_spacing="trailing"``.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from ..config.diffusion_objective import DiffusionObjective
from ..errors import ConfigError

#: debiased estimation caps the SNR here (the SNR of t = 0 is huge; sd-scripts' apply_debiased_estimation)
DEBIASED_SNR_CAP = 1000.0


def offset_noise(noise: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``noise`` plus ``scale`` times one normal draw per (sample, channel) (Guttenberg 2023)."""
    shape = (noise.shape[0], noise.shape[1], 1, 1)
    return noise + scale * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution noise: ``noise`` plus bilinearly upsampled normal noise at scales ``1 / r^i`` (``r`` in
    [2, 4) drawn per level) weighted ``discount^i``, until a level is 1 px; then divided by its standard deviation."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    for level in range(iterations):
        r = torch.rand((), generator=generator).item() * 2 + 2
        small_h, small_w = max(1, int(height / r**level)), max(1, int(width / r**level))
        extra = torch.randn((batch, channels, small_h, small_w), generator=generator, dtype=noise.dtype)
        noise = noise + upsample(extra.to(noise.device)) * discount**level
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std()


def perturbed_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise the input is made with under input perturbation: ``noise + gamma * N(0, 1)``."""
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def timestep_weights(objective: DiffusionObjective, steps: int) -> torch.Tensor:
    """Sampling probabilities of the ``steps`` training timesteps under the objective's timestep bias."""
    weights = torch.ones(steps)
    biased = int(objective.timestep_bias_portion * steps)
    strategy = objective.timestep_bias_strategy
    if strategy == "none":
        return weights
    if strategy == "later":
        chosen = slice(-biased, None)  # as the reference: a portion of 0 steps slices all of them (uniform again)
    elif strategy == "earlier":
        chosen = slice(0, biased)
    else:
        chosen = slice(objective.timestep_bias_begin, objective.timestep_bias_end)
    weights[chosen] *= objective.timestep_bias_multiplier
    return weights / weights.sum()


def biased_timesteps(
    objective: DiffusionObjective, count: int, steps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``count`` training timesteps drawn with :func:`timestep_weights` (with replacement)."""
    return torch.multinomial(timestep_weights(objective, steps), count, replacement=True, generator=generator)


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio of each timestep: diffusers' ``compute_snr``."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights of per-sample losses of ``prediction_type`` (epsilon or v_prediction)."""
    clipped = torch.clamp(snr_values, max=gamma)
    return clipped / (snr_values + 1) if prediction_type == "v_prediction" else clipped / snr_values


def debiased_weights(snr_values: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased-estimation weights of per-sample losses of ``prediction_type`` (epsilon or v_prediction)."""
    capped = torch.clamp(snr_values, max=DEBIASED_SNR_CAP)
    return 1 / (capped + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(capped)


def loss_weights(objective: DiffusionObjective | None, scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """The per-sample weights of the objective's loss weighting (min-SNR, debiased estimation; both multiply), or
    None when neither is on. The prediction type is the (training) scheduler's."""
    if objective is None or (objective.snr_gamma is None and not objective.debiased_estimation):
        return None
    prediction_type = scheduler.config.prediction_type
    values = snr(scheduler, timesteps)
    weight = None
    if objective.snr_gamma is not None:
        weight = min_snr_weights(values, objective.snr_gamma, prediction_type)
    if objective.debiased_estimation:
        debiased = debiased_weights(values, prediction_type)
        weight = debiased if weight is None else weight * debiased
    return weight


def huber_thresholds(objective: DiffusionObjective, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The pseudo-Huber threshold of each sample under ``huber_schedule``: ``constant`` ``huber_c``; ``exponential``
    ``exp(log(huber_c) t / T)`` (1 at t = 0, ``huber_c`` at t = T); ``snr`` ``(1 - huber_c) / (1 + sigma_t)^2 +
    huber_c`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``."""
    c, schedule = objective.huber_c, objective.huber_schedule
    if schedule == "exponential":
        alpha = -math.log(c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps)
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full((timesteps.shape[0],), c, device=timesteps.device)


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    objective: DiffusionObjective | None = None,
    scheduler=None,
    timesteps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unweighted loss of each sample, averaged over its elements: the MSE, or the pseudo-Huber (``2 c (sqrt(d^2
    + c^2) - c)``) / smooth-L1 (``2 (sqrt(d^2 + c^2) - c)``) loss with :func:`huber_thresholds`; a ``mask``
    (broadcast to the loss: (B, 1, h, w) at the latent size) multiplies the element-wise loss before the mean, as
    sd-scripts' ``apply_masked_loss`` (:mod:`visionpeft.data.masks`)."""
    dims = tuple(range(1, prediction.ndim))
    if objective is None or objective.loss_type == "l2":
        loss = F.mse_loss(prediction, target, reduction="none")
    else:
        c = huber_thresholds(objective, scheduler, timesteps).view(-1, *([1] * (prediction.ndim - 1)))
        smooth = 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
        loss = c * smooth if objective.loss_type == "huber" else smooth
    return (loss if mask is None else loss * mask).mean(dim=dims)


def scheduler_overrides(objective: DiffusionObjective | None) -> dict:
    """The scheduler config entries the objective changes (none when its prediction knobs are off)."""
    if objective is None:
        return {}
    changes = {}
    if objective.prediction_type is not None:
        changes["prediction_type"] = objective.prediction_type
    if objective.rescale_zero_terminal_snr:
        changes["rescale_betas_zero_snr"] = True
    return changes


def sampling_scheduler(scheduler, prediction_type: str | None = None, zero_terminal_snr: bool = False):
    """The sampler for a model trained with ``prediction_type`` (None: the scheduler's own) and zero terminal SNR:
    ``scheduler`` itself when neither changes anything, else the same class from its config with those entries
    (zero terminal SNR: rescaled betas and ``timestep_spacing="trailing"``, so sampling starts at the last timestep;
    a class without ``rescale_betas_zero_snr`` - PNDM, LMS, ... - is replaced by DDIM, as diffusers' docs do)."""
    if (prediction_type or zero_terminal_snr) and is_flow_matching(scheduler):
        raise ConfigError(
            f"{type(scheduler).__name__} is a flow-matching scheduler: a prediction type (epsilon, v_prediction) "
            "and zero terminal SNR do not apply to it"
        )
    changes = {}
    if prediction_type is not None and prediction_type != scheduler.config.prediction_type:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if not changes:
        return scheduler
    cls = type(scheduler)
    if zero_terminal_snr and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        from diffusers import DDIMScheduler

        cls = DDIMScheduler
    return cls.from_config(scheduler.config, **changes)


def use_trained_sampling(pipeline, objective: DiffusionObjective) -> None:
    """Sets ``pipeline.scheduler`` to the sampler of a model trained with ``objective`` (see
    :func:`sampling_scheduler`); leaves it as it is when the prediction knobs are off."""
    pipeline.scheduler = sampling_scheduler(
        pipeline.scheduler, objective.prediction_type, objective.rescale_zero_terminal_snr
    )


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (SD3, Flux: ``FlowMatch*Scheduler``), which has no DDPM SNR."""
    return type(scheduler).__name__.startswith("FlowMatch")


#: knobs that only mean something on a DDPM noise schedule, with what a flow-matching model has instead
DDPM_ONLY = {
    "snr_gamma": "min-SNR-gamma weights a DDPM epsilon / v loss by its SNR",
    "debiased_estimation": "debiased estimation weights a DDPM loss by its SNR",
    "rescale_zero_terminal_snr": "zero terminal SNR rescales DDPM betas",
    "prediction_type": "epsilon / v_prediction are DDPM targets",
}

#: DDPM noise and loss knobs that diffusers' SD3 / Flux scripts (the flow objective visionpeft follows) do not have,
#: with their value when off
NOT_IN_FLOW_SCRIPTS = {
    "noise_offset": 0.0,
    "input_perturbation": 0.0,
    "multires_noise_iterations": 0,
    "timestep_bias_strategy": "none",
    "loss_type": "l2",
}

#: the flow-matching knobs (SD3, Flux), with their value when unset
FLOW_ONLY = {
    "weighting_scheme": None,
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "precondition_outputs": None,
    "guidance_scale": None,
    "max_sequence_length": None,
}


def check_objective(objective: DiffusionObjective, scheduler, model: str, where: str = "optim") -> None:
    """Checks the objective against the model's own (sampling) ``scheduler`` before anything trains.

    Raises:
        ConfigError: One line naming the field: a DDPM-only knob on a flow-matching model, a prediction type other
            than the model's without ``change_prediction_type``, zero terminal SNR without v-prediction, a timestep
            range past the schedule's end.
    """
    if is_flow_matching(scheduler):
        for name, why in DDPM_ONLY.items():
            value = getattr(objective, name)
            if value not in (None, False):
                raise ConfigError(
                    f"{where}.{name}={value}: {why}, but {model} uses {type(scheduler).__name__} (flow matching); "
                    "its weighting schemes (diffusers.training_utils.compute_loss_weighting_for_sd3: sigma_sqrt, "
                    f"logit_normal, mode, cosmap) apply instead; unset {where}.{name}"
                )
        for name, off in NOT_IN_FLOW_SCRIPTS.items():
            value = getattr(objective, name)
            if value != off:
                raise ConfigError(
                    f"{where}.{name}={value}: {model} uses {type(scheduler).__name__} (flow matching), whose objective "
                    f"follows diffusers' SD3 / Flux scripts, which have no such knob; set {where}.{name}={off}"
                )
        return
    for name, off in FLOW_ONLY.items():
        value = getattr(objective, name)
        if value != off:
            raise ConfigError(
                f"{where}.{name}={value} is a flow-matching knob (SD3, Flux), but {model} uses "
                f"{type(scheduler).__name__} (a DDPM noise schedule); unset {where}.{name}"
            )
    own = scheduler.config.prediction_type
    wanted = objective.prediction_type or own
    if wanted != own and not objective.change_prediction_type:
        raise ConfigError(
            f"{where}.prediction_type={wanted}, but {model} was trained for {own} (its scheduler says so); set "
            f"{where}.change_prediction_type=true to retrain its output for {wanted} (samples then use {wanted} too)"
        )
    if wanted not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"{model}'s scheduler predicts {wanted}; training supports epsilon and v_prediction "
            f"({where}.prediction_type with {where}.change_prediction_type=true)"
        )
    if objective.rescale_zero_terminal_snr and wanted != "v_prediction":
        raise ConfigError(
            f"{where}.rescale_zero_terminal_snr=true needs v-prediction, but {model} predicts {wanted}: set "
            f"{where}.prediction_type=v_prediction and {where}.change_prediction_type=true (Lin et al. 2024, sec. 3.2)"
        )
    steps = scheduler.config.num_train_timesteps
    if objective.timestep_bias_strategy == "range" and objective.timestep_bias_end > steps:
        raise ConfigError(
            f"{where}.timestep_bias_end ({objective.timestep_bias_end}) is past the {steps} training timesteps of "
            f"{model}; set it to at most {steps}"
        )
