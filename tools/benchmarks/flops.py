"""What a DreamBooth-LoRA step costs, part by part, at full scale: each part's FLOPs per image counted by torch's
``FlopCounterMode`` on the meta device (exact for the layout, no weights, no memory, seconds on a CPU), and so what
the prompt and latent caches can remove. ``python tools/benchmark.py personalize --shares --layout L --size S``.
"""

from __future__ import annotations

#: the layouts whose step can be counted: the SD 1.x ones of ``personalize.pipeline_parts`` and the families of
#: ``layouts``
FLOP_LAYOUTS = ("scaled", "sd15", "sdxl", "flux", "sd3")
#: per layout: what its text side runs (the scripts' token counts) and its denoiser, as the table names them
DESCRIPTIONS = {
    "scaled": ("text encoder (77 tokens)", "U-Net"),
    "sd15": ("text encoder (CLIP ViT-L, 77 tokens)", "U-Net"),
    "sdxl": ("text encoders (CLIP ViT-L + OpenCLIP ViT-bigG, 77 tokens)", "U-Net (+ pooled text, time ids)"),
    "flux": ("text encoders (CLIP ViT-L 77 + T5-XXL 512 tokens)", "transformer (guidance input)"),
    "sd3": ("text encoders (CLIP ViT-L + ViT-bigG 77 + T5-XXL 77 tokens)", "MMDiT"),
}
#: the token counts of the scripts' defaults: CLIP 77; T5 ``--max_sequence_length`` 512 (Flux) / 77 (SD3)
CLIP_TOKENS, T5_TOKENS = 77, {"flux": 512, "sd3": 77}


def _tflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def _frozen(parts) -> None:
    for module in parts:
        module.requires_grad_(False)


def _unet_calls(layout: str, resolution: int) -> tuple:
    """(VAE encoder, text side, U-Net forward + backward) calls of an SD 1.x or SDXL layout, built on meta."""
    import torch

    if layout == "sdxl":
        from .layouts import sdxl_parts

        parts = sdxl_parts()
        unet, vae, encoders = parts["unet"], parts["vae"], [parts["text_encoder"], parts["text_encoder_2"]]
        added = {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
    else:
        from .personalize import pipeline_parts

        unet, vae, text_encoder = pipeline_parts(layout)
        encoders, added = [text_encoder], None
    _frozen([unet, vae, *encoders])
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = torch.zeros(1, 3, resolution, resolution)
    ids = torch.zeros(1, CLIP_TOKENS, dtype=torch.long)
    latents = torch.zeros(1, vae.config.latent_channels, latent, latent, requires_grad=True)
    hidden = torch.zeros(1, CLIP_TOKENS, unet.config.cross_attention_dim)
    timestep = torch.zeros(1, dtype=torch.long)
    return (
        lambda: vae.encode(pixels),
        lambda: [encoder(ids, output_hidden_states=True) for encoder in encoders],
        lambda: unet(latents, timestep, hidden, added_cond_kwargs=added).sample.sum().backward(),
    )


def _transformer_calls(layout: str, resolution: int) -> tuple:
    """(VAE encoder, text side, transformer forward + backward) calls of FLUX.1-dev or SD3.5 medium, built on meta;
    the transformer reads what the DreamBooth-LoRA scripts give it (Flux: 2 x 2 packed latents with image ids, T5's
    512 states with zero text ids, the pooled CLIP-L output, a guidance scale; SD3: the latents, CLIP-L + CLIP-G's 77
    states then T5's 77, both pooled outputs)."""
    import torch

    from .layouts import flux_parts, sd3_parts

    parts = flux_parts() if layout == "flux" else sd3_parts()
    transformer, vae = parts["transformer"], parts["vae"]
    encoders = [module for name, module in parts.items() if name.startswith("text_encoder")]
    _frozen([transformer, vae, *encoders])
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = torch.zeros(1, 3, resolution, resolution)
    clip_ids = torch.zeros(1, CLIP_TOKENS, dtype=torch.long)
    t5_ids = torch.zeros(1, T5_TOKENS[layout], dtype=torch.long)
    config = transformer.config
    text = [lambda e=e: e(clip_ids, output_hidden_states=True) for e in encoders[:-1]] + [lambda: encoders[-1](t5_ids)]
    if layout == "flux":
        tokens = (latent // 2) ** 2
        inputs = {
            "hidden_states": torch.zeros(1, tokens, config.in_channels, requires_grad=True),
            "encoder_hidden_states": torch.zeros(1, T5_TOKENS[layout], config.joint_attention_dim),
            "pooled_projections": torch.zeros(1, config.pooled_projection_dim),
            "timestep": torch.zeros(1),
            "guidance": torch.ones(1),
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(T5_TOKENS[layout], 3),
        }
    else:
        inputs = {
            "hidden_states": torch.zeros(1, config.in_channels, latent, latent, requires_grad=True),
            "encoder_hidden_states": torch.zeros(1, 2 * CLIP_TOKENS, config.joint_attention_dim),
            "pooled_projections": torch.zeros(1, config.pooled_projection_dim),
            "timestep": torch.zeros(1),
        }
    return (
        lambda: vae.encode(pixels),
        lambda: [call() for call in text],
        lambda: transformer(**inputs, return_dict=False)[0].sum().backward(),
    )


def step_flops(layout: str = "sd15", resolution: int = 512) -> dict[str, float]:
    """TFLOPs per image of the parts of a DreamBooth-LoRA step on ``layout`` at ``resolution``: ``vae encoder``,
    ``text encoders`` (every encoder the family's script runs, on its default token counts: :data:`DESCRIPTIONS`)
    and ``denoiser forward + backward`` (frozen weights: gradients for the activations only, as under LoRA; LoRA's
    own FLOPs, under 0.1 %, are left out)."""
    import torch

    if layout not in FLOP_LAYOUTS:
        raise ValueError(f"layout must be one of {FLOP_LAYOUTS}, not {layout!r}")
    with torch.device("meta"):
        calls = _transformer_calls(layout, resolution) if layout in T5_TOKENS else _unet_calls(layout, resolution)
    vae, text, denoiser = (_tflops(call) for call in calls)
    return {"vae encoder": vae, "text encoders": text, "denoiser forward + backward": denoiser}


def shares(parts: dict[str, float]) -> dict[str, float]:
    """Each part's share of the step, and the two cache ratios: the step with prompts cached, and with prompts and
    latents cached, against the step that encodes both every time (diffusers' loops without their caches)."""
    total = sum(parts.values())
    out = {name: value / total for name, value in parts.items()}
    out["prompts cached"] = (total - parts["text encoders"]) / total
    out["prompts and latents cached"] = parts["denoiser forward + backward"] / total
    return out


def print_shares(layout: str = "sd15", resolution: int = 512) -> None:
    parts = step_flops(layout, resolution)
    share = shares(parts)
    text, denoiser = DESCRIPTIONS[layout]
    labels = {
        "vae encoder": "VAE encoder",
        "text encoders": text,
        "denoiser forward + backward": f"{denoiser} forward + backward (frozen weights, activation gradients)",
    }
    header = f"part of a DreamBooth-LoRA step, {layout} layout, {resolution} px, per image"
    print(f"\n| {header} | TFLOP | share of the step |")
    print("|---|---:|---:|")
    for name, value in parts.items():
        print(f"| {labels[name]} | {value:.4f} | {share[name]:.3f} |")
    cached = parts["denoiser forward + backward"]
    print(
        f"| step with prompts cached / both encoded every step (FLOP ratio) | {cached + parts['vae encoder']:.4f} | "
        f"{share['prompts cached']:.3f} |"
    )
    print(
        f"| step with prompts and latents cached / both encoded every step (FLOP ratio) | {cached:.4f} | "
        f"{share['prompts and latents cached']:.3f} |"
    )
