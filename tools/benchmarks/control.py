"""Control benchmark: a visionpeft control training step against a bare step written as diffusers'
``examples/controlnet/train_controlnet.py`` writes it, side by side; the control methods against each other; and a
control sampling step against the base pipeline's.

Every training variant runs in a fresh process on the same scaled-down SD pipeline (``personalize.build_pipeline``:
SD layout, smaller widths, a VAE that downsamples by 2, so the hint encoders have two stages), the same batch, the
same noise; the tables give median step time, peak memory above the pipeline's footprint, trainable parameters and
AdamW state.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import resource
import statistics
import time

from .stats import ratio_spread

HINT = {"hint_channels": [16, 32]}
VARIANTS = {
    "reference": ("diffusers' train_controlnet.py step (ControlNetModel)", None, {}),
    "controlnet": ("visionpeft controlnet", "controlnet", HINT),
    "controlnet_lora": ("visionpeft controlnet_lora r 32", "controlnet_lora", {**HINT, "r": 32}),
    "t2i_adapter": ("visionpeft t2i_adapter (full)", "t2i_adapter", {"downscale_factor": 2}),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reference_step(pipe, batch: dict):
    """One step as diffusers' example does: frozen U-Net / VAE / text encoder, the whole ControlNet trains."""
    import torch
    import torch.nn.functional as F
    from diffusers import ControlNetModel

    unet, vae, text_encoder, scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    ids = pipe.tokenizer(
        batch["prompt"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids

    def step(generator):
        with torch.no_grad():
            latents = vae.encode(batch["pixels"]).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        down, mid = controlnet(
            noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=batch["condition"], return_dict=False
        )
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=hidden,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def _visionpeft_step(pipe, batch: dict, method: str, options: dict):
    import torch

    import visionpeft as vp
    from visionpeft.trainers.diffusion import DiffusionParts, diffusion_loss

    vp.attach(pipe, method, **options)
    parts = DiffusionParts.from_pipeline(pipe, cache_prompts=True)  # as the control trainer builds them
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(pipe)], lr=1e-5)
    vp.set_train_mode(pipe, True)

    def step(generator):
        with vp.conditioning(pipe, control_image=batch["condition"]):
            loss = diffusion_loss(parts, batch["pixels"], batch["prompt"], generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def _measure(args: tuple) -> dict:
    variant, batch_size, size, steps, threads = args
    import torch

    from benchmarks.personalize import build_pipeline

    torch.set_num_threads(threads)
    pipe = build_pipeline()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixels": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
        "condition": torch.rand(batch_size, 3, size, size, generator=generator),
        "prompt": ["red circle with blue background"] * batch_size,
    }
    _, method, options = VARIANTS[variant]
    step, optimizer = _reference_step(pipe, batch) if method is None else _visionpeft_step(pipe, batch, method, options)
    gc.collect()
    base = _rss_mb()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        step(torch.Generator().manual_seed(i))
        if i:
            times.append(time.perf_counter() - start)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.ndim)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "time": statistics.median(times),
        "memory": peak - base,
        "trainable": sum(p.numel() for p in params),
        "state_mb": state / 2**20,
    }


def _sampling(args: tuple) -> dict:
    """Seconds per sampling call of the base pipeline and of the same pipeline with a ControlNet attached."""
    size, threads = args
    import torch

    import visionpeft as vp
    from benchmarks.personalize import build_pipeline

    torch.set_num_threads(threads)
    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def sample():
        return pipe(
            "a photo",
            num_inference_steps=4,
            height=size,
            width=size,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )

    def timed(fn, repeats=3):
        fn()
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            values.append(time.perf_counter() - start)
        return statistics.median(values)

    base = timed(sample)
    vp.attach(pipe, "controlnet", **HINT)

    def controlled():
        with vp.conditioning(pipe, control_image=control):
            return sample()

    return {"base": base, "controlnet": timed(controlled)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py control", description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with ctx.Pool(1) as pool:
                runs[name].append(pool.apply(_measure, ((name, args.batch, args.size, args.steps, args.threads),)))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    with ctx.Pool(1) as pool:
        sampling = pool.apply(_sampling, ((args.size, args.threads),))
    print(
        f"# scaled-down SD pipeline, batch {args.batch}, {args.size} px, fp32, AdamW, {args.threads} threads, "
        f"median of {args.steps} steps x {args.rounds} rounds, fresh process per run\n"
    )
    print(
        "| variant | step (s) | vs reference | min / median / max over rounds | peak memory (MB) | vs reference "
        "| trainable | AdamW state (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = med["reference"]
    for name, (label, _, _) in VARIANTS.items():
        r = med[name]
        memory_ratio = r["memory"] / max(ref["memory"], 1e-6)
        spread = ratio_spread(runs[name], runs["reference"], "time")
        print(
            f"| {label} | {r['time']:.3f} | {r['time'] / ref['time']:.2f} | {spread} | {r['memory']:.0f} | "
            f"{memory_ratio:.2f} | "
            f"{int(r['trainable']):,} | {r['state_mb']:.1f} |"
        )
    cn, lora, t2i = med["controlnet"], med["controlnet_lora"], med["t2i_adapter"]
    print("\n| ratio | value | target |")
    print("|---|---:|---|")
    print(f"| controlnet step / reference step | {cn['time'] / ref['time']:.2f} | <= 1.05 |")
    print(f"| controlnet_lora AdamW state / controlnet's | {lora['state_mb'] / cn['state_mb']:.2f} | <= 0.30 |")
    print(f"| t2i_adapter step / controlnet step | {t2i['time'] / cn['time']:.2f} | |")
    print(f"| control sampling call / base sampling call | {sampling['controlnet'] / sampling['base']:.2f} | |")
    return 0
