"""GPU benchmark: the training hot paths under mixed precision, against PEFT and diffusers' example loops, in one run.

ViT table: timm ViT-B/16 at 224 px, batch 64, AdamW, SDPA attention (timm's fused attention). Rows: plain PyTorch
full fine-tuning, visionpeft full / LoRA r 8 on Q,V / AdaptFormer b 8 / VPT-deep 10, and the peer, PEFT's LoRA r 8 on
the fused qkv. visionpeft stores frozen weights in the half type, as its trainer does under mixed precision; the
PEFT model keeps fp32 weights, as accelerate leaves them.

Diffusion table: Stable Diffusion 1.5's layout (random weights: a step's cost does not depend on them) at 512 px,
batch 4: the steps of diffusers' train_dreambooth_lora.py and textual_inversion.py (``benchmarks.personalize``)
against visionpeft's DreamBooth-LoRA (prompt states cached; and with latents cached) and textual inversion, with
PyTorch SDPA attention and, when xformers is installed, xformers attention.

SDXL / Flux tables (``benchmarks.family_steps``): the logic of diffusers' train_dreambooth_lora_sdxl.py,
train_controlnet_sdxl.py and train_dreambooth_lora_flux.py against visionpeft's SDXL DreamBooth-LoRA, SDXL ControlNet
and Flux DreamBooth-LoRA steps, batch 1 (the recipes' micro-batch), on the published layouts (``--sdxl-layout``,
``--flux-layout``: SDXL base 1.0 at 1024 px, FLUX.1-dev at 512 px, the README runs' resolutions; ``tiny`` on a CPU).

Every table runs under bf16 and fp16 autocast (fp16 with a gradient scaler). Every row builds its model, warms up,
then times steps between CUDA synchronisations; ``--rounds`` repeats all rows in a rotated order. Reported: images
per second (median over rounds), each ratio to the peer with its min / median / max over rounds, and the peak CUDA
memory of training above the built model. ``--device cpu --quick`` runs the same code on tiny models (the test).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass

from .layouts import FLUX_LAYOUTS, SDXL_LAYOUTS
from .stats import ratio_spread

#: (row, method, options): ``plain`` is full fine-tuning without visionpeft, ``peft_lora`` the peer (``core.prepare``)
VIT_ROWS = (
    ("plain full fine-tuning", "plain", {}),
    ("visionpeft full", "full", {}),
    ("visionpeft lora r8 q,v", "lora", {"r": 8}),
    ("peft lora r8 qkv (peer)", "peft_lora", {"r": 8}),
    ("visionpeft adaptformer b8", "adaptformer", {"bottleneck": 8}),
    ("visionpeft vpt-deep 10", "vpt", {"num_tokens": 10, "deep": True}),
)
#: each ViT row's peer (the ratio's denominator)
VIT_PEERS = {"visionpeft full": "plain full fine-tuning", "visionpeft lora r8 q,v": "peft lora r8 qkv (peer)"}


@dataclass
class Settings:
    device: str
    vit_arch: str
    vit_batch: int
    vit_img: int
    sd_layout: str
    sd_batch: int
    sd_img: int
    warmup: int
    steps: int
    sdxl_layout: str = "sdxl"
    sdxl_img: int = 1024
    flux_layout: str = "flux"
    flux_img: int = 512
    family_batch: int = 1


def _timed(step, device: str, warmup: int, steps: int) -> dict[str, float]:
    """Median step time and peak memory (MB) above what was allocated before the first step (CUDA; 0 on CPU)."""
    import torch

    from .amp import synchronize

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    memory = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")  # CPU: see core
    return {"time": statistics.median(times), "memory": memory}


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vit_row(settings: Settings, method: str, options: dict, precision: str) -> dict[str, float]:
    import timm
    import torch

    from visionpeft.trainers.run import freeze_in_precision

    from .amp import Amp
    from .core import prepare, training_step

    device = settings.device
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(settings.vit_arch, pretrained=False, num_classes=100, img_size=settings.vit_img)
    model, params, _ = prepare(model, method, options)
    if method != "peft_lora":
        freeze_in_precision([model], precision)
    x = torch.randn(settings.vit_batch, 3, settings.vit_img, settings.vit_img, device=device)
    y = torch.randint(0, 100, (settings.vit_batch,), device=device)
    step = training_step(model, params, x, y, Amp(device, precision))
    return _timed(step, device, settings.warmup, settings.steps)


def sd_row(settings: Settings, side: str, variant: str, options: dict, precision: str, attention: str):
    import torch

    from .personalize import build_pipeline, reference_step_fn, visionpeft_step_fn

    device = settings.device
    pipe = build_pipeline(layout=settings.sd_layout, device=device)
    if attention == "xformers":
        pipe.unet.enable_xformers_memory_efficient_attention()
    if side == "reference":
        step = reference_step_fn(pipe, variant, device, precision)
    else:
        step = visionpeft_step_fn(pipe, variant, device, precision, **options)
    pixels = torch.rand(settings.sd_batch, 3, settings.sd_img, settings.sd_img, device=device) * 2 - 1
    return _timed(lambda: step(pixels, None), device, settings.warmup, settings.steps)


def _rounds(rows: list, rounds: int, measure) -> dict[str, list[dict]]:
    """``measure(row)`` for every row, ``rounds`` times in a rotated order -> row name -> one result per round."""
    runs: dict[str, list[dict]] = {row[0]: [] for row in rows}
    for index in range(rounds):
        shift = index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            runs[row[0]].append(measure(row))
            _release()  # the row's model is gone with its frame: the next row starts from an empty cache
    return runs


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def vit_table(settings: Settings, precision: str, rounds: int) -> None:
    runs = _rounds(list(VIT_ROWS), rounds, lambda row: vit_row(settings, row[1], row[2], precision))
    print(f"\n{settings.vit_arch}, batch {settings.vit_batch}, {settings.vit_img} px, {precision} autocast, SDPA\n")
    print(
        "| method | images / s | step (ms) | vs peer (time) | min / median / max over rounds | peak training "
        "memory (MB) | vs peer (memory) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    for row, results in runs.items():
        step = _median(results, "time")
        peer = VIT_PEERS.get(row)
        versus = spread = memory_ratio = ""
        if peer:
            versus = f"{step / _median(runs[peer], 'time'):.2f} x {peer}"
            spread = ratio_spread(results, runs[peer], "time")
            memory_ratio = f"{_median(results, 'memory') / max(_median(runs[peer], 'memory'), 1e-6):.2f}"
        print(
            f"| {row} | {settings.vit_batch / step:.1f} | {step * 1e3:.1f} | {versus} | {spread} | "
            f"{_median(results, 'memory'):.0f} | {memory_ratio} |"
        )


def sd_table(settings: Settings, precision: str, attention: str, rounds: int) -> None:
    from .personalize import ROWS

    rows = [(f"{row}/{side}", variant, side, options) for row, variant, side, options in ROWS]
    runs = _rounds(rows, rounds, lambda r: sd_row(settings, r[2], r[1], r[3], precision, attention))
    print(
        f"\n{settings.sd_layout} layout, batch {settings.sd_batch}, {settings.sd_img} px, {precision} autocast, "
        f"{attention} attention\n"
    )
    print(
        "| step | diffusers' example loop: images / s | visionpeft: images / s | time ratio | min / median / max "
        "over rounds | peak memory (MB), diffusers / visionpeft |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row, variant, side, _ in ROWS:
        if side == "reference":
            continue
        print(_paired_row(row, settings.sd_batch, runs[f"{variant}/reference"], runs[f"{row}/visionpeft"]))


def _paired_row(row: str, batch: int, ref: list[dict], ours: list[dict]) -> str:
    """A table row of the reference side against visionpeft's: images / s of each, the time ratio with its spread
    over rounds, and both peak memories."""
    ref_time, our_time = _median(ref, "time"), _median(ours, "time")
    return (
        f"| {row} | {batch / ref_time:.2f} | {batch / our_time:.2f} | {our_time / ref_time:.2f} | "
        f"{ratio_spread(ours, ref, 'time')} | {_median(ref, 'memory'):.0f} / {_median(ours, 'memory'):.0f} |"
    )


def family_table(settings: Settings, family: str, precision: str, rounds: int) -> None:
    """The SDXL (``family`` sdxl) or Flux rows: each row's script-logic step and visionpeft's step."""
    from .family_steps import ROWS, row_step

    layout, size = (
        (settings.sdxl_layout, settings.sdxl_img) if family == "sdxl" else (settings.flux_layout, settings.flux_img)
    )
    batch = settings.family_batch
    names = [row for row, (kind, _) in ROWS.items() if kind == family]
    rows = [(f"{row}/{side}", row, side) for row in names for side in ("reference", "visionpeft")]

    def measure(entry):
        step = row_step(entry[1], entry[2], layout, size, batch, settings.device, precision)
        return _timed(step, settings.device, settings.warmup, settings.steps)

    runs = _rounds(rows, rounds, measure)
    print(f"\n{family} layout {layout}, batch {batch}, {size} px, {precision} autocast, sdpa attention\n")
    print(
        "| step | diffusers' script logic: images / s | visionpeft: images / s | time ratio | min / median / max "
        "over rounds | peak memory (MB), script / visionpeft |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in names:
        print(_paired_row(row, batch, runs[f"{row}/reference"], runs[f"{row}/visionpeft"]))


def attentions() -> list[str]:
    """SDPA always; xformers when it is installed."""
    import importlib.util

    return ["sdpa", "xformers"] if importlib.util.find_spec("xformers") else ["sdpa"]


def quiet_libraries() -> None:
    """The tables only: diffusers' and transformers' notes on random-weight models and casts are not the results."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _header(settings: Settings) -> str:
    import diffusers
    import peft
    import timm
    import torch

    device = torch.cuda.get_device_name() if torch.device(settings.device).type == "cuda" else "CPU"
    return (
        f"# {device}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"timm {timm.__version__}; {settings.warmup} warm-up + {settings.steps} timed steps per row"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--tables", nargs="+", default=["vit", "sd", "sdxl", "flux"], choices=["vit", "sd", "sdxl", "flux"]
    )
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--sd-batch", type=int, default=4)
    parser.add_argument("--sd-img", type=int, default=512)
    parser.add_argument("--sdxl-layout", choices=SDXL_LAYOUTS, default="sdxl", help="sdxl: SDXL base 1.0's sizes")
    parser.add_argument("--sdxl-img", type=int, default=1024)
    parser.add_argument("--flux-layout", choices=FLUX_LAYOUTS, default="flux", help="flux: FLUX.1-dev's sizes")
    parser.add_argument("--flux-img", type=int, default=512)
    parser.add_argument("--family-batch", type=int, default=1, help="batch of the SDXL / Flux rows")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, 32 px, batch 1, 1 step: a smoke test of this script"
    )
    args = parser.parse_args(argv)
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA device here; this suite times GPU steps (--device cpu --quick runs it on tiny models)",
            file=sys.stderr,
        )
        return 2
    settings = Settings(
        args.device,
        "vit_base_patch16_224",
        args.vit_batch,
        224,
        "sd15",
        args.sd_batch,
        args.sd_img,
        args.warmup,
        args.steps,
        args.sdxl_layout,
        args.sdxl_img,
        args.flux_layout,
        args.flux_img,
        args.family_batch,
    )
    if args.quick:
        settings = Settings(
            args.device, "vit_tiny_patch16_224", 1, 32, "scaled", 1, 32, 1, 1, "tiny", 32, "tiny", 32, 1
        )
        args.rounds = 1
    quiet_libraries()
    print(_header(settings))
    for precision in args.precisions:
        if "vit" in args.tables:
            vit_table(settings, precision, args.rounds)
        if "sd" in args.tables:
            for attention in attentions():
                sd_table(settings, precision, attention, args.rounds)
        for family in ("sdxl", "flux"):
            if family in args.tables:
                family_table(settings, family, precision, args.rounds)
    return 0
