"""The parts of the tiny text-to-image pipeline, built from scratch with diffusers' / transformers' own classes, and
the VAE's training stage.

Everything is a stock class (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel``, ``CLIPTokenizer``
from open_clip's vocabulary, ``DDPMScheduler`` / ``DDIMScheduler``), so the saved folder loads with
``StableDiffusionPipeline.from_pretrained`` and nothing else.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.clip_vocab import clip_tokenizer
from ..trainers.logs import get_logger

logger = get_logger(__name__)

#: Stable Diffusion's noise schedule (scaled linear betas, 1000 steps, epsilon prediction)
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def pretraining_images(config: DictConfig):
    """The captioned images a ``pretrain_text_to_image`` config trains on (``data.exclude`` left out)."""
    from .captioned_mix import captioned_mix

    return captioned_mix(
        "all",
        size=config.model.image_size,
        seed=config.train.seed,
        exclude=list(config.data.exclude),
        **dict(config.data.options),
    )


def build_vae(model: DictConfig):
    from diffusers import AutoencoderKL

    blocks = len(model.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=model.latent_channels,
        block_out_channels=tuple(model.vae_channels),
        layers_per_block=model.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=min(16, model.vae_channels[0]),
        sample_size=model.image_size,
    )


def latent_size(model: DictConfig) -> int:
    """The latent side: diffusers derives the VAE scale factor as 2 ** (len(block_out_channels) - 1)."""
    return model.image_size // 2 ** (len(model.vae_channels) - 1)


def build_unet(model: DictConfig):
    from diffusers import UNet2DConditionModel

    blocks = len(model.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1)
    up = ("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size(model),
        in_channels=model.latent_channels,
        out_channels=model.latent_channels,
        block_out_channels=tuple(model.unet_channels),
        layers_per_block=model.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=model.text_width,
        attention_head_dim=model.attention_head_dim,
        norm_num_groups=min(16, model.unet_channels[0]),
    )


def build_text_encoder(model: DictConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=model.text_width,
        intermediate_size=4 * model.text_width,
        num_hidden_layers=model.text_layers,
        num_attention_heads=model.text_heads,
        max_position_embeddings=model.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_tokenizer(model: DictConfig):
    """open_clip's BPE vocabulary as a ``CLIPTokenizer`` (files written to a temporary folder, then held in memory)."""
    with tempfile.TemporaryDirectory() as folder:
        return clip_tokenizer(folder, model_max_length=model.max_tokens)


def training_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False)


def sampling_scheduler():
    """DDIM over the same noise schedule, as Stable Diffusion ships it (20 steps are enough at this size)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: np.ndarray, stage: DictConfig, seed: int, folder: Path, decoder_only: bool = False) -> dict:
    """Trains ``vae`` on the images (pixel MSE + ``kl_weight`` x KL, AdamW with cosine decay), sets its
    ``scaling_factor`` from the measured latent std, saves it into ``folder`` with ``training.json``.

    ``decoder_only``: the encoder (and ``quant_conv``) stays frozen and only the decoder learns to reconstruct the
    images from the encoder's latents, as Stability's ``sd-vae-ft-mse``: the latents, and so the ``scaling_factor``
    and every U-Net trained on them, are unchanged, and the result is a drop-in decoder for the same pipeline.
    """
    pixels = to_pixels(images)
    generator = torch.Generator().manual_seed(seed)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=stage.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, stage.steps) / stage.steps))
    )
    start, recent = time.time(), []
    before = reconstruction_mse(vae, pixels)
    vae.train()
    for step in range(1, stage.steps + 1):
        batch = pixels[torch.randint(0, len(pixels), (stage.batch_size,), generator=generator)].to(vae.device)
        with torch.set_grad_enabled(not decoder_only):
            distribution = vae.encode(batch).latent_dist
        reconstruction = vae.decode(distribution.sample(generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse if decoder_only else mse + stage.kl_weight * distribution.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [mse.item()])[-50:]
        if step % 50 == 0 or step == stage.steps:
            logger.info(f"vae step {step}/{stage.steps}: reconstruction mse {np.mean(recent):.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk.to(vae.device)).latent_dist.mode().cpu() for chunk in pixels.split(64)])
    std = latents.std().item()
    if not decoder_only:
        vae.register_to_config(scaling_factor=1.0 / std)
    vae.requires_grad_(False)
    record = {
        "steps": stage.steps,
        "final_train_mse": float(np.mean(recent)),
        "reconstruction_mse": reconstruction_mse(vae, pixels),
        "latent_std": std,
        "scaling_factor": vae.config.scaling_factor,
        "minutes": (time.time() - start) / 60,
    }
    if decoder_only:
        record |= {"decoder_only": True, "lr": stage.lr, "batch_size": stage.batch_size, "mse_before": before}
    vae.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")  # last: marks the stage complete
    logger.info(f"vae: reconstruction mse {record['reconstruction_mse']:.4f}, latent std {std:.3f}")
    return record


def reconstruction_mse(vae, pixels: torch.Tensor, chunk: int = 64) -> float:
    """MSE (images in [-1, 1]) of ``vae``'s reconstructions (the latent mode) of up to 512 evenly spaced images,
    ``chunk`` images at a time on the VAE's device (a 512 px VAE would not decode 512 images at once)."""
    check = pixels[:: max(1, len(pixels) // 512)]
    was_training = vae.training
    vae.eval()
    total = 0.0
    with torch.no_grad():
        for part in check.split(chunk):
            part = part.to(vae.device)
            decoded = vae.decode(vae.encode(part).latent_dist.mode()).sample
            total += F.mse_loss(decoded, part, reduction="sum").item()
    vae.train(was_training)
    return total / check.numel()


def vae_stage(model: DictConfig, stage: DictConfig, images: np.ndarray, seed: int, run_dir: Path):
    """The trained VAE of the run: loaded from ``RUN/vae`` when that stage finished before, trained otherwise."""
    from diffusers import AutoencoderKL

    folder = run_dir / "vae"
    if (folder / "training.json").exists():
        logger.info(f"vae: reusing the stage finished in {folder}")
        vae = AutoencoderKL.from_pretrained(folder)
        return vae.requires_grad_(False).eval(), json.loads((folder / "training.json").read_text())
    torch.manual_seed(seed)
    vae = build_vae(model)
    folder.mkdir(parents=True, exist_ok=True)
    return vae, train_vae(vae, images, stage, seed, folder)


#: the record an exported pipeline folder carries: VAE stage, U-Net stages, held-out subjects, minutes
TRAINING_RECORD = "training.json"


def continued_pipeline(folder: str | Path, held_out: list[str]):
    """``(pipeline, record)``: the exported pipeline a run continues (``model.init_from``) and its training record.

    The record is required: it is what lets the new model card say which subjects no stage ever saw; a held-out
    subject that an earlier stage trained on is refused (continuing cannot make it unseen again).
    """
    from diffusers import StableDiffusionPipeline

    from ..errors import ConfigError, ModelLoadError

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"model.init_from: {folder} is no pipeline folder (no model_index.json)")
    if not (folder / TRAINING_RECORD).is_file():
        raise ModelLoadError(
            f"model.init_from: {folder} has no {TRAINING_RECORD}; continue only from a folder "
            "tools/pretrain.py exported (its record says what the earlier stages saw)"
        )
    record = json.loads((folder / TRAINING_RECORD).read_text())
    seen = sorted(set(held_out) - set(record["held_out"]))
    if seen:
        raise ConfigError(
            f"data.exclude: {seen} were trained on by the earlier stages of {folder}; a continued run "
            "cannot hold them out"
        )
    from ..backbones.diffusers_loading import dtype_keyword

    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **dtype_keyword(torch.float32))
    pipeline.scheduler = sampling_scheduler()
    pipeline.vae.requires_grad_(False).eval()
    return pipeline, record
