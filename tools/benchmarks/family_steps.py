"""The GPU suite's SDXL and Flux rows: visionpeft's training step against the logic of diffusers'
``train_dreambooth_lora_sdxl.py``, ``train_controlnet_sdxl.py`` and ``train_dreambooth_lora_flux.py``
(``benchmarks.script_steps``, at 58eb52c), on a random-weight pipeline of a chosen layout (``benchmarks.layouts``:
the published one on a GPU, ``tiny`` on a CPU).

Each side does per step what its training run does, with the recipes' values (rank 4 LoRAs with the scripts'
targets, AdamW, the README runs' learning rates):

- SDXL DreamBooth-LoRA: the script encodes its one instance prompt once (lines 1499-1502) and the images every step
  with its VAE in fp32 (line 1181); visionpeft caches the prompt states as well (nothing on the text side trains) and
  stores the VAE in the half type, as it does with the fp16-fix VAE the recipe loads (modelled here: the VAE's
  ``force_upcast`` is false).
- SDXL ControlNet: the script encodes every caption once before training (``compute_embeddings``, lines 1096-1108),
  the fp16-fix VAE in the weight dtype (README_sdxl's run: lines 1056-1061), a fp32 ControlNet from the U-Net;
  visionpeft's control trainer step (``ControlDenoiser``: prompts cached, the same ControlNet).
- Flux DreamBooth-LoRA: the script encodes the batch's prompts with CLIP-L and T5 (512 tokens) every step (lines
  1736-1740, although lines 1507-1510 encoded the instance prompt once), every frozen model in the weight dtype
  (lines 1244-1247); visionpeft caches the prompt states. Guidance 1.0 and no loss weighting, as the recipe.

Both sides run under the same :class:`~benchmarks.amp.Amp` (autocast, fp16's gradient scaler).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from .amp import HALF, Amp
from .layouts import T5_VOCAB, flux_parts, flux_scheduler, sdxl_parts
from .script_steps import (
    FLUX_SCRIPT_TARGETS,
    flux_dreambooth_loss,
    flux_encode_prompt,
    sdxl_control_embeddings,
    sdxl_controlnet_loss,
    sdxl_dreambooth_loss,
    sdxl_encode_prompt,
    sdxl_time_ids,
)

PROMPT = "a photo of sks dog"
#: the rows: name -> (family, variant)
ROWS = {
    "sdxl dreambooth_lora": ("sdxl", "dreambooth_lora"),
    "sdxl controlnet": ("sdxl", "controlnet"),
    "flux dreambooth_lora": ("flux", "dreambooth_lora"),
}
#: the flow objective of the Flux recipe (configs/personalize/dreambooth_lora_flux.yaml: README_flux's values)
FLUX_KNOBS = {"weighting_scheme": "none", "guidance_scale": 1.0, "max_sequence_length": 512}


def sdxl_pipeline(layout: str, device: str, seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of ``layout`` (random weights) with the real CLIP tokenizers (the second pads
    with "!") and SDXL base's scheduler config, built on ``device``; its VAE config as the fp16-fix VAE's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from visionpeft.data.clip_vocab import clip_tokenizer

    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(seed)
    with torch.device(device):
        parts = sdxl_parts(layout)
    parts["vae"].register_to_config(force_upcast=False)
    for module in parts.values():
        module.eval()  # as from_pretrained leaves them
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        **parts,
        tokenizer=clip_tokenizer(folder / "clip"),
        tokenizer_2=clip_tokenizer(folder / "clip_2", pad_token="!"),
        scheduler=scheduler,
        add_watermarker=False,
    )


@functools.cache
def _t5_tokenizer():
    """One T5-like tokenizer per process: its Unigram training breaks ties differently from build to build (other
    ids for the same words), and both sides of a row must read the same ids."""
    from .t5_vocab import t5_tokenizer

    return t5_tokenizer(tempfile.mkdtemp())


def flux_pipeline(layout: str, device: str, text_dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ``FluxPipeline`` of ``layout`` (random weights) with the real CLIP tokenizer, the offline T5-like one
    (``benchmarks.t5_vocab``) and FLUX.1-dev's scheduler config, built on ``device``; the text encoders in
    ``text_dtype`` (both sides cast them so: building them there keeps FLUX.1-dev's fp32 build within a GPU)."""
    from diffusers import FluxPipeline

    from visionpeft.data.clip_vocab import clip_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(Path(tempfile.mkdtemp())), _t5_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        parts = flux_parts(layout, t5_vocab_size=len(tokenizer_2) if layout == "tiny" else T5_VOCAB)
    for name, module in parts.items():
        module.eval()  # as from_pretrained leaves them (T5's dropout off)
        if name.startswith("text_encoder"):
            module.to(text_dtype)
    return FluxPipeline(scheduler=flux_scheduler(), tokenizer=tokenizer, tokenizer_2=tokenizer_2, **parts)


def _hint_channels(pipe) -> tuple[int, ...]:
    """The ControlNet's hint encoder widths: diffusers' default (16, 32, 96, 256), one stage per VAE level."""
    return (16, 32, 96, 256)[: len(pipe.vae.config.block_out_channels)]


def _peft_lora(model, targets: list[str], precision: str) -> list[torch.nn.Parameter]:
    """The scripts' LoRA: ``add_adapter`` of rank 4, alpha 4, Gaussian init; fp32 under fp16
    (``cast_training_params``); -> its parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    if precision == "fp16":
        cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def reference_step_fn(pipe, row: str, size: int, device: str, precision: str):
    """The script's step of ``row`` on ``pipe`` -> ``step(pixels, control)``, which returns the step's loss."""
    weight_dtype = HALF.get(precision, torch.float32)
    family, variant = ROWS[row]
    modules = [pipe.unet if family == "sdxl" else pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    for module in modules:
        module.requires_grad_(False)
    amp = Amp(device, precision)
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler

        for module in modules:
            module.to(device, weight_dtype)
        optimizer = torch.optim.AdamW(_peft_lora(pipe.transformer, FLUX_SCRIPT_TARGETS, precision), 1e-4)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

        def loss(pixels, control):
            with torch.no_grad():
                encoded = flux_encode_prompt(pipe, [PROMPT] * len(pixels), FLUX_KNOBS["max_sequence_length"])
            return flux_dreambooth_loss(pipe, scheduler, pixels, encoded, None, FLUX_KNOBS, weight_dtype)

    else:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if variant == "controlnet":
            from diffusers import ControlNetModel

            controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=_hint_channels(pipe))
            controlnet.to(device).train()
            optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)
        for module in modules:
            module.to(device, weight_dtype)
        if variant == "controlnet":
            with torch.no_grad():
                states, added = sdxl_control_embeddings(pipe, [PROMPT], size)

            def loss(pixels, control):
                batch = len(pixels)
                conditions = {"text_embeds": added["text_embeds"].repeat(batch, 1)}
                conditions["time_ids"] = added["time_ids"].repeat(batch, 1)
                states_of_batch = states.repeat(batch, 1, 1)
                return sdxl_controlnet_loss(
                    pipe,
                    pipe.unet,
                    controlnet,
                    scheduler,
                    pixels,
                    control,
                    states_of_batch,
                    conditions,
                    None,
                    weight_dtype,
                )

        else:
            pipe.vae.to(torch.float32)
            lora = _peft_lora(pipe.unet, ["to_k", "to_q", "to_v", "to_out.0"], precision)
            optimizer = torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-4)
            with torch.no_grad():
                states, pooled = sdxl_encode_prompt(pipe, [PROMPT])

            def loss(pixels, control):
                batch = len(pixels)
                time_ids = sdxl_time_ids([(size, size)] * batch, [(0, 0)] * batch, size, device, weight_dtype)
                return sdxl_dreambooth_loss(pipe, scheduler, pixels, states, pooled, time_ids, None, weight_dtype)

    def step(pixels, control):
        with amp.autocast():
            value = loss(pixels, control)
        amp.step(value, optimizer)
        return value.detach()

    return step


def visionpeft_step_fn(pipe, row: str, device: str, precision: str):
    """visionpeft's step of ``row`` as its trainers build it -> ``step(pixels, control)``, which returns the step's
    loss."""
    family, variant = ROWS[row]
    if variant == "dreambooth_lora":
        from visionpeft.config.diffusion_objective import DiffusionObjective

        from .personalize import visionpeft_step_fn as personalization_step

        if family == "flux":
            lora = {"r": 4, "alpha": 4, "target_modules": FLUX_SCRIPT_TARGETS}
            objective = DiffusionObjective(**FLUX_KNOBS)
            step = personalization_step(pipe, variant, device, precision, lora=lora, objective=objective)
        else:
            step = personalization_step(pipe, variant, device, precision)
        return lambda pixels, control: step(pixels, None)
    import visionpeft as vp
    from visionpeft.backbones import pipeline_modules
    from visionpeft.trainers.control import ControlDenoiser
    from visionpeft.trainers.diffusion import frozen_modules
    from visionpeft.trainers.run import freeze_in_precision

    vp.attach(pipe, "controlnet", hint_channels=list(_hint_channels(pipe)))
    pipe.to(device)
    adapted = pipeline_modules(pipe)
    denoiser = ControlDenoiser(adapted, pipe)
    freeze_in_precision(frozen_modules(pipe, adapted.text_encoders(), denoiser.parts), precision)
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(pipe)], lr=1e-5, weight_decay=1e-2)
    vp.set_train_mode(pipe, True)
    amp = Amp(device, precision)

    def step(pixels, control):
        with amp.autocast():
            batch = {"pixel_values": pixels, "conditioning_pixel_values": control, "prompt": [PROMPT] * len(pixels)}
            value = denoiser(batch)
        amp.step(value, optimizer)
        return value.detach()

    return step


def row_step(row: str, side: str, layout: str, size: int, batch: int, device: str, precision: str):
    """Builds ``row``'s pipeline and ``side``'s step (``reference``: the script's logic; ``visionpeft``) -> a
    no-argument call of one step on a fixed random batch (drawing from the global random stream), returning its
    loss."""
    family, _ = ROWS[row]
    if family == "flux":
        pipe = flux_pipeline(layout, device, HALF.get(precision, torch.float32))
    else:
        pipe = sdxl_pipeline(layout, device)
    if side == "reference":
        step = reference_step_fn(pipe, row, size, device, precision)
    else:
        step = visionpeft_step_fn(pipe, row, device, precision)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)
    control = torch.rand(batch, 3, size, size, generator=generator).to(device)
    return lambda: step(pixels, control)
