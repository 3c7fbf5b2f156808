"""Zoo benchmark ([zoo] methods): each method's training step against full fine-tuning, and the inference of a model
with a re-parameterisable method merged against the plain model.

Training steps: every method runs in a fresh process (``core.train_steps``: same model, batch, threads; median of
warm AdamW steps), ``--rounds`` rounds with the method order rotated each round, full fine-tuning in every round. The
ratio is process CPU time over full fine-tuning's in the same round; the table gives the median and the
min / median / max over rounds, so a reader sees how far one run moves on a shared machine.

Merged inference: SSF, FacT and RepAdapter fold into the weights (``vp.merge``), so the merged model must cost what
the plain model costs; both run in one process, interleaved (``core.interleaved``), timed by this process's CPU time
(as the training steps: with ``--threads 1`` on a shared machine the waits for a core are left out).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from .core import Settings, add_step_arguments, build_model, interleaved, train_steps
from .stats import ratio_spread

#: (label, method, options, target ratio of the step to full fine-tuning or None)
METHODS: list[tuple[str, str, dict, float | None]] = [
    ("full", "full", {}, None),
    ("ln_tune", "ln_tune", {}, 0.75),
    ("ssf", "ssf", {}, 0.75),
    ("fact tt d8", "fact", {"variant": "tt", "dim": 8}, 0.75),
    ("fact tk d32", "fact", {"variant": "tk", "dim": 32}, 0.75),
    ("repadapter b8", "repadapter", {"bottleneck": 8}, 0.75),
    ("adapter houlsby b8", "adapter", {"style": "houlsby", "bottleneck": 8}, 0.75),
    ("adapter pfeiffer b8", "adapter", {"style": "pfeiffer", "bottleneck": 8}, 0.75),
    ("vqt", "vqt", {}, 0.75),
    ("vp pad 30", "vp", {}, None),
]
#: (label, method, options) of the methods whose merged model is timed against the plain one
MERGED: list[tuple[str, str, dict]] = [
    ("ssf", "ssf", {}),
    ("fact tt d8", "fact", {"variant": "tt", "dim": 8}),
    ("repadapter b8", "repadapter", {"bottleneck": 8}),
]
MERGED_TARGET = 1.02


def merged_vs_plain(settings: Settings, repeats: int) -> dict[str, float]:
    """Inference time of the plain model and of each :data:`MERGED` method attached, trained a little (so the fold
    is not of zeros) and merged, interleaved in this process."""
    import torch

    import visionpeft as vp

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    models = {"plain": build_model(settings).eval()}
    for label, method, options in MERGED:
        model = vp.attach(build_model(settings), method, **options)
        with torch.no_grad():
            for _, p in vp.trainable_parameters(model):
                p.add_(torch.randn_like(p) * 0.01)
        models[label] = vp.merge(model).eval()
    x = torch.randn(settings.batch, 3, settings.img, settings.img)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    return interleaved({label: infer(model) for label, model in models.items()}, repeats, clock=time.process_time)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py zoo", description=__doc__)
    add_step_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the whole table, order rotated each round")
    parser.add_argument("--repeats", type=int, default=3, help="runs per round in the merged-inference table")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.img, args.steps, args.rounds, args.repeats = "vit_tiny_patch16_224", 2, 64, 1, 1, 1
    settings = Settings(args.arch, args.batch, args.img, args.steps, args.warmup, args.threads)
    print(
        f"# {settings.arch}, batch {settings.batch}, {settings.img} px, fp32, AdamW, {settings.threads} threads, "
        f"median of {settings.steps} warm steps, one fresh process per method and round, {args.rounds} rotated "
        "rounds\n"
    )
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {label: [] for label, *_ in METHODS}
    for round_index in range(args.rounds):
        shift = round_index % len(METHODS)
        for label, method, options, _ in METHODS[shift:] + METHODS[:shift]:
            with ctx.Pool(1) as pool:
                runs[label].append(pool.apply(train_steps, ((settings, method, options),)))
    full = runs["full"]
    print(
        "| method | trainable params | step CPU (s) | time / full | min / median / max over rounds | target "
        "| train memory (MB) | memory / full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, _, _, target in METHODS:
        cpu = statistics.median(r["cpu"] for r in runs[label])
        ratio = statistics.median(r["cpu"] / f["cpu"] for r, f in zip(runs[label], full))
        memory = statistics.median(r["memory"] for r in runs[label])
        full_memory = statistics.median(r["memory"] for r in full)
        print(
            f"| {label} | {int(runs[label][0]['trainable']):,} | {cpu:.2f} | {ratio:.2f} | "
            f"{ratio_spread(runs[label], full, 'cpu')} | {f'<= {target:.2f}' if target else ''} | {memory:.0f} | "
            f"{memory / full_memory:.2f} |"
        )
    with ctx.Pool(1) as pool:
        merged = pool.apply(merged_vs_plain, (settings, args.repeats))
    print("\n| merged inference, one process, interleaved | batch CPU time (ms) | vs plain | target |")
    print("|---|---:|---:|---:|")
    for label, seconds in merged.items():
        target = "" if label == "plain" else f"<= {MERGED_TARGET:.2f}"
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / merged['plain']:.2f} | {target} |")
    return 0
