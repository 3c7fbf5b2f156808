"""Personalization benchmark: a visionpeft training step against a bare step written directly against diffusers.

The reference steps do per step what diffusers' official example scripts do: textual_inversion.py (a resized
embedding table trained whole, all old rows copied back after every step) and train_dreambooth_lora.py (a PEFT
LoRA added with ``unet.add_adapter``). Both sides use the same locally built pipeline (random weights, a scaled-down
SD layout so a CPU step takes about a second), the same batch, and the same noise. Each variant runs in a fresh
process; the table gives median step time and peak memory above the pipeline's own footprint.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import resource
import statistics
import time

from .stats import ratio_spread


def build_pipeline(seed: int = 0):
    """A scaled-down Stable Diffusion pipeline (SD layout, smaller widths) with the real CLIP tokenizer."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from visionpeft.data.clip_vocab import clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(tempfile.mkdtemp())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=256,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reference_step_fn(pipe, variant: str):
    """A step written directly against diffusers, as its official example scripts do."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    scheduler = pipe.scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    if variant == "textual_inversion":
        tokenizer.add_tokens(["<ref>"])
        token_id = tokenizer.convert_tokens_to_ids("<ref>")
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeddings = text_encoder.get_input_embeddings()
        embeddings.weight.requires_grad_(True)
        params = [embeddings.weight]
        originals = embeddings.weight.detach().clone()
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[token_id] = False
        prompt = "a photo of a <ref>"
        lr = 5e-4
    else:
        unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
            )
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        prompt = "a photo of sks dog"
        lr = 1e-4
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step(pixel_values, generator):
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer(
            [prompt] * latents.shape[0],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, timesteps, hidden).sample.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant == "textual_inversion":
            with torch.no_grad():
                embeddings.weight[keep] = originals[keep]

    return step


def _visionpeft_step_fn(pipe, variant: str):
    import torch

    import visionpeft as vp
    from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss

    if variant == "textual_inversion":
        vp.attach(pipe, "textual_inversion", token="<ref>", initializer="dog")
        prompt, lr = "a photo of a <ref>", 5e-4
    else:
        vp.attach(pipe, "lora", r=4, alpha=4, targets=["q", "k", "v", "o"])
        prompt, lr = "a photo of sks dog", 1e-4
    parts = DiffusionParts.from_pipeline(pipe, cache_prompts=True)  # as the trainer builds them
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(pipe)], lr=lr)

    def step(pixel_values, generator):
        loss = diffusion_loss(parts, pixel_values, [prompt] * pixel_values.shape[0], generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure(args: tuple) -> dict:
    """(side, variant, batch, size, steps, threads[, pipeline folder]) -> median step time and peak memory."""
    side, variant, batch, size, steps, threads, *model = args
    import torch

    torch.set_num_threads(threads)
    if model:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model[0], torch_dtype=torch.float32)
    else:
        pipe = build_pipeline()
    step = (_reference_step_fn if side == "reference" else _visionpeft_step_fn)(pipe, variant)
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gc.collect()
    base = _rss_mb()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        step(pixels, torch.Generator().manual_seed(i))
        if i:
            times.append(time.perf_counter() - start)
    return {
        "time": statistics.median(times),
        "memory": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
    }


def ti_lookup(threads: int, repeats: int = 5) -> dict[str, float]:
    """Forward + backward of the textual-inversion embedding on an SD 1.5-sized table (49,408 x 768, 2 prompts of
    77 tokens, 2 new rows): visionpeft's lookup against a lookup in the concatenated table (what the method did
    before, and what a resized embedding trained whole costs at least)."""
    import torch
    import torch.nn.functional as F

    from visionpeft.methods.textual_inversion import NewTokenEmbedding

    torch.set_num_threads(threads)
    base = torch.nn.Embedding(49408, 768).requires_grad_(False)
    ours = NewTokenEmbedding(base, torch.randn(2, 768))
    rows = torch.nn.Parameter(torch.randn(2, 768))
    ids = torch.randint(0, 49408, (2, 77))
    ids[:, 5] = 49408

    from .core import _interleaved

    return _interleaved(
        {
            "ours": lambda: ours(ids).sum().backward(),
            "concatenated": lambda: F.embedding(ids, torch.cat([base.weight, rows])).sum().backward(),
        },
        repeats,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py personalize", description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for variant in ("textual_inversion", "dreambooth_lora"):
            for side in ("reference", "visionpeft"):
                with ctx.Pool(1) as pool:
                    result = pool.apply(_measure, ((side, variant, args.batch, args.size, args.steps, args.threads),))
                runs.setdefault((variant, side), []).append(result)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("time", "memory")} for k, v in runs.items()}
    print(
        f"# scaled-down SD pipeline, batch {args.batch}, {args.size} px, fp32, AdamW, {args.threads} threads, "
        f"median of {args.steps} steps x {args.rounds} rounds, fresh process per run\n"
    )
    print(
        "| method | reference step (s) | visionpeft step (s) | time ratio | min / median / max over rounds | target "
        "| reference mem (MB) | visionpeft mem (MB) | memory ratio | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    targets = {"textual_inversion": "<= 1.05", "dreambooth_lora": "<= 0.90"}  # DreamBooth: prompt states cached
    for variant in ("textual_inversion", "dreambooth_lora"):
        ref, ours = med[(variant, "reference")], med[(variant, "visionpeft")]
        print(
            f"| {variant} | {ref['time']:.3f} | {ours['time']:.3f} | {ours['time'] / ref['time']:.2f} | "
            f"{ratio_spread(runs[(variant, 'visionpeft')], runs[(variant, 'reference')], 'time')} | "
            f"{targets[variant]} | {ref['memory']:.0f} | {ours['memory']:.0f} | "
            f"{ours['memory'] / max(ref['memory'], 1e-6):.2f} | <= 1.00 |"
        )
    ti, db = med[("textual_inversion", "visionpeft")], med[("dreambooth_lora", "visionpeft")]
    lookup = ti_lookup(args.threads)
    print("\n| hot path | visionpeft | peer | ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| textual-inversion step vs DreamBooth-LoRA step (s) | {ti['time']:.3f} | {db['time']:.3f} | "
          f"{ti['time'] / db['time']:.2f} | <= 1.10 |")  # fmt: skip
    print(f"| TI embedding fwd+bwd, 49,408 x 768 table, vs a concatenated-table lookup (ms) | "
          f"{lookup['ours'] * 1e3:.2f} | {lookup['concatenated'] * 1e3:.2f} | "
          f"{lookup['ours'] / lookup['concatenated']:.3f} | <= 2 ms |")  # fmt: skip
    return 0
