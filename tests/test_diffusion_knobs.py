"""The denoising objective's knobs (``optim.*``: visionpeft/trainers/diffusion_objective.py) against their references.

Where diffusers ships the function (``compute_snr``, the schedulers' ``rescale_betas_zero_snr`` / ``get_velocity``),
the code calls it and the test compares bit for bit with the recipe around it; elsewhere the test holds its own
transcription of the recipe's formula (file and lines cited) and compares with that. Each knob's effect is shown on a
fixed batch, and with every knob off the loss is the plain recipe, draw for draw.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_sd_pipeline

from visionpeft.config.diffusion_objective import DiffusionObjective
from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss, noise_latents, training_scheduler
from visionpeft.trainers.diffusion_objective import (
    biased_timesteps,
    debiased_weights,
    huber_thresholds,
    loss_weights,
    min_snr_weights,
    per_sample_loss,
    pyramid_noise,
    timestep_weights,
)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("knobs") / "tok")


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _ddpm(**config):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **config)


def _capture_unet(pipe):
    """A list that receives (noisy input, timesteps, prediction) of each U-Net call, and the hook handles."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].detach().clone(), args[1].detach().clone(), output.sample.detach().float().clone()))

    return calls, pipe.unet.register_forward_hook(hook, with_kwargs=True)


def _losses(pipe, pixels, objective=None, seed=3):
    """(per-sample losses, captured U-Net calls) of one seeded batch."""
    calls, handle = _capture_unet(pipe)
    try:
        with torch.no_grad():
            losses = diffusion_loss(
                DiffusionParts.from_pipeline(pipe, objective=objective),
                pixels,
                ["a photo of a box"] * len(pixels),
                generator=torch.Generator().manual_seed(seed),
                objective=objective,
                reduction="none",
            )
    finally:
        handle.remove()
    return losses, calls


# ---------------------------------------------------------------- all knobs off: the plain recipe, draw for draw


def test_with_every_knob_off_the_loss_is_the_plain_recipe_draw_for_draw(pipe, pixels):
    """Default knobs draw latents, noise and timesteps from the generator in that order, as before the knobs were
    added, and take the per-sample MSE against the noise: the same bits with objective None or all off."""
    off, calls = _losses(pipe, pixels, DiffusionObjective())
    none, _ = _losses(pipe, pixels, None)
    assert torch.equal(off, none)
    g = torch.Generator().manual_seed(3)
    scheduler = training_scheduler(pipe)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (4,), generator=g)
    noisy, seen_t, prediction = calls[0]
    assert torch.equal(seen_t, timesteps)
    assert torch.equal(noisy, scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(off, F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------- min-SNR-gamma


def _diffusers_min_snr(scheduler, timesteps, gamma):
    """diffusers examples/text_to_image/train_text_to_image.py lines 1028-1035 (58eb52c), as written there."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_diffusers_train_text_to_image_bit_for_bit(prediction_type):
    scheduler = _ddpm(prediction_type=prediction_type)
    timesteps = torch.arange(0, 1000, 7)
    objective = DiffusionObjective(snr_gamma=5.0)
    ours = loss_weights(objective, scheduler, timesteps)
    assert torch.equal(ours, _diffusers_min_snr(scheduler, timesteps, 5.0))
    low_noise = timesteps < 100  # SNR > gamma there: the weight is gamma / SNR (< 1); at high noise 1 (epsilon)
    assert (ours[low_noise] < 1).all()
    if prediction_type == "epsilon":
        assert torch.equal(ours[~low_noise & (timesteps > 300)], torch.ones_like(ours[~low_noise & (timesteps > 300)]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_multiplies_each_sample_loss_of_a_fixed_batch_by_its_weight(pipe, pixels, prediction_type):
    """On one seeded batch, the min-SNR loss is the plain loss times diffusers' weight of each drawn timestep."""
    objective = DiffusionObjective(snr_gamma=5.0, prediction_type=prediction_type)
    plain = DiffusionObjective(prediction_type=prediction_type)
    weighted, calls = _losses(pipe, pixels, objective)
    unweighted, _ = _losses(pipe, pixels, plain)
    scheduler = training_scheduler(pipe, objective)
    reference = unweighted * _diffusers_min_snr(scheduler, calls[0][1], 5.0)
    assert torch.equal(weighted, reference)
    assert not torch.equal(weighted, unweighted)


# ---------------------------------------------------------------- debiased estimation


def _sd_scripts_debiased(loss, timesteps, scheduler, v_prediction):
    """sd-scripts library/custom_train_functions.py prepare_scheduler_for_custom_training (lines 16-27) and
    apply_debiased_estimation (lines 101-109) at 48d368f, transcribed."""
    alphas_cumprod = scheduler.alphas_cumprod
    all_snr = (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2
    snr_t = torch.stack([all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    weight = 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)
    return weight * loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_equals_sd_scripts(prediction_type):
    scheduler = _ddpm(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 1, 5, 50, 250, 500, 999])
    ours = loss_weights(DiffusionObjective(debiased_estimation=True), scheduler, timesteps)
    reference = _sd_scripts_debiased(torch.ones(7), timesteps, scheduler, prediction_type == "v_prediction")
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    assert ours[0] < ours[-1]  # low-noise steps (huge SNR) weigh least
    both = loss_weights(DiffusionObjective(debiased_estimation=True, snr_gamma=5.0), scheduler, timesteps)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)  # both on multiply, as sd-scripts applies one after the other
    assert torch.equal(both, min_snr_weights(snr, 5.0, prediction_type) * debiased_weights(snr, prediction_type))


def test_debiased_estimation_changes_a_fixed_batch_loss_by_its_weight(pipe, pixels):
    weighted, calls = _losses(pipe, pixels, DiffusionObjective(debiased_estimation=True))
    plain, _ = _losses(pipe, pixels)
    scheduler = training_scheduler(pipe)
    assert torch.equal(
        weighted, plain * loss_weights(DiffusionObjective(debiased_estimation=True), scheduler, calls[0][1])
    )


# ---------------------------------------------------------------- pseudo-Huber / smooth-L1


def _sd_scripts_huber(prediction, target, timesteps, scheduler, loss_type, schedule, huber_c):
    """sd-scripts library/train_util.py get_huber_threshold_if_needed (lines 6110-6130) and conditional_loss (lines
    6133-6165) at 48d368f, transcribed with huber_scale 1 and reduction "none" (then the per-sample mean)."""
    b_size = timesteps.shape[0]
    if schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        c = torch.exp(-alpha * timesteps) * 1.0
    elif schedule == "snr":
        alphas_cumprod = torch.index_select(scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        c = (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    else:
        c = torch.full((b_size,), huber_c * 1.0)
    c = c.view(-1, *([1] * (prediction.ndim - 1)))
    if loss_type == "huber":
        loss = 2 * c * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    else:
        loss = 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    return loss.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_losses_and_schedules_equal_sd_scripts(loss_type, schedule):
    g = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 4, 6, 6, generator=g)
    timesteps = torch.tensor([0, 10, 400, 800, 999])
    scheduler = _ddpm()
    objective = DiffusionObjective(loss_type=loss_type, huber_schedule=schedule, huber_c=0.1)
    ours = per_sample_loss(prediction, target, objective, scheduler, timesteps)
    reference = _sd_scripts_huber(prediction, target, timesteps, scheduler, loss_type, schedule, 0.1)
    assert torch.equal(ours, reference)


def test_huber_thresholds_follow_their_schedule():
    scheduler = _ddpm()
    timesteps = torch.tensor([0, 999])
    exponential = huber_thresholds(DiffusionObjective(huber_schedule="exponential", huber_c=0.1), scheduler, timesteps)
    torch.testing.assert_close(exponential, torch.tensor([1.0, 0.1]), rtol=1e-2, atol=0)  # 1 at t = 0, c at t = T
    snr = huber_thresholds(DiffusionObjective(huber_schedule="snr", huber_c=0.1), scheduler, timesteps)
    assert snr[0] > 0.9 and abs(snr[1] - 0.1) < 0.01  # near 1 at low noise, near c at high noise


def test_huber_loss_is_the_mse_for_small_residuals_and_grows_linearly_for_large_ones():
    """The effect on a fixed batch: 2 c (sqrt(d^2 + c^2) - c) ~ d^2 for |d| << c, ~ 2 c |d| for |d| >> c."""
    target = torch.zeros(1, 1, 2, 2)
    timesteps = torch.tensor([500])
    huber = DiffusionObjective(loss_type="huber", huber_schedule="constant", huber_c=0.1)
    small = torch.full((1, 1, 2, 2), 1e-3)
    torch.testing.assert_close(per_sample_loss(small, target, huber, _ddpm(), timesteps), torch.tensor([1e-6]))
    large = torch.full((1, 1, 2, 2), 10.0)
    assert per_sample_loss(large, target, huber, _ddpm(), timesteps) < 0.03 * per_sample_loss(large, target)


def test_huber_loss_of_a_fixed_batch_is_below_its_mse(pipe, pixels):
    huber, calls = _losses(pipe, pixels, DiffusionObjective(loss_type="huber", huber_schedule="constant"))
    mse, _ = _losses(pipe, pixels)
    assert (huber < mse).all()  # residuals of an untrained U-Net are mostly beyond c = 0.1


# ---------------------------------------------------------------- noise: offset, input perturbation, pyramid


def test_noise_offset_is_the_offset_noise_formula_of_train_text_to_image(pipe, pixels):
    """noise += offset * randn((batch, channels, 1, 1)) (train_text_to_image.py lines 973-976), drawn right after
    the noise; the target is that offset noise."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        batch = noise_latents(pipe.vae, training_scheduler(pipe), pixels, g, DiffusionObjective(noise_offset=0.1))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    noise += 0.1 * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    timesteps = torch.randint(0, 1000, (4,), generator=g)
    assert torch.equal(batch.noise, noise) and torch.equal(batch.timesteps, timesteps)
    assert torch.equal(batch.noisy, training_scheduler(pipe).add_noise(latents, noise, timesteps))


def test_input_perturbation_noises_the_input_but_keeps_the_target(pipe, pixels):
    """train_text_to_image.py lines 978-990: the noisy latents are made with noise + gamma * randn, the target stays
    the noise (here the extra draw comes after the timesteps)."""
    scheduler = training_scheduler(pipe)
    with torch.no_grad():
        batch = noise_latents(
            pipe.vae, scheduler, pixels, torch.Generator().manual_seed(6), DiffusionObjective(input_perturbation=0.1)
        )
        g = torch.Generator().manual_seed(6)
        plain = noise_latents(pipe.vae, scheduler, pixels, g)  # the same draws up to the timesteps
    perturbation = torch.randn(plain.noise.shape, generator=g)  # the draw the perturbation makes next
    assert torch.equal(batch.noise, plain.noise) and torch.equal(batch.timesteps, plain.timesteps)
    expected = scheduler.add_noise(plain.latents, plain.noise + 0.1 * perturbation, plain.timesteps)
    assert torch.equal(batch.noisy, expected)
    assert not torch.equal(batch.noisy, plain.noisy)


def _sd_scripts_pyramid(noise, draws, iterations, discount):
    """sd-scripts library/custom_train_functions.py pyramid_noise_like (lines 458-468 at 48d368f), transcribed with
    its random sources (Python's random.random, torch.randn) taken from ``draws``, a torch generator."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand((), generator=draws).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=draws)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize(("iterations", "discount"), [(6, 0.3), (10, 0.8), (1, 0.5)])
def test_pyramid_noise_equals_sd_scripts_pyramid_noise_like(iterations, discount):
    noise = torch.randn(3, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    ours = pyramid_noise(noise.clone(), iterations, discount, torch.Generator().manual_seed(7))
    reference = _sd_scripts_pyramid(noise.clone(), torch.Generator().manual_seed(7), iterations, discount)
    assert torch.equal(ours, reference)


def test_pyramid_noise_adds_low_frequencies(pipe, pixels):
    """The effect: the spatial mean of each (sample, channel) varies far more than white noise's, at unit std."""
    scheduler = training_scheduler(pipe)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        big = torch.cat([pixels] * 8)
        white = noise_latents(pipe.vae, scheduler, big, g).noise
        pyramid = noise_latents(
            pipe.vae, scheduler, big, g, DiffusionObjective(multires_noise_iterations=6, multires_noise_discount=0.8)
        ).noise
    assert abs(pyramid.std().item() - 1) < 1e-5
    assert pyramid.mean(dim=(2, 3)).std() > 3 * white.mean(dim=(2, 3)).std()


# ---------------------------------------------------------------- timestep bias


def _diffusers_timestep_weights(strategy, multiplier, begin, end, portion, num_timesteps):
    """diffusers examples/text_to_image/train_text_to_image_sdxl.py generate_timestep_weights (lines 559-597 at
    58eb52c), transcribed (its checks left out: the config refuses those values)."""
    weights = torch.ones(num_timesteps)
    num_to_bias = int(portion * num_timesteps)
    if strategy == "later":
        bias_indices = slice(-num_to_bias, None)
    elif strategy == "earlier":
        bias_indices = slice(0, num_to_bias)
    elif strategy == "range":
        bias_indices = slice(begin, end)
    else:
        return weights
    weights[bias_indices] *= multiplier
    weights /= weights.sum()
    return weights


@pytest.mark.parametrize(
    ("strategy", "multiplier", "begin", "end", "portion"),
    [
        ("none", 1.0, 0, 1000, 0.25),
        ("later", 2.0, 0, 1000, 0.25),
        ("earlier", 5.0, 0, 1000, 0.5),
        ("range", 3.0, 200, 500, 0.25),
        ("later", 4.0, 0, 1000, 0.0001),  # fewer than one step: the reference's slice(-0, None) takes all of them
    ],
)
def test_timestep_weights_equal_diffusers_sdxl_example(strategy, multiplier, begin, end, portion):
    objective = DiffusionObjective(
        timestep_bias_strategy=strategy,
        timestep_bias_multiplier=multiplier,
        timestep_bias_begin=begin,
        timestep_bias_end=end,
        timestep_bias_portion=portion,
    )
    reference = _diffusers_timestep_weights(strategy, multiplier, begin, end, portion, 1000)
    assert torch.equal(timestep_weights(objective, 1000), reference)


def test_timestep_bias_draws_the_biased_steps_more_often(pipe, pixels):
    later = DiffusionObjective(
        timestep_bias_strategy="later", timestep_bias_multiplier=10.0, timestep_bias_portion=0.25
    )
    drawn = biased_timesteps(later, 20000, 1000, torch.Generator().manual_seed(0))
    share = (drawn >= 750).float().mean().item()
    assert abs(share - 2.5 / 3.25) < 0.02  # 10 x 0.25 / (10 x 0.25 + 0.75)
    window = DiffusionObjective(
        timestep_bias_strategy="range", timestep_bias_begin=100, timestep_bias_end=200, timestep_bias_multiplier=1e6
    )
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        batch = noise_latents(pipe.vae, training_scheduler(pipe), pixels, g, window)
    assert ((batch.timesteps >= 100) & (batch.timesteps < 200)).all()


# ---------------------------------------------------------------- prediction type and zero terminal SNR


def test_v_prediction_targets_the_schedulers_velocity(pipe, pixels):
    """A model whose scheduler says v_prediction (SD 2.x-style) trains v without any option; an epsilon model with
    prediction_type=v_prediction too (change_prediction_type, checked at load): target = scheduler.get_velocity."""
    objective = DiffusionObjective(prediction_type="v_prediction", change_prediction_type=True)
    losses, calls = _losses(pipe, pixels, objective)
    scheduler = training_scheduler(pipe, objective)
    assert scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = calls[0][1]
    target = scheduler.get_velocity(latents, noise, timesteps)
    assert torch.equal(losses, F.mse_loss(calls[0][2], target, reduction="none").mean(dim=(1, 2, 3)))


def test_zero_terminal_snr_rescales_the_training_betas_with_diffusers_function(pipe):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    objective = DiffusionObjective(prediction_type="v_prediction", rescale_zero_terminal_snr=True)
    scheduler = training_scheduler(pipe, objective)
    assert torch.equal(scheduler.betas, rescale_zero_terminal_snr(training_scheduler(pipe).betas))
    assert scheduler.alphas_cumprod[-1] == 0  # the last step is pure noise
    weights = loss_weights(DiffusionObjective(snr_gamma=5.0), scheduler, torch.tensor([999]))
    assert weights.item() == 0  # min-SNR v weight min(0, 5) / (0 + 1): finite, where epsilon's would be 0 / 0
