"""Segmentation benchmark: the training step of every method on a segmenter, relative to full fine-tuning, and
sliding-window inference throughput relative to whole-image inference.

    python tools/benchmark.py segment [--arch vit_base_patch16_224] [--head setr_pup] [--crop 512] [--batch 2]
    python tools/benchmark.py segment --quick        # a tiny ViT, for a smoke test of this script

Every method runs in its own fresh process on the same backbone (random weights: timing does not depend on them),
head, crop and batch; one run per method. Memory is the peak above the built model: CUDA's peak allocated memory
on a GPU, else the process's peak RSS. The ratios use CPU time on a CPU (steadier on a shared machine) and wall time
on a GPU. Throughput: images of ``--eval-size`` (ADE20K's typical 512 x 683) inferred whole and with ``--crop``
windows at ``--stride``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass

METHODS: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("linear (head only)", "linear", {}),
    ("bitfit", "bitfit", {}),
    ("lora r8 q,v", "lora", {"r": 8}),
    ("adaptformer b64", "adaptformer", {"bottleneck": 64}),
    ("convpass d8", "convpass", {"dim": 8, "scale": 0.1}),
    ("vpt-deep 10", "vpt", {"num_tokens": 10, "deep": True}),
]


@dataclass
class Settings:
    arch: str
    head: str
    crop: int
    batch: int
    steps: int
    warmup: int
    threads: int
    kwargs: dict


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _segmenter(settings: Settings, device):
    import timm

    import visionpeft as vp

    model = timm.create_model(settings.arch, pretrained=False, num_classes=0, dynamic_img_size=True, **settings.kwargs)
    return vp.segmentation.build(model, head=settings.head, num_classes=150, aux=settings.head == "setr_pup").to(device)


def _train_steps(args: tuple) -> dict:
    """Runs in a fresh process: build, attach, time warm AdamW steps, report peak memory."""
    settings, method, options = args
    import torch
    import torch.nn.functional as F

    import visionpeft as vp

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seg = vp.attach(_segmenter(settings, device), method, **options)
    vp.set_train_mode(seg, True)
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(seg)], lr=1e-4)
    x = torch.randn(settings.batch, 3, settings.crop, settings.crop, device=device)
    y = torch.randint(0, 150, (settings.batch, settings.crop, settings.crop), device=device)
    gc.collect()
    base = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    times, cpu_times = [], []
    for step in range(settings.warmup + settings.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        logits, aux = seg(x, with_aux=True)
        loss = F.cross_entropy(logits, y) + sum(0.4 * F.cross_entropy(a, y) for a in aux)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= settings.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    counts = vp.count_parameters(seg)
    return {
        "time": statistics.median(times),
        "cpu": statistics.median(cpu_times),
        "memory": max(memory, 1e-6),
        "trainable": counts["trainable"],
        "head": counts["by_group"].get("head", 0) + counts["by_group"].get("aux_head", 0),
        "device": device.type,
    }


def _throughput(args: tuple) -> dict:
    """Images per second of whole-image and sliding-window inference (fresh process, eval mode)."""
    settings, size, stride, repeats = args
    import torch

    import visionpeft as vp

    torch.set_num_threads(settings.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seg = _segmenter(settings, device).eval()
    image = torch.randn(1, 3, *size, device=device)
    modes = {"whole": {}, "slide": {"crop": (settings.crop, settings.crop), "stride": (stride, stride)}}
    out = {}
    for mode, kwargs in modes.items():
        vp.segmentation.predict_logits(seg, image, mode, **kwargs)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            vp.segmentation.predict_logits(seg, image, mode, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[mode] = repeats / (time.perf_counter() - start)
    out["windows"] = len(vp.segmentation.window_grid(*size, (settings.crop,) * 2, (stride, stride)))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--head", default="setr_pup", choices=("linear", "linear4", "setr_pup", "upernet"))
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed warm steps per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-size", type=int, nargs=2, default=[512, 683], help="image (height, width)")
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--repeats", type=int, default=3, help="inferences per mode in the throughput test")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT, for a smoke test of this script")
    args = parser.parse_args(argv)
    kwargs = {}
    if args.quick:
        args.arch, args.crop, args.batch, args.steps, args.stride, args.eval_size = (
            "vit_tiny_patch16_224",
            64,
            2,
            1,
            43,
            [64, 85],
        )
        kwargs = {"depth": 2}
    settings = Settings(args.arch, args.head, args.crop, args.batch, args.steps, args.warmup, args.threads, kwargs)
    ctx = mp.get_context("spawn")
    rows = {}
    for label, method, options in METHODS:
        with ctx.Pool(1) as pool:
            rows[label] = pool.apply(_train_steps, ((settings, method, options),))
    with ctx.Pool(1) as pool:
        speed = pool.apply(_throughput, ((settings, tuple(args.eval_size), args.stride, args.repeats),))
    device = rows["full"]["device"]
    key = "cpu" if device == "cpu" else "time"
    print(
        f"# {settings.arch} + {settings.head} head (150 classes), batch {settings.batch} x {settings.crop} px crops, "
        f"fp32, AdamW, {device}{f', {settings.threads} threads' if device == 'cpu' else ''}, median of "
        f"{settings.steps} warm steps, one fresh process per method, one run\n"
    )
    print(
        "| method | trainable params (head) | step wall (s) | step CPU (s) | time / full | memory (MB) "
        "| memory / full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    full = rows["full"]
    for label, r in rows.items():
        print(
            f"| {label} | {r['trainable']:,} ({r['head']:,}) | {r['time']:.2f} | {r['cpu']:.2f} | "
            f"{r[key] / full[key]:.2f} | {r['memory']:.0f} | {r['memory'] / full['memory']:.2f} |"
        )
    print(f"\n| inference on {args.eval_size[0]} x {args.eval_size[1]} images | images / s | relative |")
    print("|---|---:|---:|")
    print(f"| whole image | {speed['whole']:.2f} | 1.00 |")
    print(
        f"| sliding window {settings.crop} / stride {args.stride} ({speed['windows']} windows) | "
        f"{speed['slide']:.2f} | {speed['slide'] / speed['whole']:.2f} |"
    )
    return 0
