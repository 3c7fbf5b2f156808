"""The per-step logic of diffusers' SDXL and Flux training scripts (``examples/`` at 58eb52c), written again from
their lines: the reference side of the parity tests (``tests/test_sdxl.py``, ``test_sdxl_control.py``,
``test_flow_family.py``: one step's loss and gradients equal visionpeft's) and of the GPU suite's SDXL / Flux rows.

Every draw (latents, noise, timesteps) takes ``generator`` (None: the global stream, as the scripts draw) on the
latents' device, in the order the functions give; ``weight_dtype`` is the scripts' ``weight_dtype``, the half type
their frozen models run in under mixed precision (fp32: every cast is a no-op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: train_dreambooth_lora_flux.py's default --lora_layers (lines 1257-1270)
FLUX_SCRIPT_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def _draws(latents: torch.Tensor, generator: torch.Generator | None, steps: int):
    """The noise (``randn_like``) and uniform integer timesteps of the DDPM scripts."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    return noise, timesteps.long()


def _target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noise (epsilon) or the scheduler's velocity (v-prediction)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def sdxl_encode_prompt(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """train_dreambooth_lora_sdxl.py's ``tokenize_prompt`` + ``encode_prompt`` (lines 943-980; train_controlnet_sdxl.py
    has the same function, lines 722-757): each tokenizer pads to its max length, both encoders' penultimate hidden
    states are joined, the pooled output is the last encoder's first output."""
    states = []
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        states.append(out[-1][-2])
    return torch.concat(states, dim=-1), pooled.view(len(prompts), -1)


def sdxl_time_ids(original_sizes, crops, resolution: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """train_dreambooth_lora_sdxl.py's ``compute_time_ids`` per item (lines 1477-1483, joined at 1728-1733):
    original size + crop top-left + (resolution, resolution)."""
    rows = [[*map(int, size), *map(int, crop), resolution, resolution] for size, crop in zip(original_sizes, crops)]
    return torch.tensor(rows).to(device, dtype)


def sdxl_dreambooth_loss(
    pipe,
    scheduler,
    pixels: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One step's loss of train_dreambooth_lora_sdxl.py (no prior preservation, EDM or SNR weighting): latents
    (lines 1671-1695: the VAE's dtype in, scaled, cast), noise (1698), timesteps (1702-1706), ``add_noise`` (1716),
    the prompt states repeated to the batch when one prompt was encoded once (1736-1746), the U-Net with the added
    conditions (1748-1753), the target (1797-1806) and ``F.mse_loss`` (1835)."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator) * vae.config.scaling_factor
    latents = latents.to(weight_dtype)
    noise, timesteps = _draws(latents, generator, scheduler.config.num_train_timesteps)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    repeat = len(latents) // len(prompt_embeds)
    added = {"time_ids": time_ids, "text_embeds": pooled.repeat(repeat, 1)}
    pred = pipe.unet(noisy, timesteps, prompt_embeds.repeat(repeat, 1, 1), added_cond_kwargs=added, return_dict=False)
    return F.mse_loss(pred[0].float(), _target(scheduler, latents, noise, timesteps).float(), reduction="mean")


def sdxl_control_embeddings(pipe, prompts: list[str], resolution: int) -> tuple[torch.Tensor, dict]:
    """train_controlnet_sdxl.py's ``compute_embeddings`` (lines 1068-1089; train_t2i_adapter_sdxl.py's is the same):
    the prompt states and the U-Net's added conditions, time ids (resolution, resolution) + (0, 0) + (resolution,
    resolution) in the states' dtype."""
    prompt_embeds, pooled = sdxl_encode_prompt(pipe, prompts)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).repeat(len(prompts), 1)
    added = {"text_embeds": pooled, "time_ids": time_ids.to(prompt_embeds.device, prompt_embeds.dtype)}
    return prompt_embeds, added


def sdxl_controlnet_loss(
    pipe,
    unet,
    controlnet,
    scheduler,
    pixels: torch.Tensor,
    control: torch.Tensor,
    prompt_embeds: torch.Tensor,
    added: dict,
    generator: torch.Generator | None = None,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One step's loss of train_controlnet_sdxl.py: latents (lines 1228-1236), noise (1239), timesteps (1243-1244),
    ``add_noise`` in fp32 cast to the weight dtype (1248-1250), the ControlNet with the U-Net's added conditions
    (1254-1261), the U-Net with its residuals (1264-1274), the target (1277-1282) and ``F.mse_loss`` (1283)."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator) * vae.config.scaling_factor
    latents = latents.to(weight_dtype)
    noise, timesteps = _draws(latents, generator, scheduler.config.num_train_timesteps)
    noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps).to(weight_dtype)
    down, mid = controlnet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        controlnet_cond=control.to(weight_dtype),
        return_dict=False,
    )
    pred = unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        down_block_additional_residuals=[sample.to(weight_dtype) for sample in down],
        mid_block_additional_residual=mid.to(weight_dtype),
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), _target(scheduler, latents, noise, timesteps).float(), reduction="mean")


def flow_script_noising(scheduler, model_input: torch.Tensor, generator, knobs: dict):
    """The noise, timesteps, sigmas and noisy input both flow DreamBooth scripts draw the same way
    (train_dreambooth_lora_flux.py lines 1761-1779, _sd3.py 1779-1797): noise, ``u`` of the knobs' density, the
    scheduler's timesteps at ``u T``, their sigmas through ``get_sigmas`` (flux 1678-1687: the step indices found
    on the device, sigmas in the input's dtype), then (1 - s) x0 + s noise."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    device = model_input.device
    noise = torch.randn(model_input.shape, generator=generator, device=device, dtype=model_input.dtype)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=knobs["weighting_scheme"],
        batch_size=model_input.shape[0],
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices].to(device)
    schedule = scheduler.timesteps.to(device)
    step_indices = [(schedule == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas.to(device, model_input.dtype)[step_indices].flatten()[:, None, None, None]
    return noise, timesteps, sigmas, (1.0 - sigmas) * model_input + sigmas * noise


def flux_encode_prompt(pipe, prompts: list[str], max_sequence_length: int):
    """train_dreambooth_lora_flux.py's ``encode_prompt`` (lines 929-1068): CLIP-L's ``pooler_output`` at 77 tokens,
    T5's last hidden states at ``max_sequence_length`` tokens, zero text ids -> (states, pooled, text ids)."""
    clip, t5 = pipe.text_encoder, pipe.text_encoder_2
    clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pooled = clip(clip_ids.input_ids.to(clip.device), output_hidden_states=False).pooler_output
    t5_ids = pipe.tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    prompt_embeds = t5(t5_ids.to(t5.device))[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=prompt_embeds.device, dtype=clip.dtype)
    return prompt_embeds, pooled, text_ids


def flux_dreambooth_loss(
    pipe,
    scheduler,
    pixels: torch.Tensor,
    encoded: tuple,
    generator,
    knobs: dict,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One step's loss of train_dreambooth_lora_flux.py on ``encoded`` = :func:`flux_encode_prompt`'s output: the
    latents shifted and scaled (lines 1743-1749), image ids (1753-1759), :func:`flow_script_noising`, packing
    (1781-1787), guidance (1790-1794), the transformer with the timestep / 1000 (1797-1807), unpacking (1808-1813),
    weighting (1817), target (1820) and the per-sample mean (1838-1842)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    prompt_embeds, pooled, text_ids = encoded
    config = pipe.vae.config
    model_input = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample(generator)
    model_input = ((model_input - config.shift_factor) * config.scaling_factor).to(weight_dtype)
    vae_scale_factor = 2 ** (len(config.block_out_channels) - 1)
    bsz, channels, height, width = model_input.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, model_input.device, weight_dtype)
    noise, timesteps, sigmas, noisy_model_input = flow_script_noising(scheduler, model_input, generator, knobs)
    packed = FluxPipeline._pack_latents(noisy_model_input, bsz, channels, height, width)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.tensor([knobs["guidance_scale"]], device=model_input.device).expand(bsz)
    model_pred = pipe.transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    model_pred = FluxPipeline._unpack_latents(
        model_pred, height=height * vae_scale_factor, width=width * vae_scale_factor, vae_scale_factor=vae_scale_factor
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=knobs["weighting_scheme"], sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
    return loss.mean()
