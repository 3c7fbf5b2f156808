"""The embedded tiny pipeline (``checkpoints/tiny_sd``): sampling speed, and a personalization step of visionpeft
against the same step written directly with diffusers + peft, in one run.

    python tools/benchmark.py tiny-sd [--batch 16] [--steps 20] [--rounds 3] [--threads 1]

Sampling: images per second of ``StableDiffusionPipeline`` at 20 DDIM steps with classifier-free guidance (32 px,
fp32, CPU), median over rounds after a warm-up call. Personalization: the steps of
:mod:`benchmarks.personalize` (textual inversion, DreamBooth-LoRA; reference = diffusers' example scripts' step)
on the tiny pipeline at 32 px, each variant in a fresh process, median step time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from .personalize import measure_step
from .stats import ratio_spread

PIPELINE = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny_sd"


def sampling_speed(batch: int, steps: int, rounds: int, threads: int) -> list[float]:
    """Images per second of each round (after one warm-up call)."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    from visionpeft.backbones.diffusers_loading import dtype_keyword

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, **dtype_keyword(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a handwritten digit three"] * batch
    pipe(prompts[:2], num_inference_steps=2)
    speeds = []
    for i in range(rounds):
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(i))
        speeds.append(batch / (time.perf_counter() - start))
    return speeds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py tiny-sd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=10, help="timed personalization steps per run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (PIPELINE / "model_index.json").is_file():
        print(f"error: {PIPELINE} is missing; make it with python tools/pretrain.py configs/pretrain/tiny_sd.yaml")
        return 2
    speeds = sampling_speed(args.batch, args.steps, args.rounds, args.threads)
    print(f"# checkpoints/tiny_sd, fp32 CPU, {args.threads} thread(s)\n")
    print("| sampling | images / s (median) | min / max over rounds |")
    print("|---|---:|---:|")
    print(
        f"| {args.steps} DDIM steps, guidance 3, batch {args.batch}, 32 px | {statistics.median(speeds):.2f} | "
        f"{min(speeds):.2f} / {max(speeds):.2f} |"
    )
    ctx = mp.get_context("spawn")
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for variant in ("textual_inversion", "dreambooth_lora"):
            for side in ("reference", "visionpeft"):
                job = (side, variant, args.train_batch, 32, args.train_steps, args.threads, str(PIPELINE))
                with ctx.Pool(1) as pool:
                    runs.setdefault((variant, side), []).append(pool.apply(measure_step, (job,)))
    print(
        f"\n| personalization step (batch {args.train_batch}, 32 px) | diffusers + peft (s) | visionpeft (s) | "
        "ratio | min / median / max over rounds |"
    )
    print("|---|---:|---:|---:|---:|")
    for variant in ("textual_inversion", "dreambooth_lora"):
        ref = statistics.median(r["time"] for r in runs[(variant, "reference")])
        ours = statistics.median(r["time"] for r in runs[(variant, "visionpeft")])
        spread = ratio_spread(runs[(variant, "visionpeft")], runs[(variant, "reference")], "time")
        print(f"| {variant} | {ref:.4f} | {ours:.4f} | {ours / ref:.2f} | {spread} |")
    return 0
