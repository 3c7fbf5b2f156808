"""The denoising objective's knobs, declared once for every diffusion task (``optim.<knob>``).

:class:`DiffusionObjective` holds the loss / noise / prediction options that users of kohya's sd-scripts and diffusers'
training examples tune; every diffusion task's ``optim`` section is a :class:`DiffusionOptim` (the shared optimizer
fields plus these), and the trainers hand the fields on as one :class:`DiffusionObjective`
(``visionpeft.trainers.diffusion_objective``, where the formulas and their sources are). Every knob is off by
default, so a config that names none of them trains as before. Torch-free: the checks here run when the config loads;
what needs the model's scheduler (the prediction type it was trained for, a flow-matching schedule) is checked when
the pipeline has loaded, before anything trains.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from ..errors import ConfigError
from ..schema import setting
from .sections import OptimConfig

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
PREDICTION_TYPES = (None, "epsilon", "v_prediction")
#: diffusers' ``--weighting_scheme`` of the SD3 / Flux scripts (``none``: uniform timesteps, no weights)
WEIGHTING_SCHEMES = (None, "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass
class DiffusionObjective:
    """Loss weighting, loss type, noise and prediction of the denoising objective (all off by default)."""

    loss_type: str = setting(
        "l2",
        "l2 (MSE), or huber / smooth_l1: the pseudo-Huber loss of sd-scripts' conditional_loss (threshold huber_c)",
        choices=LOSS_TYPES,
    )
    huber_c: float = setting(
        0.1, "the pseudo-Huber threshold (loss_type huber / smooth_l1; sd-scripts' --huber_c)", above=0
    )
    huber_schedule: str = setting(
        "snr",
        "huber_c per timestep: constant, exponential (huber_c at t = T, 1 at t = 0), or snr (1 at low noise, "
        "huber_c at high noise; sd-scripts' default)",
        choices=HUBER_SCHEDULES,
    )
    snr_gamma: float | None = setting(
        None, "min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 recommended; null: off)", above=0
    )
    debiased_estimation: bool = setting(
        False, "weight the loss by 1 / sqrt(SNR) (v-prediction: 1 / (SNR + 1)); sd-scripts' --debiased_estimation_loss"
    )
    noise_offset: float = setting(0.0, "offset-noise scale (Guttenberg 2023; 0: off; 0.05-0.1 usual)", min=0)
    input_perturbation: float = setting(
        0.0, "input-perturbation noise scale (Ning et al. 2023; 0.1 recommended; 0: off)", min=0
    )
    multires_noise_iterations: int = setting(
        0,
        "multi-resolution (pyramid) noise levels (sd-scripts' --multires_noise_iterations; 6-10 usual; 0: off)",
        min=0,
    )
    multires_noise_discount: float = setting(
        0.3, "weight discount per pyramid level (sd-scripts' --multires_noise_discount)", above=0, max=1
    )
    timestep_bias_strategy: str = setting(
        "none",
        "sample some training timesteps more often: earlier / later (the first / last timestep_bias_portion of "
        "them) or range ([timestep_bias_begin, timestep_bias_end)); diffusers' SDXL example",
        choices=TIMESTEP_BIAS_STRATEGIES,
    )
    timestep_bias_multiplier: float = setting(1.0, "how much more often the biased timesteps are drawn", above=0)
    timestep_bias_begin: int = setting(0, "first timestep of the range strategy", min=0)
    timestep_bias_end: int = setting(1000, "end (exclusive) of the range strategy", min=1)
    timestep_bias_portion: float = setting(0.25, "share of the timesteps biased by earlier / later", above=0, max=1)
    prediction_type: str | None = setting(
        None,
        "what the network predicts: epsilon, v_prediction, or null (the model's scheduler's own)",
        choices=PREDICTION_TYPES,
    )
    change_prediction_type: bool = setting(
        False, "allow a prediction_type other than the model's own (the network must relearn its output)"
    )
    rescale_zero_terminal_snr: bool = setting(
        False,
        "rescale the noise schedule to zero terminal SNR (Lin et al. 2024; needs v-prediction) and sample with "
        "trailing timesteps",
    )
    weighting_scheme: str | None = setting(
        None,
        "flow-matching models (SD3, Flux): the timestep density (logit_normal, mode; none: uniform) or loss weighting "
        "(sigma_sqrt, cosmap) of diffusers.training_utils, as the scripts' --weighting_scheme; null: the family "
        "script's default (Flux none, SD3 logit_normal)",
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = setting(0.0, "flow matching: mean of the logit_normal timestep density (--logit_mean)")
    logit_std: float = setting(1.0, "flow matching: std of the logit_normal timestep density (--logit_std)", above=0)
    mode_scale: float = setting(1.29, "flow matching: scale of the mode timestep density (--mode_scale)")
    precondition_outputs: bool | None = setting(
        None,
        "flow matching: precondition the output as EDM (prediction * -sigma + noisy input, target the latents; the "
        "SD3 script's --precondition_outputs); null: the family script's default (SD3 true, Flux false)",
    )
    guidance_scale: float | None = setting(
        None,
        "Flux: the guidance input of a guidance-distilled transformer (FLUX.1-dev; the script's --guidance_scale); "
        "null: 3.5 when the transformer has a guidance embedding",
        min=0,
    )
    max_sequence_length: int | None = setting(
        None, "flow matching: T5 tokens per prompt (--max_sequence_length); null: Flux 512, SD3 77", min=1
    )


@dataclass
class DiffusionOptim(DiffusionObjective, OptimConfig):
    """The ``optim`` section of the diffusion tasks: optimizer, run length and schedule, then the objective's knobs."""


def objective_fields() -> tuple[str, ...]:
    """The names of the objective's knobs (the fields of :class:`DiffusionObjective`)."""
    return tuple(f.name for f in dataclasses.fields(DiffusionObjective))


def objective_of(section) -> DiffusionObjective:
    """The knobs of a config's ``optim`` section (a ``DictConfig`` or a :class:`DiffusionOptim`) as one
    :class:`DiffusionObjective`."""
    return DiffusionObjective(**{name: getattr(section, name) for name in objective_fields()})


def check_objective_config(schema: type, config) -> None:
    """The cross-field checks of the knobs that need no model, for a task whose ``optim`` declares them.

    Raises:
        ConfigError: Options that contradict each other, in one line naming the fields.
    """
    section = typing.get_type_hints(schema).get("optim")
    if not (isinstance(section, type) and issubclass(section, DiffusionObjective)):
        return
    optim = config.optim
    if optim.change_prediction_type and optim.prediction_type is None:
        raise ConfigError("optim.change_prediction_type=true needs optim.prediction_type (epsilon or v_prediction)")
    if optim.rescale_zero_terminal_snr and optim.prediction_type == "epsilon":
        raise ConfigError(
            "optim.rescale_zero_terminal_snr=true needs v-prediction (at zero SNR the noise is the input, so "
            "epsilon carries nothing to learn; Lin et al. 2024, sec. 3.2): set optim.prediction_type=v_prediction"
        )
    if optim.timestep_bias_strategy == "range" and optim.timestep_bias_begin >= optim.timestep_bias_end:
        raise ConfigError(
            f"optim.timestep_bias_begin ({optim.timestep_bias_begin}) must be below optim.timestep_bias_end "
            f"({optim.timestep_bias_end})"
        )
    sampling = config.train.get("timesteps", "uniform")
    if optim.timestep_bias_strategy != "none" and sampling != "uniform":
        raise ConfigError(
            f"train.timesteps={sampling} and optim.timestep_bias_strategy={optim.timestep_bias_strategy} both choose "
            "the training timesteps; set one of them (train.timesteps=uniform or optim.timestep_bias_strategy=none)"
        )
